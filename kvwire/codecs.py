"""KV codecs for the wire: none (bit-exact), fp8 (e4m3), int8 and int4, on the CPU.

Every lossy codec works on a per-token tensor seen as ``(tokens, heads, dim)``: "head"
is the second-to-last axis of the layout shape (earlier axes fold into it), "dim" the
last. Fixed-size tensors (linear-attention and conv state) and tensors that are not
float16/bfloat16/float32 always travel lossless.

- ``fp8``: one float32 scale per block of ``block_tokens`` (16) tokens per head,
  ``scale = max|x| / 448``; codes are ``round_to_e4m3(x / scale)`` (round half to even).
  Error bound: ``|x - x'| <= scale * 2**-4 * 2**e`` where ``2**e <= |x / scale|``, i.e.
  half an e4m3 step at the value's magnitude; values below ``scale * 2**-6`` are
  subnormal with absolute error ``<= scale * 2**-10``.
- ``int8``: one float16 scale per token per head, ``scale = max|x| / 127``;
  ``code = round(x / scale)`` clamped to [-127, 127]. Error ``<= scale / 2`` (plus the
  float16 rounding of the scale, which the codes already account for).
- ``int4``: one float16 scale per ``group`` (128) values along dim, ``scale = max|x| / 7``;
  ``code = round(x / scale)`` clamped to [-7, 7], two codes per byte (even index in the low
  nibble). Error ``<= scale / 2``.

The arithmetic below is written so that every step is exact or a single IEEE float32
operation; the CUDA kernels in kvwire/cuda/ perform the same steps and produce the same
codes bit for bit. NaN or Inf in the input is refused (ValueError): a scale computed
from it would silently turn the whole block into garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FP8_MAX = 448.0
FP8_BLOCK_TOKENS = 16
INT4_GROUP = 128
LOSSY_DTYPES = ("float32", "float16", "bfloat16")


# -- exact float conversions shared by encoders and decoders ------------------------------


def rint_half_even(x: np.ndarray) -> np.ndarray:
    return np.rint(x)


def bits_to_float32(flat: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of raw bf16/f16/f32 data (exact: each converts losslessly)."""
    if dtype == "float32":
        return flat.view(np.float32)
    if dtype == "bfloat16":
        return (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return flat.view(np.float16).astype(np.float32)
    raise ValueError(f"no float view of {dtype}")


def float32_to_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """Raw bits of ``values`` rounded (half to even) to ``dtype``, as a flat uint8 array."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if dtype == "float32":
        return values.view(np.uint8)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint8)
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        return rounded.astype(np.uint16).view(np.uint8)
    raise ValueError(f"cannot convert float32 to {dtype}")


def float32_to_e4m3(q: np.ndarray) -> np.ndarray:
    """e4m3fn codes of finite values with |q| <= 448, rounded half to even (as uint8).

    Normal range: keep the top 3 mantissa bits of the float32 and round on the other 20
    (a carry rolls into the exponent). Below 2**-6: multiples of 2**-9, by exact scaling.
    """
    q = np.asarray(q, dtype=np.float32)
    bits = q.view(np.uint32)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    code = magnitude >> np.uint32(20)
    code -= np.uint32(120 << 3)  # rebias the exponent (wraps below 2**-6; those are redone below)
    rest = magnitude & np.uint32(0xFFFFF)
    round_up = rest > 0x80000
    round_up |= (rest == 0x80000) & (code & np.uint32(1)).astype(bool)
    code += round_up
    small = magnitude < np.uint32(121 << 23)  # |q| < 2**-6: multiples of 2**-9, by exact scaling
    if small.any():
        code[small] = np.rint(np.abs(q[small]) * np.float32(512.0)).astype(np.uint32)
    code |= (bits >> np.uint32(24)) & np.uint32(0x80)
    return code.astype(np.uint8)


def _e4m3_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0xF, code & 0x7
        if exp == 15 and man == 7:
            table[code] = np.nan
        elif exp == 0:
            table[code] = sign * man * 2.0**-9
        else:
            table[code] = sign * (1 + man / 8) * 2.0 ** (exp - 7)
    return table


E4M3_VALUES = _e4m3_table()


def round_to_float16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded (half to even) to float16 precision, back in float32."""
    return values.astype(np.float16).astype(np.float32)


# -- codecs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One wire array of an encoded tensor: codes or scales."""

    suffix: str
    shape: tuple[int, ...]
    dtype: str


def _check_finite(amax: np.ndarray, where: str) -> None:
    if not np.all(np.isfinite(amax)):
        raise ValueError(f"{where}: NaN or Inf in the input; a lossy codec cannot scale it (use codec='none')")


class Codec:
    """A lossy encoding of a (tokens, heads, dim) float tensor into wire parts."""

    name = "base"
    wire_rank = 0  # order of lossiness for codec="auto": lower is closer to the original

    def parts(self, tokens: int, heads: int, dim: int) -> list[Part]:
        raise NotImplementedError

    def encode(self, x: np.ndarray, where: str = "input") -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, parts: list[np.ndarray], tokens: int, heads: int, dim: int) -> np.ndarray:
        raise NotImplementedError

    def check(self, heads: int, dim: int, where: str) -> None:
        """Raise ValueError if a tensor of this geometry cannot use the codec."""


