"""How a Sender connects: dial and handshake each stream, all at once, and decide how many
streams to open from what the first one measures.

A session is one Sender's: every connection carries its session id and stream index, so
the receiver can tell a resumed connection from a new sender.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

from .errors import MISCONFIGURATIONS, KVWireError
from .handshake import client_handshake
from .layout import KVLayout
from .options import SenderOptions
from .transport import Connection, get_backend
from .transport.base import tcp_settings, with_tcp_settings
from .transport.tuning import HostLimits, LinkEstimate, Tuning, choose, resolve_congestion_control
from .wire.messages import Welcome

log = logging.getLogger(__name__)


class Dialer:
    """Opens a sender session's connections to ``address`` (the options are checked)."""

    def __init__(self, layout: KVLayout, address: str, options: SenderOptions):
        self.layout = layout
        self.address = address
        self.options = options
        self.backend = get_backend(options.backend)
        self.transport_options = options.transport_options  # tuned below
        self.session_id = os.urandom(16)
        self.num_streams = options.streams
        self.tuning: Tuning | None = None

    def connect(self) -> tuple[list[Connection], Welcome]:
        """Every stream of the session, and the receiver's Welcome; a kvwire error (the most
        telling one: a misconfiguration before a lost connection) if any fails."""
        host = HostLimits.read()
        tcp = tcp_settings(self.transport_options)
        if tcp is not None and tcp.congestion_control == "auto":
            tcp = replace(tcp, congestion_control=resolve_congestion_control("auto", host))
            self.transport_options = with_tcp_settings(self.transport_options, tcp)
        if self.num_streams is not None:
            return self._connect_all()
        return self._connect_tuned(host)

    def dial(self, index: int, *, resume: bool) -> tuple[Connection, Welcome]:
        """Connect and handshake stream ``index``; (connection, Welcome) or a kvwire error."""
        timeout_s = self.options.connect_timeout_s
        conn = self.backend.connect(
            self.address, timeout_s=timeout_s, ssl_context=self.options.ssl_context, options=self.transport_options
        )
        try:
            conn.set_timeout(timeout_s)
            welcome = client_handshake(
                conn,
                layout=self.layout,
                secret=self.options.secret,
                session_id=self.session_id,
                stream_index=index,
                num_streams=self.num_streams,
                resume=resume,
                verify=self.options.verify,
                timeout_s=timeout_s,
            )
            conn.set_timeout(None)
        except KVWireError:
            conn.close()
            raise
        return conn, welcome

    def _connect_tuned(self, host: HostLimits) -> tuple[list[Connection], Welcome]:
        """One connection measures the RTT; the tuning policy decides how many to open in all."""
        self.num_streams = 1
        first, welcome = self._connect_all()
        capabilities = first[0].capabilities
        stats = first[0].link_stats() if capabilities.link_stats else None
        if stats is None:
            self.num_streams = capabilities.default_streams
            log.info("streams to %s: %d (%s connection)", self.address, self.num_streams, capabilities.backend)
        else:
            link = LinkEstimate(rtt_s=(stats.min_rtt_ms or stats.rtt_ms) / 1000,
                                bandwidth_bps=self.options.link_bandwidth_bps, loss=self.options.link_loss)
            tcp = tcp_settings(self.transport_options)
            self.tuning = choose(
                link,
                host,
                buffer_bytes=None if tcp is None else tcp.buffer_bytes,
                congestion_control=None if tcp is None else tcp.congestion_control,
            )
            log.info("streams to %s: %s", self.address, self.tuning.reason)
            self.num_streams = self.tuning.num_streams
            if tcp is not None and self.tuning.buffer_bytes != tcp.buffer_bytes:
                tuned = replace(tcp, buffer_bytes=self.tuning.buffer_bytes)
                self.transport_options = with_tcp_settings(self.transport_options, tuned)
        try:
            rest, _ = self._connect_all(first_index=1)
        except KVWireError:
            first[0].close()
            raise
        return first + rest, welcome

    def _connect_all(self, first_index: int = 0):
        """All streams at once (a WAN handshake costs round trips; do them in parallel)."""
        indices = range(first_index, self.num_streams)
        results: list = [None] * len(indices)

        def one(slot: int, index: int) -> None:
            try:
                results[slot] = self.dial(index, resume=False)
            except Exception as exc:  # noqa: BLE001 (any error reaches the caller as itself, not as a missing result)
                results[slot] = exc

        threads = [threading.Thread(target=one, args=pair, daemon=True) for pair in enumerate(indices)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            for result in results:
                if isinstance(result, tuple):
                    result[0].close()
            decisive = (*MISCONFIGURATIONS, ValueError, TypeError)
            raise next((e for e in errors if isinstance(e, decisive)), errors[0])
        return [conn for conn, _ in results], (results[0][1] if results else None)
