"""The throughput model at one (t, N_p) and the grid search over both; the all-local
baseline it is compared with."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import PlanError
from .profiles import GBPS, Profile
from .workloads import Split, Workload


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
