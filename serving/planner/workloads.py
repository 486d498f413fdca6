"""How long the prompts are: a truncated log-normal or lengths seen in a trace, and the
split of their mass at a threshold t (the share p of requests above it and each side's
mean length), which is all the throughput model needs of them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..errors import PlanError


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
