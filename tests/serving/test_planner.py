"""The PrfaaS throughput model: hand-computed cases, exact log-normal moments, the grid search."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from serving import plan_cli
from serving.errors import PlanError
from serving.planner import (
    GBPS,
    EmpiricalLengths,
    TruncatedLogNormal,
    all_local,
    best_at,
    evaluate,
    load_lengths,
    parse_profile,
    parse_workload,
    search,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(ROOT, "examples", "profiles", "kimi-linear-1t-h200.json")
PAPER_WORKLOAD = "lognormal:mu=9.90,sigma=1.00,min=128,max=128K"


def tiny_profile(egress_gbps=8e-6, pd_instances=4, batch_max=10, prfaas_instances=2, **overrides) -> dict:
    """T_prfaas(l) = l/100 s, T_pd(l) = l/50 s, S_kv(l) = 10 l bytes; 10 req/s per decode instance."""
    profile = {
        "prfaas": {"instances": prfaas_instances, "points": [
            {"tokens": 100, "prefill_s": 1.0, "kv_bytes": 1000}, {"tokens": 200, "prefill_s": 2.0, "kv_bytes": 2000}]},
        "pd_prefill": {"points": [
            {"tokens": 100, "prefill_s": 2.0, "kv_bytes": 1000}, {"tokens": 200, "prefill_s": 4.0, "kv_bytes": 2000}]},
        "pd_decode": {"batch_max": batch_max, "step_s": 0.1, "output_tokens": 10},
        "pd_instances": pd_instances,
        "egress_gbps": egress_gbps,
    }
    profile.update(overrides)
    return profile


def profile_of(data: dict):
    return parse_profile(json.dumps(data))


# ---------------------------------------------------------------- profiles


def test_interpolation_and_extrapolation():
    prfaas = profile_of(tiny_profile()).prfaas
    assert prfaas.prefill_s(150) == pytest.approx(1.5)
    assert prfaas.prefill_s(50) == pytest.approx(0.5)  # below: along the first two points
    assert prfaas.kv_bytes(400) == pytest.approx(4000)  # above: along the last two points
    assert prfaas.phi_kv(400) == pytest.approx(1000)  # bytes/s


def test_extrapolation_to_zero_is_an_error():
    data = tiny_profile()
    data["pd_prefill"]["points"][1]["prefill_s"] = 0.5  # 2.0 s at 100, 0.5 s at 200: <= 0 from 233 tokens
    profile = profile_of(data)
    with pytest.raises(PlanError, match="extrapolates prefill_s"):
        profile.pd_prefill.prefill_s(300)


def test_sample_profile_matches_table_5():
    with open(SAMPLE, "rb") as f:
        profile = parse_profile(f.read())
    table5 = {1024: 3.61, 8192: 3.59, 32768: 3.19, 131072: 2.62}  # Phi_kv, Gbps
    for tokens, gbps in table5.items():
        assert profile.prfaas.phi_kv(tokens) / GBPS == pytest.approx(gbps, rel=0.01)
    assert profile.prfaas.kv_bytes(1024) == pytest.approx(190.8 * 2**20, abs=1)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["prfaas"].update(points=[]), "at least 2 points"),
    (lambda d: d["pd_prefill"].update(points=d["pd_prefill"]["points"][:1]), "at least 2 points"),
    (lambda d: d["prfaas"]["points"].reverse(), "strictly increasing"),
    (lambda d: d["prfaas"]["points"][0].update(kv_bytes=190.8), r"Expected `int`, got `float`"),
    (lambda d: d["prfaas"]["points"][0].update(kv_mib=190), "unknown field `kv_mib`"),
    (lambda d: d["prfaas"]["points"][1].update(prefill_s=7400.0), "not ms"),
    (lambda d: d["pd_decode"].update(step_s=25.0), "not ms"),
    (lambda d: d.update(egress_gbps=100e9), "bit/s"),
    (lambda d: d.update(pd_instances=1), "pd_instances must be >= 2"),
    (lambda d: d["prfaas"].pop("instances"), "missing required field `instances`"),
    (lambda d: d["pd_prefill"].update(instances=2), "unknown field `instances`"),
    (lambda d: d["prfaas"]["points"][0].update(prefill_s=0), "must be > 0"),
])
def test_bad_profiles_are_clear_errors(mutate, message):
    data = tiny_profile()
    mutate(data)
    with pytest.raises(PlanError, match=message):
        profile_of(data)


def test_error_names_the_json_path():
    data = tiny_profile()
    data["pd_decode"]["batch_max"] = "64"
    with pytest.raises(PlanError, match=r"\$\.pd_decode\.batch_max"):
        profile_of(data)


# ---------------------------------------------------------------- the formulas, by hand


def test_formulas_on_a_hand_computed_case():
    # Lengths 100, 100, 300, 500 cut at t=200: p = 1/2, l_long = 400, l_short = 100.
    profile = profile_of(tiny_profile())
    plan = evaluate(profile, EmpiricalLengths([100, 100, 300, 500]), t=200, n_p=1)
    assert (plan.p, plan.l_long, plan.l_short) == (0.5, 400, 100)
    # PrfaaS: compute 2 / T(400) = 2/4 = 0.5 req/s; egress 1000 B/s / S(400) = 1000/4000 = 0.25 req/s.
    assert plan.theta_prfaas == pytest.approx(0.25) and plan.prfaas_limited_by == "egress"
    assert plan.theta_pd_p == pytest.approx(1 / 2.0)  # N_p / T_pd(100)
    assert plan.theta_pd_d == pytest.approx(3 * 10 / (0.1 * 10))  # N_d * BS / (step * L_out)
    assert plan.lambda_max == pytest.approx(min(0.25 / 0.5, 0.5 / 0.5, 30.0)) and plan.bottleneck == "prfaas"
    # At lambda_max = 0.5 req/s, half are offloaded with 4000 B each: 1000 B/s, the whole link.
    assert plan.egress_gbps_needed == pytest.approx(1000 / GBPS)
    assert plan.phi_kv_gbps == pytest.approx(1000 / GBPS)
    assert (plan.n_p, plan.n_d) == (1, 3)


def test_compute_bound_prfaas_and_decode_bottleneck():
    profile = profile_of(tiny_profile(egress_gbps=1.0, batch_max=1))
    plan = evaluate(profile, EmpiricalLengths([100, 100, 300, 500]), t=200, n_p=3)
    assert plan.theta_prfaas == pytest.approx(0.5) and plan.prfaas_limited_by == "compute"
    assert plan.theta_pd_d == pytest.approx(1.0) and plan.theta_pd_p == pytest.approx(1.5)
    assert plan.lambda_max == pytest.approx(min(1.0, 3.0, 1.0))
    assert plan.to_dict()["units"]["lambda_max"] == "requests/s"


def test_one_sided_thresholds_are_errors():
    profile = profile_of(tiny_profile())
    lengths = EmpiricalLengths([100, 300, 500])
    with pytest.raises(PlanError, match=r"p = 0"):
        evaluate(profile, lengths, t=500, n_p=1)
    with pytest.raises(PlanError, match=r"p = 1"):
        evaluate(profile, lengths, t=99, n_p=1)
    lognormal = TruncatedLogNormal(9.9, 1.0, 128, 131072)
    with pytest.raises(PlanError, match=r"p = 0"):
        lognormal.split(131072)
    with pytest.raises(PlanError, match=r"p = 1"):
        lognormal.split(128)
    with pytest.raises(PlanError, match="both need >= 1"):
        evaluate(profile, lengths, t=200, n_p=4)


# ---------------------------------------------------------------- workloads


def numeric_split(mu, sigma, lo, hi, t, num=200_001):
    """p, l_long, l_short by trapezoidal integration over ln L (a check on the closed form)."""
    def mass_and_first_moment(a, b):
        x = np.linspace(math.log(a), math.log(b), num)
        pdf = np.exp(-0.5 * ((x - mu) / sigma) ** 2)
        return np.trapezoid(pdf, x), np.trapezoid(pdf * np.exp(x), x)
    m_short, s_short = mass_and_first_moment(lo, t)
    m_long, s_long = mass_and_first_moment(t, hi)
    return m_long / (m_short + m_long), s_long / m_long, s_short / m_short


@pytest.mark.parametrize("t", [200, 4096, 20000, 65536, 130000])
def test_truncated_lognormal_moments_match_numeric_integration(t):
    split = TruncatedLogNormal(9.9, 1.0, 128, 131072).split(t)
    p, l_long, l_short = numeric_split(9.9, 1.0, 128, 131072, t)
    assert split.p == pytest.approx(p, rel=1e-7)
    assert split.l_long == pytest.approx(l_long, rel=1e-7)
    assert split.l_short == pytest.approx(l_short, rel=1e-7)


def test_truncated_lognormal_against_monte_carlo():
    rng = np.random.default_rng(7)
    samples = np.exp(rng.normal(9.9, 1.0, 2_000_000))
    samples = samples[(samples >= 128) & (samples <= 131072)]
    dist, mc = TruncatedLogNormal(9.9, 1.0, 128, 131072), EmpiricalLengths(samples)
    assert dist.mean() == pytest.approx(samples.mean(), rel=0.005)
    assert dist.mean() == pytest.approx(27_000, rel=0.05)  # "the mean is about 27K tokens"
    exact, sampled = dist.split(16384), mc.split(16384)
    assert exact.p == pytest.approx(sampled.p, abs=0.002)
    assert exact.l_long == pytest.approx(sampled.l_long, rel=0.005)
    assert exact.l_short == pytest.approx(sampled.l_short, rel=0.005)


def test_far_tail_has_no_cancellation():
    # mu far below min: the whole truncated mass sits in the upper tail of the normal.
    dist = TruncatedLogNormal(0.0, 1.0, math.exp(8), math.exp(9))
    split = dist.split(math.exp(8.5))
    assert 0 < split.p < 0.5 and math.exp(8.5) < split.l_long < math.exp(9)


def test_workload_specs(tmp_path):
    dist = parse_workload("lognormal:mu=9.90,sigma=1.00,min=128,max=128K")
    assert (dist.mu, dist.sigma, dist.min_tokens, dist.max_tokens) == (9.9, 1.0, 128, 131072)
    lines = tmp_path / "lengths.txt"
    lines.write_text("# prompt lengths\n100\n300\n\n500\n")
    listed = tmp_path / "lengths.json"
    listed.write_text("[100, 300, 500]")
    for path in (lines, listed):
        assert parse_workload(f"file:{path}").split(200).l_long == 400
    for bad in ["normal:mu=1", "lognormal:mu=1,sigma=1,min=1", "lognormal:mu=1,sigma=0,min=1,max=9",
                "lognormal:mu=x,sigma=1,min=1,max=9", "lognormal:mu=1,sigma=1,min=9,max=1"]:
        with pytest.raises(PlanError):
            parse_workload(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PlanError, match="no lengths"):
        load_lengths(str(empty))


# ---------------------------------------------------------------- the search


def brute_force(profile, workload, thresholds):
    return max(best_at(profile, workload, t).lambda_max for t in thresholds)


def test_search_finds_the_best_empirical_t_by_hand():
    # T_prfaas = T_pd = l/100 s, one instance each, decode never binds. Candidates t = 100, 1000:
    #   t=100:  p=0.4, l_long=1500: 1/15/0.4 = 0.167;  l_short=100: 1/1/0.6 = 1.67   -> 0.167
    #   t=1000: p=0.2, l_long=2000: 1/20/0.2 = 0.25;   l_short=325: 1/3.25/0.8 = 0.385 -> 0.25
    points = [{"tokens": 100, "prefill_s": 1.0, "kv_bytes": 10}, {"tokens": 200, "prefill_s": 2.0, "kv_bytes": 20}]
    profile = profile_of(tiny_profile(egress_gbps=1.0, pd_instances=2, batch_max=10_000, prfaas_instances=1,
                                      pd_prefill={"points": points}))
    plan = search(profile, EmpiricalLengths([100] * 6 + [1000] * 2 + [2000] * 2))
    assert plan.t == 1000 and plan.lambda_max == pytest.approx(0.25)


def test_search_balances_the_two_prefill_sides():
    with open(SAMPLE, "rb") as f:
        profile = parse_profile(f.read())
    workload = parse_workload(PAPER_WORKLOAD)
    plan = search(profile, workload)
    assert plan.bottleneck != "pd_decode"
    assert plan.theta_prfaas / plan.p == pytest.approx(plan.theta_pd_p / (1 - plan.p), rel=1e-3)
    dense = workload.thresholds(128, 131072, 2000)
    assert plan.lambda_max >= brute_force(profile, workload, dense) * (1 - 1e-9)
    # The split: one decode instance fewer would bind decode below the prefill capacity.
    assert plan.theta_pd_d * (plan.n_d - 1) / plan.n_d < plan.lambda_max <= plan.theta_pd_d
    assert all_local(profile, workload.mean()).lambda_max < plan.lambda_max


def test_decode_bound_ties_pick_the_balancing_t():
    # One decode slot makes Lambda_max = Theta_pd_d at every t; the tie-break must still balance.
    data = tiny_profile(egress_gbps=1.0, batch_max=1, pd_instances=2, prfaas_instances=50)
    profile = profile_of(data)
    workload = TruncatedLogNormal(5.0, 1.0, 20, 2000)
    plan = search(profile, workload)
    assert plan.bottleneck == "pd_decode" and plan.lambda_max == pytest.approx(1.0)
    # t is integral and the curves are steep here: the crossing lies between t - 1 and t + 1.
    below, above = best_at(profile, workload, plan.t - 1), best_at(profile, workload, plan.t + 1)
    gap = [pl.theta_prfaas / pl.p - pl.theta_pd_p / (1 - pl.p) for pl in (below, above)]
    assert gap[0] * gap[1] < 0
    assert plan.prefill_capacity() >= max(below.prefill_capacity(), above.prefill_capacity())


def test_search_on_a_single_length_is_an_error():
    with pytest.raises(PlanError, match="single length"):
        search(profile_of(tiny_profile()), EmpiricalLengths([500, 500]))


# ---------------------------------------------------------------- the CLI


def test_cli_json(capsys):
    assert plan_cli.main(["--profile", SAMPLE, "--workload", PAPER_WORKLOAD, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ["t", "p", "l_long", "l_short", "theta_prfaas", "theta_pd_p", "theta_pd_d", "lambda_max",
                "n_p", "n_d", "egress_gbps_needed", "phi_kv_gbps", "units"]:
        assert key in out
    assert out["n_p"] + out["n_d"] == 8 and 0 < out["p"] < 1
    assert out["l_short"] < out["t"] < out["l_long"]
    assert 5 < out["egress_gbps_needed"] < out["egress_gbps"]  # the paper saw ~13 Gbps of 100


def test_cli_fixed_threshold_and_overrides(capsys):
    args = ["--profile", SAMPLE, "--workload", PAPER_WORKLOAD, "--json", "--threshold", "32K"]
    assert plan_cli.main(args + ["--n-prefill", "5", "--egress-gbps", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["t"], out["n_p"], out["n_d"], out["egress_gbps"]) == (32768, 5, 3, 10.0)
    assert plan_cli.main(args) == 0  # the best split at that t
    assert json.loads(capsys.readouterr().out)["t"] == 32768
    assert plan_cli.main(args + ["--egress-gbps", "0"]) == 2
    assert "egress_gbps must be in" in capsys.readouterr().err


def test_cli_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_profile(pd_instances=1)))
    assert plan_cli.main(["--profile", str(bad), "--workload", PAPER_WORKLOAD]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvwire-plan: error:") and "pd_instances" in err
    assert plan_cli.main(["--profile", SAMPLE, "--workload", PAPER_WORKLOAD, "--threshold", "200K"]) == 2
    assert "p = 0" in capsys.readouterr().err


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "serving.plan_cli", "--profile", SAMPLE, "--workload",
                             PAPER_WORKLOAD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "lambda_max" in result.stdout
