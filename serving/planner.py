"""The PrfaaS throughput model (arXiv 2604.15039) and the grid search over t and the PD split.

A deployment has ``N_prfaas`` PrfaaS prefill instances behind an egress link of ``B_out``
and ``pd_instances`` local PD instances, split into ``N_p`` prefill and ``N_d`` decode.
Requests whose (incremental) length exceeds ``t`` are prefilled on PrfaaS::

    p        = P(L > t),  l_long = E[L | L > t],  l_short = E[L | L <= t]
    Phi_kv(l)     = S_kv(l) / T_prefill(l)
    Theta_prfaas  = min(N_prfaas / T_prefill(l_long), B_out / S_kv(l_long))
    Theta_pd_p    = N_p / T_prefill_pd(l_short)
    Theta_pd_d    = N_d * BS_max / (T_decode * L_out)
    Lambda_max    = min(Theta_prfaas / p, Theta_pd_p / (1 - p), Theta_pd_d)

As in the paper, a class of requests is costed at its mean length (T(E[L]), not E[T(L)]).

Units everywhere inside: tokens, seconds, bytes, requests per second; the egress link is given
and reported in Gbps (1e9 bit/s). ``Plan.to_dict`` states the units of every field.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import msgspec
import numpy as np

from kvwire.errors import KVWireError

# Plausibility limits that catch a field given in the wrong unit (ms for s, bit/s for Gbps).
MAX_PREFILL_S = 3600.0
MAX_STEP_S = 10.0
MAX_EGRESS_GBPS = 100_000.0
GBPS = 1e9 / 8  # bytes per second in one Gbps


class PlanError(KVWireError, ValueError):
    """A profile, workload or plan request that the throughput model cannot evaluate."""


# ---------------------------------------------------------------- profiles


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


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Split:
    """The length distribution cut at t: the share and mean length of each side."""

    t: float
    p: float
    l_long: float
    l_short: float


class Workload(Protocol):
    min_tokens: float
    max_tokens: float

    def split(self, t: float) -> Split:
        """p, l_long, l_short at t; PlanError where t leaves one side empty."""

    def thresholds(self, lo: float, hi: float, num: int) -> list[int]:
        """Up to ``num`` candidate values of t in [lo, hi] for the grid search."""

    def describe(self) -> dict:
        """The workload's parameters and mean, for the plan's output."""


def _std_mass(a: float, b: float) -> float:
    """P(a < Z < b) for a standard normal Z, without cancellation in either tail."""
    if a >= 0:
        return 0.5 * (math.erfc(a / math.sqrt(2)) - math.erfc(b / math.sqrt(2)))
    return 0.5 * (math.erfc(-b / math.sqrt(2)) - math.erfc(-a / math.sqrt(2)))


def _one_sided(t: float, p: float) -> PlanError:
    side = "nothing is offloaded (p = 0): l_long" if p == 0 else "everything is offloaded (p = 1): l_short"
    return PlanError(f"t={t:g} puts every request on one side: {side} is undefined")


@dataclass(frozen=True)
class TruncatedLogNormal:
    """ln L ~ Normal(mu, sigma), truncated to [min_tokens, max_tokens].

    The moments are exact, in closed form through the normal CDF (math.erfc):
    for Z standard normal, E[L; a < L < b] = exp(mu + sigma^2/2) * P(alpha - sigma < Z < beta - sigma)
    with alpha, beta the standardised logs of a and b.
    """

    mu: float
    sigma: float
    min_tokens: float
    max_tokens: float

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and 0 < self.min_tokens < self.max_tokens):
            raise PlanError(f"lognormal needs sigma > 0 and 0 < min < max, got {self}")
        if self._mass(self.min_tokens, self.max_tokens, 0.0) <= 0:
            raise PlanError(f"lognormal(mu={self.mu}, sigma={self.sigma}) has no mass on [min, max]")

    def _z(self, x: float) -> float:
        return (math.log(x) - self.mu) / self.sigma

    def _mass(self, a: float, b: float, shift: float) -> float:
        return _std_mass(self._z(a) - shift, self._z(b) - shift)

    def _mean_between(self, a: float, b: float) -> float:
        scale = math.exp(self.mu + self.sigma**2 / 2)
        return scale * self._mass(a, b, self.sigma) / self._mass(a, b, 0.0)

    def split(self, t: float) -> Split:
        lo, hi = self.min_tokens, self.max_tokens
        p = 1.0 if t <= lo else 0.0 if t >= hi else self._mass(t, hi, 0.0) / self._mass(lo, hi, 0.0)
        if not 0 < p < 1:
            raise _one_sided(t, p)
        return Split(t, p, self._mean_between(t, hi), self._mean_between(lo, t))

    def mean(self) -> float:
        return self._mean_between(self.min_tokens, self.max_tokens)

    def thresholds(self, lo: float, hi: float, num: int) -> list[int]:
        lo, hi = max(lo, self.min_tokens + 1), min(hi, self.max_tokens - 1)
        grid = np.geomspace(lo, hi, num) if lo < hi else np.array([lo])
        return sorted({int(round(x)) for x in grid})

    def describe(self) -> dict:
        return {"kind": "lognormal", "mu": self.mu, "sigma": self.sigma, "min_tokens": self.min_tokens,
                "max_tokens": self.max_tokens, "mean_tokens": self.mean(), "moments": "exact (normal CDF via erfc)"}


class EmpiricalLengths:
    """A measured list of request lengths; each request weighs the same."""

    def __init__(self, lengths: Sequence[float]) -> None:
        values = np.sort(np.asarray(lengths, dtype=np.float64))
        if values.ndim != 1:
            raise PlanError(f"empirical lengths must be a flat list, got shape {values.shape}")
        if values.size == 0:
            raise PlanError("the empirical workload has no lengths")
        if not np.all(np.isfinite(values)) or values[0] <= 0:
            raise PlanError("empirical lengths must be finite and > 0")
        self.lengths = values
        self.cumsum = np.cumsum(values)
        self.min_tokens, self.max_tokens = float(values[0]), float(values[-1])

    def split(self, t: float) -> Split:
        n = self.lengths.size
        num_short = int(np.searchsorted(self.lengths, t, side="right"))
        p = (n - num_short) / n
        if not 0 < p < 1:
            raise _one_sided(t, p)
        short_sum = float(self.cumsum[num_short - 1])
        return Split(t, p, (float(self.cumsum[-1]) - short_sum) / (n - num_short), short_sum / num_short)

    def thresholds(self, lo: float, hi: float, num: int) -> list[int]:
        # p only changes at sample values, so the distinct samples (but the largest) are exact candidates.
        distinct = np.unique(self.lengths[:-1])
        distinct = distinct[(distinct >= lo) & (distinct <= hi) & (distinct < self.max_tokens)]
        if distinct.size > num:
            distinct = distinct[np.unique(np.linspace(0, distinct.size - 1, num).round().astype(int))]
        return [int(x) for x in distinct]

    def describe(self) -> dict:
        return {"kind": "empirical", "num_requests": int(self.lengths.size), "min_tokens": self.min_tokens,
                "max_tokens": self.max_tokens, "mean_tokens": float(self.cumsum[-1] / self.lengths.size)}


def parse_tokens(text: str) -> float:
    """A token count, with an optional K (1024) or M (1024**2) suffix: "128K"."""
    scale = {"k": 1024, "m": 1024**2}.get(text[-1:].lower(), 1)
    return float(text[:-1] if scale > 1 else text) * scale


def parse_workload(spec: str) -> Workload:
    """``lognormal:mu=..,sigma=..,min=..,max=..`` or ``file:PATH`` (JSON list, or one length a line)."""
    kind, _, rest = spec.partition(":")
    if kind == "file":
        return load_lengths(rest)
    if kind != "lognormal":
        raise PlanError(f"unknown workload {spec!r}: expected lognormal:mu=..,sigma=..,min=..,max=.. or file:PATH")
    try:
        params = dict(item.split("=", 1) for item in rest.split(","))
        if sorted(params) != ["max", "min", "mu", "sigma"]:
            raise ValueError(f"needs exactly mu, sigma, min, max; got {sorted(params)}")
        return TruncatedLogNormal(float(params["mu"]), float(params["sigma"]), parse_tokens(params["min"]),
                                  parse_tokens(params["max"]))
    except ValueError as exc:
        raise PlanError(f"bad workload {spec!r}: {exc}") from None


def load_lengths(path: str) -> EmpiricalLengths:
    with open(path) as f:
        text = f.read()
    try:
        if text.lstrip().startswith("["):
            lengths = json.loads(text)
        else:
            lengths = [float(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return EmpiricalLengths(lengths)
    except (ValueError, TypeError) as exc:
        raise PlanError(f"{path}: not a list of lengths: {exc}") from None


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Plan:
    """One configuration (t, N_p, N_d) and what the model says it sustains."""

    t: int
    p: float
    l_long: float
    l_short: float
    n_p: int
    n_d: int
    theta_prfaas: float
    theta_pd_p: float
    theta_pd_d: float
    lambda_max: float
    egress_gbps_needed: float
    egress_gbps: float
    phi_kv_gbps: float
    prfaas_limited_by: str
    bottleneck: str

    def prefill_capacity(self) -> float:
        """The offered load the two prefill sides sustain together, ignoring decode."""
        return min(self.theta_prfaas / self.p, self.theta_pd_p / (1 - self.p))

    def to_dict(self) -> dict:
        return {**asdict(self), "units": UNITS}


UNITS = {
    "t": "tokens", "l_long": "tokens", "l_short": "tokens", "p": "fraction of requests",
    "theta_prfaas": "requests/s", "theta_pd_p": "requests/s", "theta_pd_d": "requests/s",
    "lambda_max": "requests/s", "n_p": "instances", "n_d": "instances",
    "egress_gbps_needed": "Gbps (1e9 bit/s), PrfaaS egress at lambda_max", "egress_gbps": "Gbps, link capacity",
    "phi_kv_gbps": "Gbps, one PrfaaS instance prefilling l_long", "kv_bytes": "bytes", "prefill_s": "seconds",
}


def evaluate(profile: Profile, workload: Workload, t: float, n_p: int) -> Plan:
    """The model at one threshold ``t`` and one split ``n_p`` + ``pd_instances - n_p``."""
    n_d = profile.pd_instances - n_p
    if n_p < 1 or n_d < 1:
        raise PlanError(f"n_p={n_p} leaves n_d={n_d}: both need >= 1 of pd_instances={profile.pd_instances}")
    return _evaluate(profile, workload.split(t), n_p)


def _evaluate(profile: Profile, split: Split, n_p: int) -> Plan:
    prfaas, decode = profile.prfaas, profile.pd_decode
    n_d = profile.pd_instances - n_p
    kv_long = prfaas.kv_bytes(split.l_long)
    compute = prfaas.instances / prfaas.prefill_s(split.l_long)
    egress = profile.egress_gbps * GBPS / kv_long
    theta_prfaas = min(compute, egress)
    theta_pd_p = n_p / profile.pd_prefill.prefill_s(split.l_short)
    theta_pd_d = n_d * decode.batch_max / (decode.step_s * decode.output_tokens)
    limits = {"prfaas": theta_prfaas / split.p, "pd_prefill": theta_pd_p / (1 - split.p), "pd_decode": theta_pd_d}
    bottleneck = min(limits, key=limits.__getitem__)
    lambda_max = limits[bottleneck]
    return Plan(
        t=int(round(split.t)), p=split.p, l_long=split.l_long, l_short=split.l_short, n_p=n_p, n_d=n_d,
        theta_prfaas=theta_prfaas, theta_pd_p=theta_pd_p, theta_pd_d=theta_pd_d, lambda_max=lambda_max,
        egress_gbps_needed=lambda_max * split.p * kv_long / GBPS, egress_gbps=profile.egress_gbps,
        phi_kv_gbps=prfaas.phi_kv(split.l_long) / GBPS,
        prfaas_limited_by="compute" if compute <= egress else "egress", bottleneck=bottleneck,
    )


def _rank(plan: Plan) -> tuple[float, float]:
    # Among equal throughputs (decode-bound), prefer the t that balances the two prefill sides.
    return plan.lambda_max, plan.prefill_capacity()


def _best_over(profile: Profile, workload: Workload, thresholds: Sequence[int]) -> Plan | None:
    best = None
    for t in thresholds:
        split = workload.split(t)
        for n_p in range(1, profile.pd_instances):
            plan = _evaluate(profile, split, n_p)
            if best is None or _rank(plan) > _rank(best):
                best = plan
    return best


def best_at(profile: Profile, workload: Workload, t: float) -> Plan:
    """The best split N_p + N_d at a given threshold t."""
    split = workload.split(t)
    plans = [_evaluate(profile, split, n_p) for n_p in range(1, profile.pd_instances)]
    return max(plans, key=_rank)


def search(profile: Profile, workload: Workload, num_thresholds: int = 256) -> Plan:
    """The (t, N_p) that maximise Lambda_max: a coarse grid of t, then a fine one around the best.

    Every split N_p + N_d = pd_instances is tried at every t. Ties on Lambda_max are broken by
    the larger prefill capacity (which picks the t balancing Theta_prfaas/p and
    Theta_pd_p/(1-p)), then by the first found (smaller t, then smaller N_p).
    """
    if num_thresholds < 2:
        raise PlanError(f"num_thresholds must be >= 2, got {num_thresholds}")
    coarse = workload.thresholds(workload.min_tokens, workload.max_tokens, num_thresholds)
    best = _best_over(profile, workload, coarse)
    if best is None:
        raise PlanError("the workload has a single length: no threshold splits it")
    i = coarse.index(best.t)
    fine = workload.thresholds(coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)], num_thresholds)
    refined = _best_over(profile, workload, fine)
    return refined if refined is not None and _rank(refined) > _rank(best) else best


@dataclass(frozen=True)
class LocalOnly:
    """The homogeneous-PD baseline: no PrfaaS, every request prefilled locally (p = 0)."""

    n_p: int
    n_d: int
    lambda_max: float


def all_local(profile: Profile, mean_tokens: float) -> LocalOnly:
    """The best split of the PD instances when nothing is offloaded (the paper's baseline)."""
    decode = profile.pd_decode
    per_decode = decode.batch_max / (decode.step_s * decode.output_tokens)
    per_prefill = 1 / profile.pd_prefill.prefill_s(mean_tokens)
    options = [LocalOnly(n_p, profile.pd_instances - n_p,
                         min(n_p * per_prefill, (profile.pd_instances - n_p) * per_decode))
               for n_p in range(1, profile.pd_instances)]
    return max(options, key=lambda o: o.lambda_max)
