"""What ``python -m perf`` reports is what ran: a GPU benchmark without a GPU is skipped (its
host-memory dry run reported beside the skip, never as a figure), and a benchmark whose
result carries a failure (vllm-pd: kvwire's tokens differ from NIXL's) fails the run."""

import importlib
import importlib.machinery
import json
import subprocess
import sys
import types

import pytest

from perf import __main__ as perf_cli
from perf import devices
from perf.vllm_pd import tokens_differ


def _module(monkeypatch, name: str, **attrs) -> None:
    module = types.ModuleType(f"perf.{name}")
    module.__spec__ = importlib.machinery.ModuleSpec(f"perf.{name}", None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, f"perf.{name}", module)


@pytest.mark.skipif(devices.cuda_available(), reason="this machine has a GPU")
def test_a_gpu_benchmark_without_a_gpu_is_skipped_and_its_dry_run_reported_apart(monkeypatch, tmp_path):
    def main(argv):
        assert argv[:2] == ["--device", "cpu"]
        print(json.dumps({"device": "cpu", "dry_run": devices.DRY_RUN_NOTE}))
        return 0

    _module(monkeypatch, "gpu_fake", unavailable=devices.gpu_missing, DRY_RUN_ARGS=["--device", "cpu"], main=main)
    monkeypatch.setitem(perf_cli.BENCHMARKS, "gpu-fake", "perf.gpu_fake")
    with pytest.raises(perf_cli.Skipped, match="no GPU") as skipped:
        perf_cli.run_one("gpu-fake", [], True, str(tmp_path))
    assert skipped.value.dry_run["status"] == "ok" and "not a GPU measurement" in skipped.value.dry_run["note"]
    assert json.loads((tmp_path / "gpu-fake-dry-run.json").read_text())["device"] == "cpu"
    assert not (tmp_path / "gpu-fake-quick.json").exists()  # nothing that reads like a measurement


@pytest.mark.skipif(devices.cuda_available(), reason="this machine has a GPU")
def test_a_failing_dry_run_fails_the_run(monkeypatch, capsys, tmp_path):
    _module(monkeypatch, "gpu_broken", unavailable=devices.gpu_missing, DRY_RUN_ARGS=["--device", "cpu"],
            main=lambda argv: 1)
    monkeypatch.setitem(perf_cli.BENCHMARKS, "gpu-broken", "perf.gpu_broken")
    assert perf_cli.main(["gpu-broken", "--quick", "--out", str(tmp_path)]) == 1
    assert "skipped: no GPU" in capsys.readouterr().err


@pytest.mark.parametrize("matplotlib", [True, False])
def test_a_result_that_says_it_failed_fails_the_run_and_keeps_its_json(monkeypatch, capsys, tmp_path, matplotlib):
    if not matplotlib:  # as in CI's test run, before the perf extra is installed
        import perf

        monkeypatch.delattr(perf, "plots", raising=False)
        monkeypatch.setitem(sys.modules, "perf.plots", None)
    _module(monkeypatch, "says_failed", run=lambda argv: {"failure": "kvwire's tokens differ from NixlConnector's"})
    monkeypatch.setitem(perf_cli.BENCHMARKS, "says-failed", "perf.says_failed")
    assert perf_cli.main(["says-failed", "--out", str(tmp_path)]) == 1
    assert "tokens differ" in capsys.readouterr().err
    assert json.loads((tmp_path / "says-failed.json").read_text())["failure"]


def test_vllm_pd_names_where_kvwire_and_nixl_tokens_differ():
    mine = [{"prompt_tokens": 256, "tokens": [1, 2, 3]}, {"prompt_tokens": 700, "tokens": [4, 5, 6]}]
    theirs = [{"prompt_tokens": 256, "tokens": [1, 2, 3]}, {"prompt_tokens": 700, "tokens": [4, 9, 6]}]
    assert tokens_differ(mine, mine) == []
    assert tokens_differ(mine, theirs) == ["700-token prompt, from token 1 ([5] vs [9])"]


@pytest.mark.skipif(devices.cuda_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["gpu_ucx", "gpu_kv"])
def test_the_gpu_benchmarks_say_no_gpu_and_have_a_dry_run(name):
    module = importlib.import_module(f"perf.{name}")
    assert module.unavailable() in ("no GPU (torch sees no CUDA device)", devices.ucx_missing())
    assert module.DRY_RUN_ARGS[:2] == ["--device", "cpu"]


@pytest.mark.parametrize("name", ["peers", "requests"])
def test_a_benchmark_s_help_is_its_own_options_not_a_failure(name):
    done = subprocess.run([sys.executable, "-m", "perf", name, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
    assert "Traceback" not in done.stderr
