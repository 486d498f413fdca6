"""Loading a hybrid-attention checkpoint, and the tiny seeded ones tests and the demo use.

The model code is transformers' own (KimiLinearForCausalLM, Qwen3NextForCausalLM); this
module only decides which kernels it may pick and where weights come from. On a machine
without CUDA, fla / causal_conv1d / mamba_ssm must not be importable: transformers selects
their Triton kernels whenever it can import them and then fails with "0 active drivers".
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GPU_ONLY_KERNEL_PACKAGES = ("fla", "causal_conv1d", "mamba_ssm")
ARCHITECTURES = ("KimiLinearForCausalLM", "Qwen3NextForCausalLM")


def block_gpu_kernels() -> None:
    """Hide the Triton kernel packages when CUDA is unavailable (before importing models)."""
    import torch

    if torch.cuda.is_available():
        return
    for name in GPU_ONLY_KERNEL_PACKAGES:
        if sys.modules.get(name) is not None:
            log.warning("%s was imported before block_gpu_kernels(); its CPU-less kernels may be selected", name)
            continue
        sys.modules[name] = None  # makes `import name` raise ImportError


DEFAULT_MAX_MODEL_LEN = 32768  # a transformers forward on CPU needs memory growing with the prompt's square


@dataclass
class LoadedModel:
    """A causal LM plus what the workers need to know about it."""

    model: object
    config: object
    path: str
    tokenizer: object | None
    max_model_len: int = DEFAULT_MAX_MODEL_LEN  # prompt plus completion tokens a request may have

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def dtype_name(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.config.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else eos)



def quiet_transformers() -> None:
    """transformers without its warnings and progress bars, and with vLLM-free kernels:
    before anything imports a modeling module (the CLI's and the benchmarks' entry points)."""
    block_gpu_kernels()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

def load(path: str | Path, *, dtype: str | None = None, max_model_len: int | None = None) -> LoadedModel:
    """Load a local HF-format checkpoint of one of ``ARCHITECTURES`` for inference.

    ``dtype`` overrides the checkpoint's dtype ("float32", "bfloat16"); the tokenizer is
    loaded only when the folder has one (prompts may then be text). ``max_model_len``
    bounds prompt plus completion (default: the model's ``max_position_embeddings``, at
    most DEFAULT_MAX_MODEL_LEN), and is what the workers report to the router.
    """
    block_gpu_kernels()
    import torch
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a save_pretrained() checkpoint folder")
    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (config.architectures or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {architecture!r} is not supported; expected one of {ARCHITECTURES}")
    model_class = getattr(transformers, architecture)
    torch_dtype = getattr(torch, dtype) if dtype else "auto"
    model = model_class.from_pretrained(path, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    log.info("loaded %s from %s (%s, %d layers)", architecture, path, model.dtype, config.num_hidden_layers)
    longest = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
    if max_model_len is not None and max_model_len > longest:
        raise ValueError(f"--max-model-len {max_model_len} is more than the model's max_position_embeddings "
                         f"({longest})")
    return LoadedModel(model, config, str(path), _tokenizer(path), max_model_len or min(longest, DEFAULT_MAX_MODEL_LEN))


def _tokenizer(path: Path):
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def cache_keyword(model) -> str:
    """The forward keyword that takes the cache: ``cache`` from transformers 5.2x on
    (``past_key_values`` deprecated), ``past_key_values`` before (5.19, vLLM's pin). An
    unknown keyword would be swallowed by ``**kwargs`` and the model would run cacheless."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


# -- tiny seeded checkpoints (tests, demo) -------------------------------------------------

TINY_VOCAB = 512


def tiny_config(architecture: str = "KimiLinearForCausalLM", *, num_layers: int = 8):
    """A few-MB config of ``architecture`` with the real 3:1 linear:full layer pattern."""
    import transformers

    layer_types = [("full_attention" if i % 4 == 3 else "linear_attention") for i in range(num_layers)]
    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        moe_intermediate_size=32, num_experts=4, layer_types=layer_types, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    if architecture == "KimiLinearForCausalLM":
        return transformers.KimiLinearConfig(
            **common, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32, qk_rope_head_dim=16,
            v_head_dim=16, qk_nope_head_dim=16, num_experts_per_token=2, linear_head_dim=16, linear_num_heads=2,
            architectures=[architecture],
        )
    if architecture == "Qwen3NextForCausalLM":
        return transformers.Qwen3NextConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            shared_expert_intermediate_size=32, num_experts_per_tok=2, architectures=[architecture],
        )
    raise ValueError(f"no tiny config for {architecture!r}; expected one of {ARCHITECTURES}")


def vllm_tiny_config(num_layers: int = 4):
    """A tiny Qwen3-Next that vLLM's CPU backend runs (GatedDeltaNet, full attention,
    alternating; head size 64, bf16): vLLM has no CPU path for Kimi Linear's KDA."""
    import transformers

    layer_types = ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    return transformers.Qwen3NextConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers,
        moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
        layer_types=layer_types, num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        architectures=["Qwen3NextForCausalLM"],
    )


def write_tiny_checkpoint(
    path: str | Path, architecture: str = "KimiLinearForCausalLM", *, dtype: str = "float32", seed: int = 0,
    config=None, tokenizer: bool = True,
) -> Path:
    """Write a seeded random-weight checkpoint (config.json + model.safetensors, and with
    ``tokenizer`` a byte-level BPE filling the vocabulary, serving.tokenizer) to ``path``.

    The weights are scaled up from the usual 0.02 init so that greedy tokens are decided by
    clear logit margins, not by ties a tiny model would otherwise be full of.
    """
    block_gpu_kernels()
    import torch
    import transformers

    config = config if config is not None else tiny_config(architecture)
    architecture = config.architectures[0]
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(getattr(torch, dtype)).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer:
        from .tokenizer import write_tiny_tokenizer

        write_tiny_tokenizer(path, config.vocab_size)
    return path
