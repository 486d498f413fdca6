"""How many TCP connections, how much socket buffer and which congestion control a link needs.

A pure policy: given what is known about the path (bottleneck bandwidth, round-trip
time, packet loss) and the host's limits, :func:`choose` returns a :class:`Tuning`
(``num_streams``, ``buffer_bytes``, ``congestion_control``) with the reason in words.
Anything set explicitly is kept. Only :meth:`HostLimits.read` looks at the machine.

Why streams
    A loss-based congestion control (reno, cubic) halves its window at every loss. Its
    steady rate is then bounded by the path's loss rate, not by the link (Mathis et al.,
    1997): ``rate ~= MSS / RTT * 1.22 / sqrt(loss)``. Across datacenters that bound is
    small: at 40 ms RTT and 0.1% loss one reno stream with MSS 8948 gets about
    70 Mbit/s, whatever the link's capacity (perf/README.md, "Measurements behind the
    code"). N streams get about N times that, so the policy opens
    ``ceil(bandwidth / per-stream bound)``.
    CUBIC's bound (RFC 8312, section 5.1) is the larger of reno's and
    ``1.054 * MSS / RTT * (RTT / loss) ** 0.75``.

    BBR models the bottleneck instead of reacting to loss and keeps its rate through
    random loss of a few percent: one stream fills a 1 Gbit/s, 40 ms link at 0.1% loss.
    Under BBR only the limits below add streams.

Why buffers
    A stream cannot have more than a window in flight, and a window must cover the
    bandwidth-delay product (BDP) of its share of the link, with headroom: BBR's cwnd gain
    is 2, and reno's sawtooth and the bottleneck queue stretch the RTT. The kernel also
    counts its own per-packet overhead against the socket buffer (about half of it, with
    the default ``tcp_adv_win_scale``). So each stream needs about ``4 * BDP / num_streams``
    bytes of buffer on both hosts. Linux grows buffers by itself (autotuning) up to
    ``net.ipv4.tcp_rmem``/``tcp_wmem`` max (6 MiB by default: about 600 Mbit/s at 40 ms
    for one stream). The policy leaves autotuning on (``buffer_bytes=None``) and adds
    streams until each one's share fits under that ceiling. Pinning SO_SNDBUF/SO_RCVBUF
    instead would turn autotuning off, is capped by ``net.core.wmem_max``/``rmem_max``
    (which a network namespace cannot raise), and on the sender sizes only the send side;
    so it pins only when ``max_streams`` cannot make the shares fit and the core limit is
    the larger one.

Why (optionally) the congestion control
    ``congestion_control="auto"`` picks bbr per socket (TCP_CONGESTION) where the kernel
    allows it: fewer streams, less sensitivity to loss. It is not the default because BBR
    (v1) takes more than its share from loss-based flows on a shared path; the operator
    of a dedicated link can opt in. ``None`` keeps the host's default.

Unknowns
    RTT is measured by the caller (TCP_INFO of the first connection). An unknown
    bandwidth is taken as ``assumed_bandwidth_bps`` (10 Gbit/s, a datacenter NIC), an
    unknown loss rate as ``assumed_loss`` (0.1%, a lossy WAN path): guessing too high
    costs a few idle sockets and threads, guessing too low leaves most of a long fat link
    unused. On a LAN or loopback (RTT well under a millisecond) every rule gives one stream,
    plus one per ``per_stream_bps`` of bandwidth for the CPU (what one kvwire connection
    moves on loopback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSS_BASED = ("reno", "cubic", "htcp", "highspeed", "scalable", "westwood", "illinois", "veno", "bic", "vegas")
ASSUMED_BANDWIDTH_BPS = 10e9
ASSUMED_LOSS = 1e-3
PER_STREAM_BPS = 20e9
DEFAULT_MAX_STREAMS = 16
_MIN_LOSS = 1e-7
_WINDOW_HEADROOM = 2.0
_KERNEL_OVERHEAD = 2.0


@dataclass(frozen=True)
class LinkEstimate:
    """What is known about the path: bandwidth in bit/s, RTT in seconds, loss per packet.

    ``bandwidth_bps`` and ``loss`` may be None (unknown); ``mss_bytes`` is the TCP
    payload per packet (1448 for MTU 1500, 8948 for MTU 9000).
    """

    rtt_s: float
    bandwidth_bps: float | None = None
    loss: float | None = None
    mss_bytes: int = 1448

    def __post_init__(self) -> None:
        if not 0 <= self.rtt_s < 60:
            raise ValueError(f"rtt_s must be in [0, 60), got {self.rtt_s}")
        if self.bandwidth_bps is not None and not self.bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be positive, got {self.bandwidth_bps}")
        if self.loss is not None and not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if not 88 <= self.mss_bytes <= 65_495:
            raise ValueError(f"mss_bytes must be in [88, 65495], got {self.mss_bytes}")


@dataclass(frozen=True)
class HostLimits:
    """The host's TCP limits that bound one connection's window.

    ``tcp_buffer_max_bytes``: the smaller of ``net.ipv4.tcp_rmem`` and ``tcp_wmem`` max
    (the autotuning ceiling); ``core_buffer_max_bytes``: the smaller of
    ``net.core.rmem_max`` and ``wmem_max`` (the ceiling of a pinned buffer, which the
    kernel doubles); ``congestion_control``: the default; ``allowed_congestion_control``:
    what a socket may choose.
    """

    tcp_buffer_max_bytes: int = 6 << 20
    core_buffer_max_bytes: int = 208 << 10
    congestion_control: str = "cubic"
    allowed_congestion_control: tuple[str, ...] = ("reno", "cubic")

    @classmethod
    def read(cls, proc_sys: str = "/proc/sys") -> HostLimits:
        """This host's (this network namespace's) limits; the defaults where unreadable."""

        def text(path: str) -> str | None:
            try:
                with open(f"{proc_sys}/{path}") as f:
                    return f.read().strip()
            except OSError:
                return None

        def last_int(*paths: str, default: int) -> int:
            values = [int(t.split()[-1]) for t in map(text, paths) if t]
            return min(values) if values else default

        default = cls()
        return cls(
            tcp_buffer_max_bytes=last_int(
                "net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem", default=default.tcp_buffer_max_bytes
            ),
            core_buffer_max_bytes=last_int(
                "net/core/rmem_max", "net/core/wmem_max", default=default.core_buffer_max_bytes
            ),
            congestion_control=text("net/ipv4/tcp_congestion_control") or default.congestion_control,
            allowed_congestion_control=tuple(
                (
                    text("net/ipv4/tcp_allowed_congestion_control") or " ".join(default.allowed_congestion_control)
                ).split()
            ),
        )


@dataclass(frozen=True)
class Tuning:
    """The decision: pass ``num_streams`` to Sender(streams=...), the rest to TcpOptions."""

    num_streams: int
    buffer_bytes: int | None
    congestion_control: str | None
    stream_bound_bps: float
    reason: str


def per_stream_bound_bps(congestion_control: str, link: LinkEstimate, loss: float) -> float:
    """Steady rate one stream of ``congestion_control`` can hold on ``link`` at ``loss``.

    Infinite for BBR (and for any control not known to be loss-based, to be safe: it
    then gets streams only for the buffer and CPU limits).
    """
    if congestion_control not in LOSS_BASED or link.rtt_s <= 0:
        return math.inf
    loss = max(loss, _MIN_LOSS)
    segments_per_rtt = 1.22 / math.sqrt(loss)
    if congestion_control == "cubic":
        segments_per_rtt = max(segments_per_rtt, 1.054 * (link.rtt_s / loss) ** 0.75)
    return segments_per_rtt * link.mss_bytes * 8 / link.rtt_s


def stream_buffer_bytes(bandwidth_bps: float, rtt_s: float, num_streams: int) -> int:
    """Socket buffer one of ``num_streams`` streams needs: 4 x its share of the BDP."""
    share = bandwidth_bps / 8 * rtt_s / num_streams
    return max(256 << 10, math.ceil(_WINDOW_HEADROOM * _KERNEL_OVERHEAD * share))


def choose(
    link: LinkEstimate,
    host: HostLimits,
    *,
    streams: int | None = None,
    buffer_bytes: int | None = None,
    congestion_control: str | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
    assumed_bandwidth_bps: float = ASSUMED_BANDWIDTH_BPS,
    assumed_loss: float = ASSUMED_LOSS,
    per_stream_bps: float = PER_STREAM_BPS,
) -> Tuning:
    """Streams, buffer size and congestion control for ``link`` on ``host``.

    Parameters
    ----------
    link : LinkEstimate
        Measured RTT; declared or measured bandwidth and loss (None: unknown).
    host : HostLimits
        Buffer ceilings and congestion controls of this host (``HostLimits.read()``).
    streams, buffer_bytes : int, optional
        Set explicitly: kept as given (``buffer_bytes`` then bounds the window per stream).
    congestion_control : str, optional
        A name to use per socket, ``"auto"`` (bbr if allowed, else the host's default)
        or None (the host's default, not set per socket).
    max_streams : int
        Upper bound on the streams the policy opens.

    Returns
    -------
    Tuning
        With ``reason``, a sentence saying which limit set the stream count.
    """
    if max_streams < 1:
        raise ValueError(f"max_streams must be >= 1, got {max_streams}")
    chosen_cc = resolve_congestion_control(congestion_control, host)
    effective_cc = chosen_cc or host.congestion_control
    bandwidth = link.bandwidth_bps or assumed_bandwidth_bps
    loss = assumed_loss if link.loss is None else link.loss
    bound = per_stream_bound_bps(effective_cc, link, loss)
    assumed_loss_note = " (assumed)" if link.loss is None else ""
    assumed_bandwidth_note = " (assumed)" if link.bandwidth_bps is None else ""
    notes = [
        f"{effective_cc} at {link.rtt_s * 1000:.3g} ms RTT, {loss:.2g} loss{assumed_loss_note}, "
        + f"{bandwidth / 1e6:.6g} Mbit/s{assumed_bandwidth_note}"
    ]
    if streams is not None:
        if not 1 <= streams <= 1024:
            raise ValueError(f"streams must be in 1..1024, got {streams}")
        notes.append(f"{streams} streams as set")
        return Tuning(streams, buffer_bytes, chosen_cc, bound, "; ".join(notes))

    wanted = {
        "loss": math.ceil(bandwidth / bound) if math.isfinite(bound) else 1,
        "cpu": math.ceil(bandwidth / per_stream_bps),
    }
    # a pinned buffer of b bytes is min(b, core max) doubled by the kernel
    ceiling = 2 * min(buffer_bytes, host.core_buffer_max_bytes) if buffer_bytes else host.tcp_buffer_max_bytes
    wanted["buffer"] = math.ceil(stream_buffer_bytes(bandwidth, link.rtt_s, 1) / ceiling)
    limit = max(wanted, key=lambda k: wanted[k])
    num_streams = min(max_streams, max(1, wanted[limit]))
    notes.append(
        f"{num_streams} stream(s) for the {limit} limit "
        f"({', '.join(f'{k} {v}' for k, v in wanted.items())}; max {max_streams})"
    )

    need = stream_buffer_bytes(bandwidth, link.rtt_s, num_streams)
    if (
        buffer_bytes is None
        and need > host.tcp_buffer_max_bytes
        and 2 * host.core_buffer_max_bytes > host.tcp_buffer_max_bytes
    ):
        buffer_bytes = min(math.ceil(need / 2), host.core_buffer_max_bytes)
        notes.append(f"buffers pinned at {buffer_bytes} bytes: autotuning stops at {host.tcp_buffer_max_bytes}")
    elif buffer_bytes is None:
        notes.append(
            f"buffers left to autotuning ({need} bytes per stream needed, ceiling {host.tcp_buffer_max_bytes})"
        )
    return Tuning(num_streams, buffer_bytes, chosen_cc, bound, "; ".join(notes))


def resolve_congestion_control(requested: str | None, host: HostLimits) -> str | None:
    """What to set per socket: ``requested``, or for ``"auto"`` bbr where allowed and not already the default."""
    if requested is None:
        return None
    if requested == "auto":
        return "bbr" if "bbr" in host.allowed_congestion_control and host.congestion_control != "bbr" else None
    return requested
