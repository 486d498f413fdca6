"""Command-line values checked where they are parsed, before any model loads.

Each function is an argparse ``type``: a bad value stops the command at once with
argparse's one line, ``argument --kv-listen: 'localhost' is not HOST:PORT (...)``, naming
the flag, what was given and the form expected. ``bind`` takes the ports a command will
serve before its slow start-up, so "address in use" is said in the first second, with
the flag, instead of as a traceback after the model has loaded.
"""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path

from kvwire.address import address_problem, parse_address
from kvwire.transport.sockets import bind_socket

from .errors import UsageError
from .router_config import url_problem


def checkpoint(value: str) -> str:
    """A save_pretrained() folder: it must exist and hold config.json (checked before torch loads)."""
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is not a folder (make one with 'kvwire-serve make-model {value}')")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{value!r} has no config.json: expected a save_pretrained() checkpoint "
                                         "folder (or 'kvwire-serve make-model DIR')")
    return value


def listen_address(value: str) -> str:
    """HOST:PORT to listen on (port 0: any free port)."""
    problem = address_problem(value, listen=True)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def peer_address(value: str) -> str:
    """HOST:PORT another process dials."""
    problem = address_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def worker_url(value: str) -> str:
    """A worker's base URL, http://HOST:PORT."""
    problem = url_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value.rstrip("/")


def url_and_address(value: str) -> tuple[str, str]:
    """URL=HOST:PORT: a vLLM decode server and its kvwire address."""
    url, sep, address = value.rpartition("=")
    if not sep or not url:
        raise argparse.ArgumentTypeError(f"{value!r} is not URL=HOST:PORT (e.g. http://10.0.0.3:8200=10.0.0.3:7800)")
    problem = url_problem(url) or address_problem(address)
    if problem:
        raise argparse.ArgumentTypeError(f"{value!r}: {problem}")
    return url.rstrip("/"), address


def port(value: str) -> int:
    """A TCP port to listen on, 0..65535 (0: any free port)."""
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number in 0..65535")
    return int(value)


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 1")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number > 0")
    return number


def token_counts(value: str) -> list[int]:
    """Comma-separated prompt lengths, e.g. 256,1024,4096."""
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of token counts >= 1 (e.g. 16,200)")
    return counts


def profile_lengths(value: str) -> list[int]:
    """At least two increasing prompt lengths, e.g. 256,1024,4096 (the planner interpolates)."""
    counts = token_counts(value)
    if len(counts) < 2 or sorted(set(counts)) != counts:
        raise argparse.ArgumentTypeError(f"need at least two increasing prompt lengths, got {counts}")
    return counts



def bind(flag: str, host: str, port_number: int, *, host_flag: str | None = None) -> socket.socket:
    """A listening TCP socket on host:port for ``flag``; UsageError naming the flag otherwise
    (``host_flag`` where the host, given by its own flag, is what is wrong)."""
    try:
        return bind_socket(host, port_number, backlog=512)
    except OSError as exc:
        why = {errno.EADDRINUSE: "the port is in use (another worker running?)",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
               errno.EACCES: "permission denied (ports below 1024 need root)"}.get(exc.errno, exc.strerror)
        if isinstance(exc, socket.gaierror):
            why = f"host {host!r} not found ({exc.strerror})"
        if host_flag and (isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL):
            raise UsageError(f"{host_flag} {host}: cannot listen: {why}") from None
        raise UsageError(f"{flag} {host}:{port_number}: cannot listen: {why}") from None


def check_listen_free(flag: str, address: str) -> None:
    """UsageError naming ``flag`` if ``address`` cannot be listened on now (port 0 always can)."""
    host, port_number = parse_address(address, what=flag, listen=True)
    if port_number:
        bind(flag, host, port_number).close()
