"""What a deployment can do, as measured: prefill time and KV size against prompt length on
each side, decode step time and batch, the links; read from JSON and checked field by
field (a value in the wrong unit is refused, not planned with).

Why the limits: a field given in ms where seconds belong, or bit/s where Gbps belong, is
off by 1e3-1e9 and would plan nonsense without a word.
"""

from __future__ import annotations

from bisect import bisect_right

import msgspec

from ..errors import PlanError

# Plausibility limits that catch a field given in the wrong unit (ms for s, bit/s for Gbps).
MAX_PREFILL_S = 3600.0
MAX_STEP_S = 10.0
MAX_EGRESS_GBPS = 100_000.0
GBPS = 1e9 / 8  # bytes per second in one Gbps


class Point(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One measured prefill: ``tokens`` prompt tokens took ``prefill_s`` and produced ``kv_bytes``."""

    tokens: int
    prefill_s: float
    kv_bytes: int

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.prefill_s <= 0 or self.kv_bytes <= 0:
            raise ValueError(f"tokens, prefill_s and kv_bytes must be > 0, got {self}")
        if self.prefill_s > MAX_PREFILL_S:
            raise ValueError(f"prefill_s={self.prefill_s} is over an hour: prefill_s is in seconds, not ms")


class PrefillProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prefill time and KV size as functions of prompt length, from measured points.

    Between points both are interpolated linearly in tokens; outside the measured range they
    are extrapolated along the nearest segment (the first two or the last two points), so at
    least two points are needed. Extrapolation that reaches zero or below is an error.
    """

    points: list[Point]

    def __post_init__(self) -> None:
        if len(self.points) < 2:
            raise ValueError(f"a prefill profile needs at least 2 points, got {len(self.points)}")
        tokens = [pt.tokens for pt in self.points]
        if any(a >= b for a, b in zip(tokens, tokens[1:])):
            raise ValueError(f"points must be sorted by strictly increasing tokens, got {tokens}")

    def prefill_s(self, tokens: float) -> float:
        return self._interpolate(tokens, "prefill_s")

    def kv_bytes(self, tokens: float) -> float:
        return self._interpolate(tokens, "kv_bytes")

    def phi_kv(self, tokens: float) -> float:
        """Phi_kv(l): the KV bytes per second one instance emits while prefilling l tokens."""
        return self.kv_bytes(tokens) / self.prefill_s(tokens)

    def _interpolate(self, tokens: float, field: str) -> float:
        i = min(max(bisect_right([pt.tokens for pt in self.points], tokens), 1), len(self.points) - 1)
        lo, hi = self.points[i - 1], self.points[i]
        y0, y1 = getattr(lo, field), getattr(hi, field)
        value = y0 + (y1 - y0) * (tokens - lo.tokens) / (hi.tokens - lo.tokens)
        if value <= 0:
            raise PlanError(f"the profile extrapolates {field} to {value:.4g} at {tokens:.0f} tokens; "
                            f"measure a point nearer that length")
        return value


class PrfaasProfile(PrefillProfile, frozen=True, forbid_unknown_fields=True):
    """The PrfaaS cluster: ``instances`` identical prefill instances."""

    instances: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")


class DecodeProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A decode instance runs up to ``batch_max`` requests at ``step_s`` per token each."""

    batch_max: int
    step_s: float
    output_tokens: int

    def __post_init__(self) -> None:
        if self.batch_max < 1 or self.output_tokens < 1 or self.step_s <= 0:
            raise ValueError(f"batch_max and output_tokens must be >= 1 and step_s > 0, got {self}")
        if self.step_s > MAX_STEP_S:
            raise ValueError(f"step_s={self.step_s} is over {MAX_STEP_S} s: step_s is in seconds, not ms")


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A deployment profile, in the JSON format of issue 6 (see examples/profiles/)."""

    prfaas: PrfaasProfile
    pd_prefill: PrefillProfile
    pd_decode: DecodeProfile
    pd_instances: int
    egress_gbps: float

    def __post_init__(self) -> None:
        if self.pd_instances < 2:
            raise ValueError(f"pd_instances must be >= 2 (one prefill and one decode at least), "
                             f"got {self.pd_instances}")
        if not 0 < self.egress_gbps <= MAX_EGRESS_GBPS:
            raise ValueError(f"egress_gbps must be in (0, {MAX_EGRESS_GBPS:g}] Gbps, got {self.egress_gbps:g}"
                             " (is it in bit/s?)")


def parse_profile(data: bytes | str) -> Profile:
    """Decode and validate a profile; errors name the offending JSON path."""
    try:
        return msgspec.json.decode(data, type=Profile)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise PlanError(f"invalid profile: {exc}") from None


def load_profile(path: str) -> Profile:
    with open(path, "rb") as f:
        try:
            return parse_profile(f.read())
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None
