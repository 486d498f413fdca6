"""vLLM engines as real processes (``python -m serving.vllm_engine``) for the connector tests."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Engine:
    """One vLLM engine process; ``ask(job)`` sends a JSON line and returns its answer."""

    def __init__(self, name: str, model: str, *args: str, log_dir, popen=subprocess.Popen, env=None):
        self.name = name
        self.log_path = os.path.join(str(log_dir), f"{name}.log")
        argv = [sys.executable, "-m", "serving.vllm_engine", "--model", model, *args]
        child_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self._log = open(self.log_path, "w")
        self.proc = popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                          cwd=ROOT, env=child_env)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"engine {self.name} said nothing within {timeout}s; log: {self.log_tail()}") from None
        if line is None:
            raise RuntimeError(f"engine {self.name} exited ({self.proc.poll()}); log: {self.log_tail()}")
        return json.loads(line)

    def wait_ready(self, timeout: float = 240.0) -> "Engine":
        if self.ready is None:
            self.ready = self._line(timeout)
        return self

    def ask(self, job: dict, timeout: float = 180.0) -> dict:
        self.wait_ready()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = self._line(timeout)
        if "error" in reply:
            raise RuntimeError(f"engine {self.name}: {reply['error']}")
        return reply

    def generate(self, prompts, max_tokens: int, params=None, timeout: float = 180.0) -> list[dict]:
        return self.ask({"prompts": prompts, "max_tokens": max_tokens, "params": params}, timeout)["outputs"]

    def free_blocks(self) -> int:
        return self.ask({"free_blocks": True})["free_blocks"]

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-chars:]

    def log_text(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.kill()
        self._log.close()


def start_all(*engines: Engine) -> list[Engine]:
    """Wait for engines started together (they load in parallel)."""
    deadline = time.monotonic() + 300
    for engine in engines:
        engine.wait_ready(max(1.0, deadline - time.monotonic()))
    return list(engines)


def consumer_args(listen: str, *, secret_file=None, prefix_caching=True, policy="recompute", **extra) -> list[str]:
    config = {"listen": listen, "load_timeout_s": 8, "lease_s": 5, **extra}
    if secret_file is not None:
        config["secret_file"] = str(secret_file)
    return ["--kv-role", "kv_consumer", "--kv-extra", json.dumps(config), "--load-failure-policy", policy,
            *(["--prefix-caching"] if prefix_caching else [])]


def producer_args(decode: str | None = None, *, secret_file=None, prefix_caching=True, **extra) -> list[str]:
    config = {**({"decode": decode} if decode else {}), **extra}
    if secret_file is not None:
        config["secret_file"] = str(secret_file)
    return ["--kv-role", "kv_producer", "--kv-extra", json.dumps(config),
            *(["--prefix-caching"] if prefix_caching else [])]


def disaggregated(prefill: Engine, decode: Engine, prompts, max_tokens: int, targets=None):
    """The proxy's two requests: prefill with max_tokens=1, then decode with its parameters."""
    first = [{"do_remote_decode": True, **({"kvwire": t} if t else {})} for t in (targets or [None] * len(prompts))]
    prefilled = prefill.generate(prompts, 1, first)
    return prefilled, decode.generate(prompts, max_tokens, [p["kv_transfer_params"] for p in prefilled])
