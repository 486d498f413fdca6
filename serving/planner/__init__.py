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

from .profiles import (
    GBPS,
    MAX_EGRESS_GBPS,
    MAX_PREFILL_S,
    MAX_STEP_S,
    DecodeProfile,
    Point,
    PrefillProfile,
    PrfaasProfile,
    Profile,
    load_profile,
    parse_profile,
)
from .search import UNITS, LocalOnly, Plan, all_local, best_at, evaluate, search
from .workloads import EmpiricalLengths, Split, TruncatedLogNormal, Workload, load_lengths, parse_tokens, parse_workload

__all__ = ["GBPS", "MAX_EGRESS_GBPS", "MAX_PREFILL_S", "MAX_STEP_S", "UNITS", "DecodeProfile", "EmpiricalLengths",
           "LocalOnly", "Plan", "Point", "PrefillProfile", "PrfaasProfile", "Profile", "Split", "TruncatedLogNormal",
           "Workload", "all_local", "best_at", "evaluate", "load_lengths", "load_profile", "parse_profile",
           "parse_tokens", "parse_workload", "search"]
