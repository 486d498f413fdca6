"""The messages between the router and its workers: msgspec structs, typed and bounded.

Every body a worker takes or gives on its ``/internal/...`` endpoints, and every line of a
decode worker's token stream, is one of these, encoded as JSON. Decoding is strict: an
unknown field, a wrong type or a value out of bounds is refused with msgspec's words and
the JSON path (``Expected `int` >= 0 - at `$.first_token```), before a worker acts on it,
as the transport's frames are (kvwire.wire.messages). The router's own surface (OpenAI's
completions and chats) is checked by hand in serving.prompts, with OpenAI's error texts.

``decode(data, Type)`` and ``encode(message)`` are the only ways in and out.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from kvwire.metrics import PeerMetrics

from .errors import BadRequest
from .prompts import MAX_LOGPROBS, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_TOKEN_ID
from .steps import Sampling

MAX_TEXT_CHARS = 1 << 26
MAX_STOP_STRINGS = 64
MAX_ID_CHARS = 512

TokenId = Annotated[int, Meta(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
RequestId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Address = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Seconds = Annotated[float, Meta(gt=0)]
Count = Annotated[int, Meta(ge=0)]
NumLogprobs = Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]
# (logprob of the chosen token, [(token id, logprob) of the likeliest]) as a worker computed them
TokenLogprobs = tuple[float, Annotated[list[tuple[TokenId, float]], Meta(max_length=MAX_LOGPROBS)]]


class Message(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    """Base of every router-worker message."""


# -- shared pieces ---------------------------------------------------------------------------


class SamplingParams(Message, frozen=True, kw_only=True):
    """How tokens are drawn (see serving.steps.Sampling); checked on the OpenAI surface."""

    temperature: Annotated[float, Meta(ge=0, le=100)] = 0.0
    seed: int | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    top_k: Count = 0
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0

    @classmethod
    def of(cls, sampling: Sampling) -> SamplingParams:
        return cls(temperature=sampling.temperature, seed=sampling.seed, top_p=sampling.top_p, top_k=sampling.top_k,
                   presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.seed, self.top_p, self.top_k, self.presence_penalty,
                        self.frequency_penalty)


class ErrorInfo(Message, kw_only=True):
    """What broke: ``type`` is an error class (``PeerLostError``) or an OpenAI error type."""

    type: Annotated[str, Meta(max_length=MAX_ID_CHARS)]
    message: Text


class ErrorBody(Message, kw_only=True):
    """Every non-200 answer: OpenAI's ``{"error": {"type", "message"}}``."""

    error: ErrorInfo


# -- every worker: what it is, what it holds -----------------------------------------------


class PrefixCacheInfo(Message, kw_only=True):
    """A worker's prefix cache: block size and salt (prefixes compare only where both
    match) and how full it is."""

    block_tokens: Annotated[int, Meta(ge=1)]
    salt: Annotated[str, Meta(max_length=MAX_ID_CHARS)]
    capacity_bytes: Count
    used_bytes: Count
    entries: Count


class WorkerHealth(Struct, kw_only=True):
    """``GET /health`` of a kvwire-serve process, as the router reads it to know what it
    is. Not strict: a router's answer says more (its pools, why it is degraded), and a
    newer worker may say more; what is not here is not read."""

    status: Annotated[str, Meta(max_length=64)]
    role: Annotated[str, Meta(max_length=64)]
    model: Text = ""
    architecture: Text | None = None
    dtype: Annotated[str, Meta(max_length=64)] | None = None
    layout_fingerprint: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    kv_address: Address | None = None
    max_model_len: Annotated[int, Meta(ge=1)] | None = None
    prefix_cache: PrefixCacheInfo | None = None


class WorkerState(Message, kw_only=True):
    """``GET /internal/state``: the prefix blocks a worker holds (hashes) and its links as
    its Senders or Receiver measure them; the router's control loop polls it."""

    prefix_blocks: Annotated[list[Annotated[str, Meta(max_length=MAX_ID_CHARS)]], Meta(max_length=1 << 22)] = []
    prefix_cache: PrefixCacheInfo | None = None
    peers: Annotated[list[PeerMetrics], Meta(max_length=1 << 16)] = []


# -- prefill worker --------------------------------------------------------------------------


class TokenizeRequest(Message, kw_only=True):
    """``POST /internal/tokenize``: a completion's prompt (text or token ids) or a chat's
    messages (checked on the OpenAI surface; the worker applies its chat template)."""

    prompt: Text | TokenIds | None = None
    messages: Annotated[list[dict], Meta(max_length=MAX_PROMPT_TOKENS)] | None = None


class TokenizeResult(Message, kw_only=True):
    prompt_token_ids: TokenIds


class ProbeRequest(Message, kw_only=True):
    """``POST /internal/probe``: can this prefill worker send KV to ``kv_address``?"""

    kv_address: Address
    timeout_s: Seconds | None = None


