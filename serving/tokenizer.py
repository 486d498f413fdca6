"""A small byte-level BPE tokenizer for the tiny seeded checkpoints, built here (no hub).

It fills the model's whole vocabulary, so every token id a random-weight model emits
decodes to text: ids 0-2 are <pad>, <s>, </s>; then the 256 bytes; then merges learnt from
a fixed English corpus (deterministic). A chat template makes /v1/chat/completions work.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
Prefill runs the prompt once and produces the KV cache; decode produces one token at a time
from it. When prefill and decode run on different machines, the cache has to travel between
them, layer by layer, while the prompt is still being computed. Hybrid attention models keep
a fixed recurrent state for most layers and a small per token cache for the few full
attention layers, so the cache is small enough to cross a datacenter over ordinary Ethernet.
The user asks a question and the assistant answers it. Hello, how are you today? I am fine,
thank you. What is the capital of France? The capital of France is Paris. Tell me a story
about a cat who lived in a library and read every book on the shelves at night.
"""


def write_tiny_tokenizer(path: str | Path, vocab_size: int) -> None:
    """Save tokenizer.json + tokenizer_config.json (with a chat template) into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:  # a corpus this small may run out of merges: the rest are plain added tokens
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(missing)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"tiny tokenizer has {tokenizer.get_vocab_size()} tokens, the model {vocab_size}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
