"""Addresses: ``HOST:PORT`` parsed and checked once, where the user gave them.

A bad address is the user's mistake, so it is a ValueError whose message names the
argument or flag (``what``), what was given and the form expected, raised before any
thread starts or socket opens. Port 0 ("any free port") is allowed only for listening.
"""

from __future__ import annotations

import string

_HOST_CHARACTERS = frozenset(string.ascii_letters + string.digits + ".-_:%")
_IPV6_HINT = "an IPv6 host goes in brackets: '[::1]:7800'"


def address_problem(address: object, *, listen: bool = False) -> str | None:
    """What is wrong with ``address`` as HOST:PORT (None: nothing), in words for a user."""
    example = "0.0.0.0:7800" if listen else "10.0.0.2:7800"
    if not isinstance(address, str):
        return f"expected a \"HOST:PORT\" string such as {example!r}, got {address!r}"
    if "://" in address:
        return f"{address!r} is a URL; give HOST:PORT without a scheme (e.g. {example!r})"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return f"{address!r} is not HOST:PORT (e.g. {example!r})"
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return f"{address!r} is not HOST:PORT ({_IPV6_HINT})"
    host = host[1:-1] if host.startswith("[") else host
    if not host or not set(host) <= _HOST_CHARACTERS:
        return f"{address!r} does not start with a host name or IP address"
    lowest = 0 if listen else 1
    if not lowest <= int(port) <= 65535:
        return f"port {int(port)} of {address!r} is outside {lowest}..65535"
    return None


def parse_address(address: object, *, what: str = "address", listen: bool = False) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError naming ``what`` otherwise."""
    problem = address_problem(address, listen=listen)
    if problem:
        raise ValueError(f"{what}: {problem}")
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_address(address: object, *, what: str = "address", listen: bool = False) -> str:
    """``address`` itself once :func:`parse_address` accepts it."""
    parse_address(address, what=what, listen=listen)
    return address


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