class Fp8Codec(Codec):
    name, wire_rank = "fp8", 2

    def __init__(self, block_tokens: int = FP8_BLOCK_TOKENS):
        self.block_tokens = block_tokens

    def parts(self, tokens, heads, dim):
        blocks = -(-tokens // self.block_tokens)
        return [Part("", (tokens, heads, dim), "uint8"), Part(".scales", (blocks, heads), "float32")]

    def _block_amax(self, x: np.ndarray) -> np.ndarray:
        tokens, heads, dim = x.shape
        blocks = -(-tokens // self.block_tokens)
        padded = np.zeros((blocks * self.block_tokens, heads, dim), dtype=np.float32)
        padded[:tokens] = np.abs(x)
        return padded.reshape(blocks, self.block_tokens, heads, dim).max(axis=(1, 3))

    def encode(self, x, where="input"):
        tokens, heads, dim = x.shape
        amax = self._block_amax(x) if tokens else np.zeros((0, heads), np.float32)
        _check_finite(amax, where)
        scales = (amax / np.float32(FP8_MAX)).astype(np.float32)
        per_token = np.repeat(np.where(scales == 0, np.float32(1), scales), self.block_tokens, axis=0)[:tokens]
        q = np.clip(x / per_token[:, :, None], -FP8_MAX, FP8_MAX)
        return [float32_to_e4m3(q), scales]

    def decode(self, parts, tokens, heads, dim):
        codes, scales = parts
        per_token = np.repeat(scales, self.block_tokens, axis=0)[:tokens]
        return E4M3_VALUES[codes] * per_token[:, :, None]


class Int8Codec(Codec):
    name, wire_rank = "int8", 1

    def parts(self, tokens, heads, dim):
        return [Part("", (tokens, heads, dim), "int8"), Part(".scales", (tokens, heads), "float16")]

    def encode(self, x, where="input"):
        amax = np.abs(x).max(axis=2) if x.shape[2] else np.zeros(x.shape[:2], np.float32)
        _check_finite(amax, where)
        scales = round_to_float16(amax / np.float32(127))
        if not np.all(np.isfinite(scales)):
            raise ValueError(f"{where}: values too large for an int8 float16 scale (max |x| {amax.max():.3g})")
        q = x / np.where(scales == 0, np.float32(1), scales)[:, :, None]
        codes = np.clip(rint_half_even(q), -127, 127).astype(np.int8)
        return [codes, scales.astype(np.float16)]

    def decode(self, parts, tokens, heads, dim):
        codes, scales = parts
        return codes.astype(np.float32) * scales.astype(np.float32)[:, :, None]


class Int4Codec(Codec):
    name, wire_rank = "int4", 3

    def __init__(self, group: int = INT4_GROUP):
        self.group = group

    def _group(self, dim: int) -> int:
        return min(self.group, dim)

    def check(self, heads, dim, where):
        group = self._group(dim)
        if dim % 2 or (group and dim % group):
            raise ValueError(f"{where}: int4 needs an even last dimension divisible by its group ({group}), got {dim}")

    def parts(self, tokens, heads, dim):
        group = self._group(dim)
        return [
            Part("", (tokens, heads, dim // 2), "uint8"),
            Part(".scales", (tokens, heads, dim // group if group else 0), "float16"),
        ]

    def encode(self, x, where="input"):
        tokens, heads, dim = x.shape
        self.check(heads, dim, where)
        group = self._group(dim)
        grouped = x.reshape(tokens, heads, dim // group, group)
        amax = np.abs(grouped).max(axis=3) if tokens * heads else np.zeros((tokens, heads, dim // group), np.float32)
        _check_finite(amax, where)
        scales = round_to_float16(amax / np.float32(7))
        if not np.all(np.isfinite(scales)):
            raise ValueError(f"{where}: values too large for an int4 float16 scale (max |x| {amax.max():.3g})")
        q = grouped / np.where(scales == 0, np.float32(1), scales)[..., None]
        codes = np.clip(rint_half_even(q), -7, 7).astype(np.int8).reshape(tokens, heads, dim)
        nibbles = codes.view(np.uint8) & np.uint8(0x0F)
        packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << np.uint8(4))
        return [packed, scales.astype(np.float16)]

    def decode(self, parts, tokens, heads, dim):
        packed, scales = parts
        group = self._group(dim)
        low = (packed & 0x0F).astype(np.int8)
        high = (packed >> 4).astype(np.int8)
        codes = np.empty((tokens, heads, dim), dtype=np.int8)
        codes[..., 0::2] = np.where(low > 7, low - 16, low)
        codes[..., 1::2] = np.where(high > 7, high - 16, high)
        values = codes.astype(np.float32).reshape(tokens, heads, dim // group, group)
        return (values * scales.astype(np.float32)[..., None]).reshape(tokens, heads, dim)


CODECS: dict[str, Codec | None] = {"none": None, "int8": Int8Codec(), "fp8": Fp8Codec(), "int4": Int4Codec()}


def get_codec(name: str) -> Codec | None:
    """The codec called ``name`` (None for "none"); ValueError listing the known ones."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known codecs: {sorted(CODECS)} and 'auto'")
    return CODECS[name]


def geometry(spec_shape: tuple[int, ...]) -> tuple[int, int]:
    """(heads, dim) of a per-token tensor's layout shape."""
    if not spec_shape:
        return 1, 1
    return math.prod(spec_shape[:-1]), spec_shape[-1]


def encodes(codec: Codec | None, spec) -> bool:
    """Whether ``codec`` applies to a tensor of this spec (else it travels lossless)."""
    return codec is not None and spec.per_token and spec.dtype in LOSSY_DTYPES


def choose_codec(
    wire_bytes: dict[str, int], prefill_s: float, goodput_bps: float, headroom: float = 0.9
) -> tuple[str, str]:
    """The least lossy codec whose wire bytes the link carries as fast as prefill makes them.

    A prefill emits its KV over ``prefill_s`` seconds; layer-wise sending overlaps the
    transfer with it, so the link stops being the bottleneck once
    ``wire_bytes[codec] / prefill_s <= headroom * goodput``. Codecs are tried from the
    least lossy (none, int8, fp8, int4); if even int4 does not fit, int4 is chosen (the
    link is the bottleneck either way, and it is the smallest). With no goodput measured
    yet, "none": nothing justifies losing precision. Returns (codec, reason).
    """
    if prefill_s <= 0:
        raise ValueError(f"prefill_s must be positive, got {prefill_s}")
    if goodput_bps <= 0:
        return "none", "no goodput measured for this peer yet"
    link = headroom * goodput_bps / 8
    order = sorted(wire_bytes, key=lambda name: CODECS[name].wire_rank if CODECS[name] else 0)
    for name in order:
        rate = wire_bytes[name] / prefill_s
        if rate <= link:
            return (
                name,
                f"{rate * 8 / 1e9:.3g} Gbit/s of KV fits {headroom:.0%} of {goodput_bps / 1e9:.3g} Gbit/s goodput",
            )
    smallest = min(wire_bytes, key=wire_bytes.get)
    return (
        smallest,
        f"even {smallest} needs {wire_bytes[smallest] * 8 / prefill_s / 1e9:.3g} Gbit/s, more than {goodput_bps / 1e9:.3g}",
    )
