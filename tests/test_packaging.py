"""A built wheel (what `pip install .` installs) carries everything the library and the CLI need."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("kvwire-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    check = ("import sys, kvwire, serving, kvwire.integrations.vllm.config, kvwire.cuda.ops, serving.tokenizer\n"
             "import kvwire.native\n"
             "print(kvwire.__file__, serving.__file__, kvwire.native.COMPILED, kvwire.native.XXH3_COMPILED)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    # the compiled loops are built by the install (a C compiler is there, as on any machine of this
    # kind), and find xxh3 in the xxhash package's module
    assert done.stdout.split() == [str(target / "kvwire" / "__init__.py"), str(target / "serving" / "__init__.py"),
                                   "True", "True"]
    usage = subprocess.run([sys.executable, "-m", "serving", "make-model", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: kvwire-serve make-model [-h]")
