"""``kvwire-plan``: the PrfaaS throughput model on a profile and a workload (see serving.planner).

    kvwire-plan --profile examples/profiles/kimi-linear-1t-h200.json \\
        --workload lognormal:mu=9.90,sigma=1.00,min=128,max=128K --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import msgspec

from .errors import PlanError
from .planner import (
    Profile,
    all_local,
    best_at,
    evaluate,
    load_profile,
    parse_tokens,
    parse_workload,
    search,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvwire-plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The PrfaaS throughput model on a profile and a workload: the offload threshold t\nand the "
                    "PrfaaS/PD split that maximise requests/s.",
        epilog="example:\n  kvwire-plan --profile examples/profiles/kimi-linear-1t-h200.json \\\n"
               "      --workload lognormal:mu=9.90,sigma=1.00,min=128,max=128K --json")
    parser.add_argument("--profile", required=True, metavar="JSON",
                        help="a deployment profile, as 'kvwire-serve profile' writes it: prfaas {instances, points}, "
                             "pd_prefill {points}, pd_decode {batch_max, step_s, output_tokens}, pd_instances, "
                             "egress_gbps; points are measured {tokens, prefill_s, kv_bytes} "
                             "(example: examples/profiles/kimi-linear-1t-h200.json)")
    parser.add_argument("--workload", required=True,
                        help="lognormal:mu=..,sigma=..,min=..,max=.. (K/M suffixes) or file:PATH")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threshold", type=parse_tokens,
                        help="evaluate this t (tokens, K/M suffixes) instead of searching for it")
    parser.add_argument("--n-prefill", type=int, help="with --threshold: use this N_p instead of the best")
    parser.add_argument("--egress-gbps", type=float, help="override the profile's egress link capacity (Gbit/s)")
    parser.add_argument("--num-thresholds", type=int, default=256, help="grid points of t per pass (default 256)")
    return parser


def _with_egress(profile: Profile, egress_gbps: float) -> Profile:
    try:
        return msgspec.structs.replace(profile, egress_gbps=egress_gbps)  # reruns the profile's checks
    except ValueError as exc:
        raise PlanError(f"--egress-gbps: {exc}") from None


def plan(args: argparse.Namespace) -> dict:
    """Run the planner for parsed arguments and return the JSON-ready result."""
    profile = load_profile(args.profile)
    if args.egress_gbps is not None:
        profile = _with_egress(profile, args.egress_gbps)
    workload = parse_workload(args.workload)
    if args.threshold is None:
        if args.n_prefill is not None:
            raise PlanError("--n-prefill needs --threshold")
        result = search(profile, workload, args.num_thresholds)
    elif args.n_prefill is None:
        result = best_at(profile, workload, args.threshold)
    else:
        result = evaluate(profile, workload, args.threshold, args.n_prefill)
    described = workload.describe()
    baseline = all_local(profile, described["mean_tokens"])
    return {**result.to_dict(), "workload": described,
            "all_local": {"n_p": baseline.n_p, "n_d": baseline.n_d, "lambda_max": baseline.lambda_max},
            "speedup_vs_all_local": result.lambda_max / baseline.lambda_max}


def _text(out: dict) -> str:
    units = out["units"]
    rows = [f"{key:20} {value:.6g} {units.get(key, '')}" if isinstance(value, float) else f"{key:20} {value} "
            f"{units.get(key, '')}" for key, value in out.items() if key not in ("units", "workload", "all_local")]
    rows.append(f"{'all_local':20} lambda_max {out['all_local']['lambda_max']:.6g} requests/s "
                f"(n_p={out['all_local']['n_p']}, n_d={out['all_local']['n_d']})")
    rows.append(f"{'workload':20} {json.dumps(out['workload'])}")
    return "\n".join(row.rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        out = plan(args)
    except (PlanError, OSError) as exc:
        print(f"kvwire-plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else _text(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
