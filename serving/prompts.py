"""Validating what clients send: prompts, token counts and sampling settings.

The router checks shapes (it has no model); the prefill worker checks the prompt against
its model (vocabulary, tokenizer). Each mistake is a BadRequest whose message says which
field is wrong and why, answered with 400.
"""

from __future__ import annotations

from .errors import BadRequest
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
    """``temperature`` (0 = greedy, the default), ``top_p``, ``top_k`` (-1 or 0: off) and an
    optional integer ``seed``."""
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 100:
        raise BadRequest(f"`temperature` must be a number in [0, 100], got {temperature!r}")
    seed = body.get("seed")
    if seed is not None and type(seed) is not int:
        raise BadRequest(f"`seed` must be an integer, got {seed!r}")
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise BadRequest(f"`top_p` must be a number in (0, 1], got {top_p!r}")
    top_k = 0 if body.get("top_k") is None else body["top_k"]
    if type(top_k) is not int or top_k < -1:
        raise BadRequest(f"`top_k` must be an integer, -1 or 0 for all tokens, got {top_k!r}")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = 0.0 if body.get(name) is None else body[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
            raise BadRequest(f"`{name}` must be a number in [-2, 2], got {value!r}")
        penalties[name] = float(value)
    return Sampling(float(temperature), seed, float(top_p), max(top_k, 0), **penalties)


MAX_LOGPROBS = 20


def parse_logprobs(body: dict, *, chat: bool) -> int | None:
    """How many top tokens to report with each token's log-probability (None: no logprobs).
    Completions say it as ``logprobs: N``; chats as ``logprobs: true`` and ``top_logprobs: N``."""
    if chat:
        wanted, top = body.get("logprobs"), body.get("top_logprobs")
        if wanted not in (None, True, False):
            raise BadRequest(f"`logprobs` must be true or false in a chat, got {wanted!r}")
        if top is not None and (type(top) is not int or not 0 <= top <= MAX_LOGPROBS):
            raise BadRequest(f"`top_logprobs` must be an integer in [0, {MAX_LOGPROBS}], got {top!r}")
        if top and not wanted:
            raise BadRequest("`top_logprobs` needs `logprobs: true`")
        return (top or 0) if wanted else None
    wanted = body.get("logprobs")
    if wanted is not None and (type(wanted) is not int or not 0 <= wanted <= MAX_LOGPROBS):
        raise BadRequest(f"`logprobs` must be an integer in [0, {MAX_LOGPROBS}], got {wanted!r}")
    return wanted


def parse_stop(body: dict) -> tuple[list[str], list[int]]:
    """``stop`` (a string or a list of strings) and ``stop_token_ids`` (vLLM's extension)."""
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"`stop` must be a non-empty string or a list of them, got {body['stop']!r}")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in ids):
        raise BadRequest(f"`stop_token_ids` must be a list of token ids, got {body['stop_token_ids']!r}")
    return stop, ids


# Parameters kvwire-serve workers do not implement: refused (400) unless at their default,
# never silently ignored. vLLM servers behind the router take them as they are.
NOT_SUPPORTED = {
    "repetition_penalty": (None, 1, 1.0),
    "best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""), "min_tokens": (None, 0),
    "min_p": (None, 0, 0.0), "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None,),
}
# Parameters that are honoured, or that change nothing a client can see.
SUPPORTED = {
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
    "stop", "stop_token_ids", "stream", "stream_options", "n", "return_token_ids", "user", "logprobs", "top_logprobs",
    "echo", "presence_penalty", "frequency_penalty",
}


def check_parameters(body: dict) -> None:
    """A parameter kvwire-serve workers would not honour is a 400 naming it."""
    for name, value in body.items():
        if name in SUPPORTED:
            continue
        if name in NOT_SUPPORTED:
            if any(value == default and type(value) is type(default) for default in NOT_SUPPORTED[name]):
                continue
            raise BadRequest(f"`{name}` is not supported by kvwire-serve workers (got {value!r}); vLLM servers behind "
                             "the router take it")
        raise BadRequest(f"unknown parameter `{name}`")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise BadRequest(f"`stream_options` may only hold `include_usage` (true or false), got {options!r}")


CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


def check_messages(messages) -> list[dict]:
    """``messages`` of a chat request as [{"role", "content": str}], or BadRequest naming the bad one.
    Content given as OpenAI's list of parts keeps its text parts."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list of {\"role\", \"content\"} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise BadRequest(f"`messages[{i}]` needs a `role` among {list(CHAT_ROLES)}, got {message!r}"[:300])
        content = message.get("content")
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise BadRequest(f"`messages[{i}].content`: only text parts are supported")
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"`messages[{i}].content` must be a string, got {type(content).__name__}")
        checked.append({"role": message["role"], "content": content})
    return checked


def chat_token_ids(messages, loaded) -> list[int]:
    """The chat as token ids through the checkpoint's chat template, ready for the reply."""
    messages = check_messages(messages)
    tokenizer = loaded.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRequest(f"the model at {loaded.path} has no tokenizer with a chat template; use /v1/completions "
                         "with a list of token ids")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    token_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return prompt_token_ids(token_ids, loaded)
