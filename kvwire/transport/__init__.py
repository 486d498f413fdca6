"""Backends: each one knows only how to connect, listen and move bytes.

Sessions, requests, framing and verification live above them (sender.py, receiver.py),
so every backend gets the same behaviour. A backend registers a factory by name.
"""

from __future__ import annotations

from typing import Callable

from .base import Backend, Connection, LinkStats, Listener

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


def takes_device_memory(conn) -> bool:
    """Whether CUDA arrays may be handed to ``conn`` as they are (False for a connection
    that does not say)."""
    return getattr(conn, "takes_device_memory", False)


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

__all__ = ["Backend", "Connection", "LinkStats", "Listener", "get_backend", "register", "takes_device_memory"]
