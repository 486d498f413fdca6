"""`kvwire-serve demo` runs decode, prefill and router as processes and exits 0 on a match."""

import os
import subprocess
import sys


def test_demo_runs_end_to_end_and_matches_generate(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "serving", "demo", "--prompt-lengths", "16,150", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=170, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert (tmp_path / "kvwire" / "tiny-kimi-linear-seed0-v1" / "config.json").is_file()
    assert (tmp_path / "kvwire" / "tiny-kimi-linear-seed0-v1" / "model.safetensors").is_file()
    assert "     16 prompt tokens: MATCH" in out and "    150 prompt tokens: MATCH" in out
    assert out.rstrip().endswith("DEMO OK: 2/2 requests gave the monolithic tokens")
    assert out.count("source transfer") == 2 and out.count("TTFT ") == 2
