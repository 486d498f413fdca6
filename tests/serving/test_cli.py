"""Bad input to the real ``kvwire-serve`` command: one line naming the flag, at once, before any model loads.

The issue's own cases run the command as a subprocess; the many others call its entry
point, ``serving.cli.main``, in this process (same parser, same checks, no interpreter
start-up per case)."""

import os
import socket
import subprocess
import sys
import time

import pytest


def kvwire_serve(*args: str, env: dict | None = None, timeout: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "serving", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return done.returncode, done.stderr, time.monotonic() - started


def cli(capsys, *args: str) -> tuple[int, str, float]:
    """``kvwire-serve ARGS`` through its entry point, in this process."""
    from serving.cli import main

    started = time.monotonic()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err, time.monotonic() - started


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def taken_port():
    """A port something already listens on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


@pytest.mark.parametrize("args,message", [
    (["router", "--prefill", "localhost:8100", "--decode", "http://127.0.0.1:8200", "--port", "0"],
     "kvwire-serve router: error: argument --prefill: 'localhost:8100' is not an http:// URL "
     "(e.g. 'http://localhost:8100')"),
    (["router", "--prefill", "http://127.0.0.1:8100", "--decode", "http://127.0.0.1:99999", "--port", "0"],
     "kvwire-serve router: error: argument --decode: 'http://127.0.0.1:99999' has no valid port (1..65535)"),
    (["router", "--prefill", "http://p:1/v1", "--decode", "http://d:2", "--port", "0"],
     "kvwire-serve router: error: argument --prefill: 'http://p:1/v1': give the worker's base URL, without a path "
     "(the router adds /v1/...)"),
    (["router", "--prefill", "http://p:1", "--decode", "http://d:2", "--port", "80000"],
     "kvwire-serve router: error: argument --port: '80000' is not a port number in 0..65535"),
    (["router", "--prefill", "http://p:1", "--decode", "http://d:2", "--decode-kv", "http://d:2=d", "--port", "0"],
     "kvwire-serve router: error: argument --decode-kv: 'http://d:2=d': 'd' is not HOST:PORT (e.g. '10.0.0.2:7800')"),
    (["router", "--prefill", "http://p:1", "--decode", "http://d:2", "--host", "10.9.9.9", "--port", "0"],
     "kvwire-serve router: --host 10.9.9.9: cannot listen: 10.9.9.9 is not an address of this machine"),
    (["router", "--config", "/no/such.toml", "--port", "0"],
     "kvwire-serve router: router config /no/such.toml: cannot read it (No such file or directory)"),
    (["router", "--prefill", "http://p:1", "--port", "0"],
     "kvwire-serve router: router config: the router needs at least one decode worker URL"),
    (["decode", "--model", "{model}", "--port", "0", "--kv-listen", "localhost"],
     "kvwire-serve decode: error: argument --kv-listen: 'localhost' is not HOST:PORT (e.g. '0.0.0.0:7800')"),
    (["decode", "--model", "{model}", "--port", "0", "--kv-listen", "0.0.0.0:0", "--kv-advertise", "10.0.0.2"],
     "kvwire-serve decode: error: argument --kv-advertise: '10.0.0.2' is not HOST:PORT (e.g. '10.0.0.2:7800')"),
    (["decode", "--model", "/no/such/folder", "--port", "0", "--kv-listen", "127.0.0.1:0"],
     "kvwire-serve decode: error: argument --model: '/no/such/folder' is not a folder "
     "(make one with 'kvwire-serve make-model /no/such/folder')"),
    (["prefill", "--model", "{model}", "--port", "0", "--streams", "0"],
     "kvwire-serve prefill: error: argument --streams: '0' is not a whole number >= 1"),
    (["demo", "--prompt-lengths", "16,lots"],
     "kvwire-serve demo: error: argument --prompt-lengths: '16,lots' is not a comma-separated list of token counts "
     ">= 1 (e.g. 16,200)"),
    (["profile", "--lengths", "0,16"],
     "kvwire-serve profile: error: argument --lengths: '0,16' is not a comma-separated list of token counts >= 1 "
     "(e.g. 16,200)"),
])
def test_a_bad_flag_is_one_line_naming_it(args, message, kimi_dir, capsys):
    code, stderr, elapsed = cli(capsys, *(a.replace("{model}", str(kimi_dir)) for a in args))
    assert code == 2, stderr
    assert last_line(stderr) == message
    if ": error: argument" in message:
        assert stderr.strip() == message  # one line, no usage block before it
    assert "Traceback" not in stderr
    assert elapsed < 10  # said before any model loads


@pytest.mark.parametrize("role,flag", [("decode", "--port"), ("decode", "--kv-listen"), ("prefill", "--port"),
                                       ("router", "--port")])
def test_a_port_in_use_is_named_with_its_flag_before_the_model_loads(role, flag, taken_port, kimi_dir, capsys):
    ports = {"--port": "0", "--kv-listen": "127.0.0.1:0"}
    ports[flag] = str(taken_port) if flag == "--port" else f"127.0.0.1:{taken_port}"
    args = {"decode": ["--model", str(kimi_dir), "--port", ports["--port"], "--kv-listen", ports["--kv-listen"]],
            "prefill": ["--model", str(kimi_dir), "--port", ports["--port"]],
            "router": ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--port", ports["--port"]]}
    code, stderr, elapsed = cli(capsys, role, *args[role])
    assert code == 2, stderr
    assert last_line(stderr) == (f"kvwire-serve {role}: {flag} 127.0.0.1:{taken_port}: cannot listen: the port is in "
                                 "use (another worker running?)")
    assert "Traceback" not in stderr
    assert elapsed < 10


def test_the_command_itself_refuses_a_url_without_scheme_and_a_kv_port_in_use(taken_port, kimi_dir):
    code, stderr, elapsed = kvwire_serve("router", "--prefill", "localhost:8100", "--decode", "http://127.0.0.1:8200",
                                         "--port", "0")
    assert (code, last_line(stderr)) == (2, "kvwire-serve router: error: argument --prefill: 'localhost:8100' is not "
                                            "an http:// URL (e.g. 'http://localhost:8100')")
    code, stderr, elapsed = kvwire_serve("decode", "--model", str(kimi_dir), "--port", "0", "--kv-listen",
                                         f"127.0.0.1:{taken_port}")
    assert (code, last_line(stderr)) == (2, f"kvwire-serve decode: --kv-listen 127.0.0.1:{taken_port}: cannot "
                                            "listen: the port is in use (another worker running?)")
    assert "Traceback" not in stderr and elapsed < 10


def test_make_model_writes_a_checkpoint_with_a_tokenizer_and_shows_progress(tmp_path):
    folder = tmp_path / "tiny"
    code, stderr, _ = kvwire_serve("make-model", str(folder), env={"KVWIRE_PROGRESS": "1"}, timeout=120)
    assert code == 0, stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    assert "writing a tiny seeded kimi-linear checkpoint ..." in stderr
    assert "writing a tiny seeded kimi-linear checkpoint: done in " in stderr
    code, stderr, _ = kvwire_serve("make-model", str(folder))
    assert code == 2
    assert last_line(stderr) == f"kvwire-serve make-model: {folder} exists and is not empty; give a new folder"


def test_progress_is_quiet_when_stderr_is_not_a_terminal_or_with_quiet(capsys, monkeypatch):
    from serving import progress

    monkeypatch.delenv("KVWIRE_PROGRESS", raising=False)
    for quiet in (False, True):
        progress.configure(quiet=quiet)  # pytest's captured stderr is not a terminal
        with progress.step("loading"), progress.count(2, "profiling") as bar:
            bar.advance()
    monkeypatch.setenv("KVWIRE_PROGRESS", "1")
    progress.configure(quiet=True)
    with progress.step("loading"):
        pass
    assert capsys.readouterr().err == ""
    progress.configure(quiet=False)
    with progress.step("loading"), progress.count(2, "profiling") as bar:
        bar.advance("256 tokens")
    err = capsys.readouterr().err
    assert "loading ...\n" in err and "profiling 1/2 (256 tokens)\n" in err and "loading: done in " in err
    progress.configure()
