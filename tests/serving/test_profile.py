"""``kvwire-serve profile`` measures a real model into a profile kvwire-plan accepts."""

import json
import subprocess
import sys

from serving import plan_cli
from serving.hybrid_cache import kv_layout
from serving.planner import load_profile


def test_profile_of_a_real_model_plans(kimi, kimi_dir, tmp_path, capsys):
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "-m", "serving", "profile", "--model", str(kimi_dir), "--lengths", "16,64",
                           "--repeats", "1", "--egress-gbps", "0.1", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    profile = load_profile(str(out))
    layout = kv_layout(kimi.config, "float32")
    assert [(p.tokens, p.kv_bytes) for p in profile.prfaas.points] == [(16, layout.nbytes(16)), (64, layout.nbytes(64))]
    assert all(p.prefill_s > 0 for p in profile.pd_prefill.points) and profile.pd_decode.step_s > 0
    assert plan_cli.main(["--profile", str(out), "--workload", "lognormal:mu=3.5,sigma=1,min=8,max=128", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 8 <= plan["t"] <= 128 and plan["n_p"] + plan["n_d"] == 2


def test_profile_needs_two_lengths(kimi_dir):
    done = subprocess.run([sys.executable, "-m", "serving", "profile", "--model", str(kimi_dir), "--lengths", "16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "kvwire-serve profile: error: argument --lengths: need at least two increasing prompt lengths, got [16]")
