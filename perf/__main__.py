"""python -m perf <name> [--quick] [--json] [--out DIR | --update-results] [benchmark options]

Runs one benchmark (or ``all``), writes ``<name>.json`` and ``<name>.png`` (``<name>-quick.*``
with ``--quick``) into ``perf/out/`` (or ``--out DIR``) and prints the JSON. The committed
figures in ``perf/results/`` are replaced only with ``--update-results``. A ``--quick``
result is a smoke run (small sizes, one repeat): it says so in its JSON
(``"smoke": true``) and is not comparable to perf/README.md's figures.

    pip install -c constraints.txt -e '.[perf]'   # matplotlib for the plots (JSON is kept without it)
    python -m perf list
    python -m perf transfer --json
    python -m perf wan --json            # root: builds an emulated WAN link
    python -m perf all --quick           # the CI smoke: every benchmark, small

A benchmark is a module ``perf/<name>.py`` that provides ``run(argv) -> dict`` (or
``main(argv)`` printing its JSON), and optionally ``QUICK_ARGS`` (arguments for
``--quick``, default ``["--quick"]``), ``unavailable() -> str | None`` (why it cannot run
here) and ``plot(result, png_path)``. Modules not written yet are skipped with a message.
A GPU benchmark on a machine without a GPU is skipped ("no GPU"); where it has
``DRY_RUN_ARGS`` those run instead (host memory) and are reported beside the skip as a
dry run, so its code stays checked without passing for a measurement. A result with a
``failure`` (vllm-pd: kvwire's tokens differ from NIXL's) is written, then fails the run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "perf", "results")  # the committed figures (--update-results)
DEFAULT_OUT = os.path.join(ROOT, "perf", "out")  # everything else (git-ignored)
SMOKE_NOTE = "quick: a smoke run (small sizes, one repeat), to check the benchmark works; not comparable to " \
             "perf/README.md's figures"
# name -> module; "transfer" is adapted here (a sweep over perf.transfer.main)
BENCHMARKS = {
    "transfer": "perf.transfer",
    "codec": "perf.codec",
    "peers": "perf.peers",
    "requests": "perf.requests",
    "timeline": "perf.timeline",
    "senders": "perf.senders",
    "wan": "perf.wan",
    "ttft-wan": "perf.ttft_wan",
    "tls-wan": "perf.tls_wan",
    "load": "perf.load",
    "router": "perf.router",
    "gpu-ucx": "perf.gpu_ucx",  # skipped without a GPU (a dry run in host memory instead)
    "gpu-kv": "perf.gpu_kv",  # skipped without a GPU (a dry run in host memory instead)
    "gpu-codec": "perf.gpu_codec",  # skipped without a GPU
    "vllm-pd": "perf.vllm_pd",  # skipped without vLLM; NIXL rows without nixl
    "vllm-serve": "perf.vllm_serve",  # skipped without vLLM; NIXL rows without nixl
}
# --quick arguments for modules that do not define QUICK_ARGS themselves
QUICK = {"peers": ["--sizes", "1", "--cases", "raw_socket,kvwire_tcp"]}
NOT_YET: dict[str, str] = {}


class Skipped(Exception):
    """The benchmark cannot run here; the message says why, ``dry_run`` what its dry run gave."""

    def __init__(self, reason: str, dry_run: dict | None = None):
        super().__init__(reason)
        self.dry_run = dry_run


class Failed(Exception):
    """The benchmark ran and its result says it failed (the JSON is written)."""


def run_transfer(argv: list[str], quick: bool) -> dict:
    """perf.transfer over several configurations (one with ``argv`` if given)."""
    from perf import transfer

    if argv:
        configs = [argv]
    elif quick:
        configs = [["--streams", "4", "--mib", "16", "--repeats", "1"]]
    else:
        configs = [["--streams", s, "--mib", "256", "--repeats", "5"] for s in ("1", "2", "4", "8")]
        for streams, into in (("4", "own"), ("1", "own"), ("4", "expect")):
            configs.append(["--streams", streams, "--small-blocks", "--into", into, "--repeats", "7"])
    runs = [_captured_json(transfer.main, [*config, "--json"]) for config in configs]
    from perf.plots import machine_info

    return {"benchmark": "transfer", "units": runs[0]["units"], "runs": runs, "machine": machine_info()}


def _captured_json(main, argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code not in (None, 0):
        raise RuntimeError(f"exited with {code}")
    lines = [line for line in out.getvalue().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"printed no JSON: {out.getvalue()[-300:]!r}")
    return json.loads(lines[-1])


def run_one(name: str, argv: list[str], quick: bool, out_dir: str = DEFAULT_OUT) -> tuple[dict, str, str]:
    """Run benchmark ``name``; returns (result, json path, png path). Raises Skipped."""
    if name in NOT_YET:
        raise Skipped(NOT_YET[name])
    module_name = BENCHMARKS.get(name) or f"perf.{name.replace('-', '_')}"
    if name not in BENCHMARKS and importlib.util.find_spec(module_name) is None:
        raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}, all, list")
    if importlib.util.find_spec(module_name) is None:
        raise Skipped(f"{module_name} does not exist yet")
    module = importlib.import_module(module_name)
    reason = getattr(module, "unavailable", lambda: None)()
    if reason:
        from perf import devices

        if hasattr(module, "DRY_RUN_ARGS") and reason == devices.gpu_missing():
            raise Skipped(reason, _dry_run(module, name, out_dir))
        raise Skipped(reason)
    if name == "transfer":
        result = run_transfer(argv, quick)
    else:
        quick_args = getattr(module, "QUICK_ARGS", QUICK.get(name, ["--quick"]))
        args = [*argv, *(quick_args if quick else [])]
        try:
            result = module.run(args) if hasattr(module, "run") else _captured_json(module.main, [*args, "--json"])
        except SystemExit as exc:  # argparse in a benchmark's main: a failure of that benchmark, not of the suite
            raise RuntimeError(f"perf.{name} exited with {exc.code} for arguments {args}") from None
    if quick and isinstance(result, dict):
        result = {"smoke": True, "smoke_note": SMOKE_NOTE, **result}
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name + ("-quick" if quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    png = _plot(module, name, result, stem + ".png")
    if isinstance(result, dict) and result.get("failure"):
        raise Failed(f"{result['failure']} (result in {stem}.json)")
    return result, stem + ".json", png


def _plot(module, name: str, result: dict, png: str) -> str | None:
    """Draw ``result`` into ``png``; None without matplotlib (the measurement stands without its picture)."""
    try:
        from perf import plots
    except ImportError as exc:
        print(f"perf {name}: no plot ({exc}: pip install -c constraints.txt -e '.[perf]')", file=sys.stderr)
        return None
    plot = plots.PLOTS.get(name) or getattr(module, "plot", None) or plots.plot_generic
    try:
        plot(result, png)
    except Exception as exc:  # noqa: BLE001 - a plot that does not fit the result must not lose the result
        print(
            f"perf {name}: {plot.__name__} failed ({type(exc).__name__}: {exc}); generic plot instead", file=sys.stderr
        )
        plots.plot_generic(result, png)
    return png


def _dry_run(module, name: str, out_dir: str) -> dict:
    """A GPU benchmark's dry run in host memory: whether its code works, kept apart from figures."""
    from perf import devices

    try:
        result = _captured_json(module.main, [*module.DRY_RUN_ARGS, "--json"])
    except Exception as exc:  # noqa: BLE001 - reported as the dry run's failure
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "note": devices.DRY_RUN_NOTE}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-dry-run.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return {"status": "ok", "json": path, "note": devices.DRY_RUN_NOTE}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    as_json = "--json" in rest
    quick = "--quick" in rest
    out_dir = DEFAULT_OUT
    if "--update-results" in rest:
        if quick:
            raise SystemExit("perf: --update-results replaces the committed figures: not with --quick")
        out_dir = RESULTS
    if "--out" in rest:
        at = rest.index("--out")
        if at + 1 >= len(rest) or rest[at + 1].startswith("--"):
            raise SystemExit("perf: --out needs a folder")
        out_dir = os.path.abspath(rest[at + 1])
        del rest[at:at + 2]
    rest = [a for a in rest if a not in ("--json", "--quick", "--update-results")]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if name == "list":
        print("\n".join(BENCHMARKS))
        return 0
    if name in BENCHMARKS and ("-h" in rest or "--help" in rest):  # the benchmark's own options
        return subprocess.call([sys.executable, "-m", BENCHMARKS[name], "--help"])
    names = list(BENCHMARKS) if name == "all" else [name]
    summary, failed = {}, False
    if quick:
        print(f"perf: {SMOKE_NOTE}", file=sys.stderr, flush=True)
    for number, bench in enumerate(names, 1):
        t0 = time.monotonic()
        print(f"perf {bench}: running ({number}/{len(names)}) ...", file=sys.stderr, flush=True)
        try:
            result, json_path, png_path = run_one(bench, rest if name != "all" else [], quick, out_dir)
        except Skipped as exc:
            summary[bench] = {"status": "skipped", "reason": str(exc)}
            dry = ""
            if exc.dry_run is not None:
                summary[bench]["dry_run"] = exc.dry_run
                failed = failed or exc.dry_run["status"] != "ok"
                dry = f"; its dry run in host memory: {exc.dry_run['status']} {exc.dry_run.get('error', '')}"
            print(f"perf {bench}: skipped: {exc}{dry}", file=sys.stderr, flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' results
            traceback.print_exc()
            summary[bench] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            failed = True
            continue
        seconds = round(time.monotonic() - t0, 1)
        print(f"perf {bench}: {seconds} s -> {json_path}, {png_path}", file=sys.stderr, flush=True)
        summary[bench] = {"status": "ok", "seconds": seconds, "json": json_path, "png": png_path}
        if name != "all":
            print(json.dumps(result, indent=None if as_json else 2))
    if name == "all":
        print(json.dumps({"benchmarks": summary}, indent=None if as_json else 2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
