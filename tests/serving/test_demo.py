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
    assert "goodput" not in out  # a figure over the prefill window read as a slow link
    model = tmp_path / "kvwire" / "tiny-kimi-linear-seed0-v2"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model / name).is_file()
    # every slow phase is announced before it starts, so the demo is never silent for long
    for phase in ("writing the demo's tiny seeded Kimi-Linear model", f"model: {model}",
                  "starting the decode process (loads the model, warms up) ...", "  decode ready at http://",
                  "starting the prefill process", "starting the router process", "sending 2 streamed requests",
                  "checking against a monolithic generate()"):
        assert phase in out, out
    assert "     16 prompt tokens: MATCH" in out and "    150 prompt tokens: MATCH" in out
    assert out.rstrip().endswith("DEMO OK: 2/2 requests gave the monolithic tokens")
    assert out.count("source transfer") == 2 and out.count("TTFT ") == 2
