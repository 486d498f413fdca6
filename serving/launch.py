"""Starting worker processes on this machine and learning where they listen.

Workers print one JSON "ready" line on stdout once serving, so they can bind port 0 and
launchers (the demo, tests) never race for ports. A worker that dies or stays silent past
the timeout is an error naming it, with the tail of what it wrote to stderr.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .errors import LaunchError


@dataclass
class Worker:
    """A running ``kvwire-serve`` process."""

    role: str
    process: subprocess.Popen
    info: dict = field(default_factory=dict)
    stderr_path: str = ""

    @property
    def url(self) -> str:
        return self.info["url"]

    def stderr_tail(self, num_chars: int = 3000) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()[-num_chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; drops its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self.stderr_path and os.path.exists(self.stderr_path):
            os.unlink(self.stderr_path)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start(role: str, args: list[str], *, timeout_s: float = 120.0, env: dict | None = None,
          wrapper: list[str] = ()) -> Worker:
    """Run ``python -m serving <role> <args>`` and wait for its ready line.

    ``wrapper`` runs it through another command, e.g. ``ip netns exec NS`` (which execs, so
    the Worker's pid is still the worker's own).
    """
    stderr = tempfile.NamedTemporaryFile(prefix=f"kvwire-serve-{role}-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "serving", role, *args], stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, **(env or {})},
    )
    worker = Worker(role, process, stderr_path=stderr.name)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            tail = worker.stderr_tail()
            worker.stop()
            raise LaunchError(f"{role} worker not ready after {timeout_s}s; its stderr ends:\n{tail}") from None
        if line is None:
            tail = worker.stderr_tail()
            worker.stop()
            raise LaunchError(f"{role} worker exited with {process.returncode}; its stderr ends:\n{tail}")
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("ready") == role:
            worker.info = message
            return worker


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)
