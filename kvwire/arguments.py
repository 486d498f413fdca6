"""Constructor arguments checked up front, so a typo fails in the caller's line with its
name, not later in a background thread as a TypeError from deep inside (hmac, sockets)."""

from __future__ import annotations

from .layout import KVLayout


def check_layout(layout: object, what: str) -> KVLayout:
    if not isinstance(layout, KVLayout):
        raise TypeError(f"{what}: layout must be a kvwire.KVLayout, got {type(layout).__name__}")
    return layout


def check_secret(secret: object, what: str) -> bytes | None:
    """None (no authentication) or non-empty bytes; a str is refused, since its encoding is a guess."""
    if secret is None:
        return None
    if not isinstance(secret, (bytes, bytearray)):
        hint = " (encode it: secret.encode())" if isinstance(secret, str) else ""
        raise TypeError(f"{what}: secret must be bytes or None, got {type(secret).__name__}{hint}")
    if not secret:
        raise ValueError(f"{what}: secret is empty; give None to run without authentication")
    return bytes(secret)


def check_positive(what: str, **values: float | None) -> None:
    """ValueError naming the first argument that is set and not > 0."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{what}: {name} must be a number > 0, got {value!r}")
