"""The two model steps a worker runs: a prefill (with per-layer export) and decode steps.

Both call the transformers model exactly as ``generate()`` does (the same cache keyword,
``use_cache`` and ``logits_to_keep=1``), which is what makes disaggregated greedy tokens
identical to monolithic ones.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from .hybrid_cache import layer_hooks, new_cache
from .model import cache_keyword


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy at ``temperature == 0``, else a draw after
    temperature, top-k (0: off) and top-p (1: off), in transformers' order and arithmetic,
    so that a seeded request draws what ``generate(do_sample=True)`` after
    ``torch.manual_seed(seed)`` draws."""

    temperature: float = 0.0
    seed: int | None = None
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # ... and this times the number of times it was

    def generator(self, state: bytes | None = None):
        """The request's random stream; ``state`` continues one another worker started
        (the prefill worker draws the first token, the decode worker the rest)."""
        import torch

        if self.temperature == 0:
            return None
        generator = torch.Generator()
        if state is not None:
            generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        else:
            generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return generator


def generator_state(generator) -> bytes | None:
    """What ``Sampling.generator(state)`` needs to continue ``generator``'s stream."""
    return None if generator is None else generator.get_state().numpy().tobytes()


def pick_token(logits, sampling: Sampling, generator, generated: Sequence[int] = ()) -> int:
    """The next token from a row of logits, after the penalties for the ``generated`` tokens
    (as vLLM applies them: on the output so far, before temperature)."""
    import torch

    if generated and (sampling.presence_penalty or sampling.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(generated)), minlength=logits.shape[-1]).to(torch.float32)
        logits = logits.float() - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0).float()
    if sampling.temperature == 0:
        return int(torch.argmax(logits, dim=-1))
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()[None]
    scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
    if sampling.top_k > 0:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def token_logprobs(logits, token: int, num_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's own log-probability of ``token`` and the ``num_top`` likeliest tokens with
    theirs (vLLM's raw logprobs: before penalties, temperature and filtering)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, num_top) if num_top else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logprobs[token]), pairs


def forward(model, cache, token_ids: Sequence[int], hooks=None):
    """One forward over ``token_ids`` appending to ``cache`` (inside ``hooks`` if given)."""
    import torch

    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    with torch.no_grad(), hooks or contextlib.nullcontext():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})


def prefill(model, token_ids: Sequence[int], on_layer: Callable | None = None):
    """Run the prompt; return (last-position logits, cache).

    ``on_layer(i, tensors)`` is called as soon as layer i's cache entry is complete.
    """
    cache = new_cache(model.config)
    hooks = layer_hooks(model, cache, on_layer) if on_layer is not None else None
    return forward(model, cache, token_ids, hooks).logits[0, -1], cache


def decode_step(model, cache, token: int):
    """Feed one token; return the logits of the next position."""
    return forward(model, cache, [token]).logits[0, -1]


def decode(
    model, cache, first_token: int, max_new_tokens: int, sampling: Sampling, eos_token_ids: frozenset[int], generator=None
) -> Iterator[int]:
    """Tokens 2..max_new_tokens after ``first_token`` (the prefill's), stopping after an EOS."""
    token = first_token
    for _ in range(max_new_tokens - 1):
        if token in eos_token_ids:
            return
        token = pick_token(decode_step(model, cache, token), sampling, generator)
        yield token


def warm_up(model) -> None:
    """One short prefill and decode step, so the first request does not pay for lazy setup."""
    ids = [3 + i % (model.config.vocab_size - 3) for i in range(8)]
    logits, cache = prefill(model, ids)
    decode_step(model, cache, int(logits.argmax()))


def generate_monolithic(model, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers' own ``generate()``: the reference output."""
    import torch

    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=0)
    return out[0, len(token_ids):].tolist()