class ProbeResult(Message, kw_only=True):
    """The handshake succeeded (``ok``), or ``error`` says why not."""

    ok: bool = False
    error: ErrorInfo | None = None


class PrefillJob(Message, kw_only=True):
    """``POST /internal/prefill``: run the prompt and stream the KV the decode worker lacks
    (from token ``decode_cached_tokens``) to ``kv_address``; with ``send_boundary``, the
    states at the last cacheable boundary follow under ``request_id + "/boundary"``."""

    request_id: RequestId
    prompt: Text | TokenIds
    kv_address: Address
    sampling: SamplingParams = SamplingParams()
    logprobs: NumLogprobs | None = None
    timeout_s: Seconds | None = None
    decode_cached_tokens: Count = 0
    send_boundary: bool = False


class PrefixReport(Message, kw_only=True):
    """How much of the prompt the prefill worker reused, computed and sent."""

    reused_tokens: Count
    computed_tokens: Count
    boundary_tokens: Count
    sent_from_token: Count
    boundary_sent: bool


class KVReport(Message, kw_only=True):
    """What moving the KV cost, and the link's signals as the sender saw them."""

    raw_bytes: Count
    wire_bytes: Count
    layers: Count
    transfer_s: float
    after_prefill_s: float
    goodput_bps: float
    link_goodput_bps: float | None = None
    rtt_ms: float | None = None
    retransmits: int | None = None


class PrefillResult(Message, kw_only=True):
    """The prefill worker's answer: the first token (and the random stream's state after
    drawing it, base64), and what the prefill and the transfer took."""

    request_id: RequestId
    prompt_token_ids: TokenIds
    first_token: TokenId
    rng_state: Text | None = None
    first_logprobs: TokenLogprobs | None = None
    prefill_s: float
    prefix: PrefixReport
    kv: KVReport


# -- decode worker ---------------------------------------------------------------------------


class DecodeJob(Message, kw_only=True):
    """``POST /internal/decode``: decode a request prefilled elsewhere. ``first_token`` None
    (``kv_error`` says why) or a prefix that is gone: the worker recomputes the prefill,
    unless ``fallback`` is ``"error"``. ``cached_tokens`` and ``cached_hash`` name the prefix
    the KV continues; ``boundary_tokens`` the boundary states that follow."""

    request_id: RequestId
    prompt_token_ids: TokenIds
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS)]
    sampling: SamplingParams = SamplingParams()
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]],
                    Meta(max_length=MAX_STOP_STRINGS)] = []
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_STRINGS)] = []
    logprobs: NumLogprobs | None = None
    first_logprobs: TokenLogprobs | None = None
    echo: bool = False
    fallback: Literal["recompute", "error"] = "recompute"
    first_token: TokenId | None = None
    rng_state: Text | None = None
    kv_error: Text | None = None
    cached_tokens: Count = 0
    cached_hash: Annotated[str, Meta(max_length=MAX_ID_CHARS)] | None = None
    boundary_tokens: Count = 0
    timeout_s: Seconds | None = None


class LogprobsLine(Message, kw_only=True):
    """One token's logprobs with token strings as vLLM writes them."""

    token: Text
    logprob: float
    top: Annotated[list[tuple[Text, float]], Meta(max_length=MAX_LOGPROBS)]


class StreamEvent(Message, tag_field="event"):
    """One NDJSON line of a decode worker's answer: a start, tokens, then an end or a failure."""


class DecodeStarted(StreamEvent, tag="start", kw_only=True):
    """Where the cache came from (``transfer`` or ``recomputed``, and why) and what
    rebuilding it took; ``prompt_text`` for ``echo``."""

    kv_source: Literal["transfer", "recomputed"]
    kv_error: Text | None = None
    rebuild_s: float
    prompt_text: Text | None = None


class TokenEvent(StreamEvent, tag="token", kw_only=True):
    """One token and the text it settles (text that may begin a stop string waits)."""

    token: TokenId
    text: Text
    logprobs: LogprobsLine | None = None


class DecodeFinished(StreamEvent, tag="end", kw_only=True):
    finish_reason: Literal["stop", "length"]
    num_tokens: Count
    decode_s: float


class DecodeFailed(StreamEvent, tag="error", kw_only=True):
    """Decoding broke after the stream began (the status line was already sent)."""

    error: ErrorInfo


DecodeEvent = Union[DecodeStarted, TokenEvent, DecodeFinished, DecodeFailed]

_encoder = msgspec.json.Encoder()
_decoders: dict = {}


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes | str, kind):
    """``data`` as a ``kind`` (a Message class or DecodeEvent); BadRequest naming the field
    otherwise, so that a worker answers 400 and a router names what a worker got wrong."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid {_name(kind)}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"{_name(kind)} is not valid JSON: {exc}") from None


def _name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else "decode stream event"
