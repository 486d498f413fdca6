"""Backends: each one knows only how to connect, listen and move bytes.

Sessions, requests, framing and verification live above them (sender.py, receiver.py),
so every backend gets the same behaviour. A backend registers a factory by name.
"""

from __future__ import annotations

from typing import Callable

from .base import AutoOptions, Backend, Capabilities, Connection, LinkStats, Listener, TcpOptions, UcxOptions

_FACTORIES: dict[str, Callable[[], Backend]] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    _FACTORIES[name] = factory


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError listing the known ones otherwise."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known backends: {sorted(_FACTORIES)}") from None
    return factory()


def _tcp() -> Backend:
    from .tcp import TcpBackend

    return TcpBackend()


def _ucx() -> Backend:
    from .ucx import UcxBackend

    return UcxBackend()


def _auto() -> Backend:
    from .auto import AutoBackend

    return AutoBackend()


register("tcp", _tcp)
register("ucx", _ucx)
register("auto", _auto)

__all__ = ["AutoOptions", "Backend", "Capabilities", "Connection", "LinkStats", "Listener", "TcpOptions", "UcxOptions",
           "get_backend", "register"]
