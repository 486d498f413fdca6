"""Validating what clients send: prompts, token counts and sampling settings.

The router checks shapes (it has no model); the prefill worker checks the prompt against
its model (vocabulary, tokenizer). Each mistake is a BadRequest whose message says which
field is wrong and why, answered with 400.
"""

from __future__ import annotations

from .http import BadRequest
from .steps import Sampling

MAX_PROMPT_TOKENS = 1 << 20
MAX_NEW_TOKENS = 1 << 16
MAX_TOKEN_ID = (1 << 31) - 1  # above any vocabulary; keeps ids in the int64 the hashes and tensors use


def check_prompt_shape(prompt) -> None:
    """A prompt is a non-empty string or a non-empty list of non-negative ints."""
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("`prompt` is an empty string")
        return
    if isinstance(prompt, list):
        if not prompt:
            raise BadRequest("`prompt` is an empty list")
        if len(prompt) > MAX_PROMPT_TOKENS:
            raise BadRequest(f"`prompt` has {len(prompt)} tokens, more than the limit of {MAX_PROMPT_TOKENS}")
        for i, token in enumerate(prompt):
            if type(token) is not int or not 0 <= token <= MAX_TOKEN_ID:
                raise BadRequest(f"`prompt[{i}]` is {token!r}: token ids must be integers in [0, {MAX_TOKEN_ID}]")
        return
    raise BadRequest(f"`prompt` must be a string or a list of token ids, got {type(prompt).__name__}")


def prompt_token_ids(prompt, loaded) -> list[int]:
    """The prompt as token ids for ``loaded`` (a LoadedModel), tokenizing text if it can."""
    check_prompt_shape(prompt)
    if isinstance(prompt, str):
        if loaded.tokenizer is None:
            raise BadRequest(
                f"`prompt` is text but the model at {loaded.path} has no tokenizer; send a list of token ids"
            )
        token_ids = list(loaded.tokenizer(prompt)["input_ids"])
    else:
        token_ids = prompt
    vocab_size = loaded.config.vocab_size
    for i, token in enumerate(token_ids):
        if token >= vocab_size:
            raise BadRequest(f"`prompt[{i}]` is {token}, outside the model's vocabulary of {vocab_size} tokens")
    return token_ids


def parse_max_tokens(body: dict, default: int = 16) -> int:
    value = body.get("max_tokens", default)
    if value is None:
        value = default
    if type(value) is not int or not 1 <= value <= MAX_NEW_TOKENS:
        raise BadRequest(f"`max_tokens` must be an integer in [1, {MAX_NEW_TOKENS}], got {value!r}")
    return value


def parse_sampling(body: dict) -> Sampling:
    """``temperature`` (0 = greedy, the default) and an optional integer ``seed``."""
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 100:
        raise BadRequest(f"`temperature` must be a number in [0, 100], got {temperature!r}")
    seed = body.get("seed")
    if seed is not None and type(seed) is not int:
        raise BadRequest(f"`seed` must be an integer, got {seed!r}")
    return Sampling(float(temperature), seed)
