"""Progress on stderr for waits longer than a moment: a status line, or a count.

On a terminal, ``step("loading the model")`` shows ``loading the model ... 4s`` ticking,
then ``loading the model: done in 6.2 s``; ``count(n, "profiling")`` shows
``profiling 3/12``. Quiet when stderr is not a terminal (logs and CI stay clean) or with
``--quiet``; ``KVWIRE_PROGRESS=1`` forces it on (tests, ``| tee``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

_enabled: bool | None = None


def configure(*, quiet: bool = False) -> None:
    global _enabled
    forced = os.environ.get("KVWIRE_PROGRESS")
    _enabled = False if quiet else (forced == "1" if forced in ("0", "1") else sys.stderr.isatty())


def enabled() -> bool:
    if _enabled is None:
        configure()
    return _enabled


def _write(text: str, *, end: str = "\n") -> None:
    live = sys.stderr.isatty()
    sys.stderr.write(("\r\x1b[K" if live else "") + text + end)
    sys.stderr.flush()


@contextlib.contextmanager
def step(what: str):
    """Say ``what`` is under way (ticking each second on a terminal), then how long it took."""
    if not enabled():
        yield
        return
    started = time.monotonic()
    done = threading.Event()
    _write(f"{what} ...", end="" if sys.stderr.isatty() else "\n")

    def tick() -> None:
        while not done.wait(1.0):
            _write(f"{what} ... {time.monotonic() - started:.0f}s", end="")

    ticker = threading.Thread(target=tick, daemon=True) if sys.stderr.isatty() else None
    if ticker:
        ticker.start()
    try:
        yield
    except BaseException:
        done.set()
        _write(f"{what}: failed after {time.monotonic() - started:.1f} s")
        raise
    done.set()
    if ticker:
        ticker.join()
    _write(f"{what}: done in {time.monotonic() - started:.1f} s")


class count:
    """``with count(total, what) as bar: ... bar.advance()``: ``what 3/12`` as each finishes."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done, self._started = total, what, 0, time.monotonic()

    def __enter__(self) -> "count":
        if enabled():
            _write(f"{self.what} 0/{self.total}", end="" if sys.stderr.isatty() else "\n")
        return self

    def advance(self, note: str = "") -> None:
        self.done += 1
        if enabled():
            tail = f" ({note})" if note else ""
            _write(f"{self.what} {self.done}/{self.total}{tail}", end="" if sys.stderr.isatty() else "\n")

    def __exit__(self, *exc) -> None:
        if enabled() and sys.stderr.isatty():
            _write(f"{self.what}: {self.done}/{self.total} in {time.monotonic() - self._started:.1f} s")
