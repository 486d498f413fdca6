"""The connector's options: vLLM's ``kv_connector_extra_config``, checked once at start-up.

A typo in a key or a malformed address must stop the engine with the key named, not
surface later as a transfer that silently never happens.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ...address import check_address
from ...codecs import CODECS

BACKENDS = ("tcp", "ucx", "auto")
LOAD_FAILURE_POLICIES = ("recompute", "fail")


def _address(key: str, value: Any) -> str:
    return check_address(value, what=f"kv_connector_extra_config[{key!r}]", listen=key == "listen")


@dataclass(frozen=True)
class ConnectorConfig:
    """Every key of ``kv_connector_extra_config`` the connector reads (README: "Use with vLLM")."""

    listen: str | None = None  # consumer: where its kvwire Receiver listens
    decode: str | None = None  # producer: decode address for requests that name none
    secret_file: str | None = None
    backend: str = "tcp"
    streams: int | None = None
    codec: str = "none"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    connect_timeout_s: float = 10.0
    transfer_timeout_s: float = 120.0  # a push's deadline, enforced on both sides
    load_timeout_s: float = 120.0  # consumer: wait this long for a push to be opened and land
    lease_s: float = 60.0  # consumer: free pushed KV that no decode request claimed by then
    max_receive_mib: int = 4096  # consumer: receiver memory budget
    verify: bool = True  # checksum every frame; False on both sides skips it (SenderOptions.verify)

    @classmethod
    def parse(cls, extra: dict[str, Any] | None, *, role: str) -> ConnectorConfig:
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"KVWireConnector: unknown kv_connector_extra_config keys {unknown}; known keys: {sorted(known)}"
            )
        for key in ("listen", "decode"):
            if extra.get(key) is not None:
                _address(key, extra[key])
        if extra.get("backend", "tcp") not in BACKENDS:
            raise ValueError(f"kv_connector_extra_config['backend']: {extra['backend']!r} is not one of {BACKENDS}")
        if extra.get("codec", "none") not in CODECS:
            raise ValueError(f"kv_connector_extra_config['codec']: {extra['codec']!r} is not one of {sorted(CODECS)}")
        if not isinstance(extra.get("verify", True), bool):
            raise ValueError(f"kv_connector_extra_config['verify']: expected true or false, got {extra['verify']!r}")
        streams = extra.get("streams")
        if streams is not None and (not isinstance(streams, int) or not 1 <= streams <= 1024):
            raise ValueError(f"kv_connector_extra_config['streams']: expected an integer in 1..1024, got {streams!r}")
        for key in ("connect_timeout_s", "transfer_timeout_s", "load_timeout_s", "lease_s", "max_receive_mib"):
            if key in extra and (not isinstance(extra[key], (int, float)) or extra[key] <= 0):
                raise ValueError(f"kv_connector_extra_config[{key!r}]: expected a positive number, got {extra[key]!r}")
        config = cls(**extra)
        if role in ("kv_consumer", "kv_both") and config.listen is None:
            raise ValueError(
                f"KVWireConnector as {role}: kv_connector_extra_config needs \"listen\": \"HOST:PORT\" "
                "(where this decode instance's kvwire Receiver listens for pushed KV)"
            )
        if config.secret_file is not None:
            config.secret()  # unreadable or empty: fail now, not at the first request
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("kv_connector_extra_config: 'tls_cert' and 'tls_key' go together")
        return config

    def secret(self) -> bytes | None:
        if self.secret_file is None:
            return None
        try:
            secret = Path(self.secret_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"kv_connector_extra_config['secret_file']: cannot read {self.secret_file}: {exc}") from None
        if not secret:
            raise ValueError(f"kv_connector_extra_config['secret_file']: {self.secret_file} is empty")
        return secret

    def client_tls(self) -> ssl.SSLContext | None:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        context.check_hostname = False  # peers are dialled by IP; the CA vouches for them
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def server_tls(self) -> ssl.SSLContext | None:
        if self.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.tls_ca)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        return context
