"""UCX backend over ucxx: kvwire's byte stream carried by UCX tag messages.

Why it looks the way it does:

- **Bootstrap over TCP.** ``listen("HOST:PORT")`` opens a plain TCP port. A client connects,
  both sides swap their UCX worker addresses (msgspec, bounded), create an endpoint to the
  other's worker, and ping each other over UCX before the connection is handed up. The TCP
  socket then stays open, idle, as the *liveness channel*: the kernel closes it when the
  peer process dies, which wakes any thread waiting on UCX (see "shared memory").
- **Error handling on; shared memory only when asked for.** By default every endpoint runs
  with UCX error handling ("peer"): UCX reports a dead peer itself and its errors
  (connection reset, endpoint timeout) are mapped. In that mode UCX refuses sm/posix/cma, so
  on one host the bytes go over UCX's tcp transport (RDMA across hosts where there is some).
  ``UcxOptions(shared_memory=True)`` on both sides gives peers on the same host (same
  hostname, boot id and pid namespace) endpoints *without* error handling, so UCX may use
  shared memory / CMA / cuda_ipc (several times the loopback throughput), and a peer's death
  is seen through the liveness socket. It is not the default because UCX does not survive a
  peer killed mid-transfer on such endpoints (found by ``perf.soak --backend ucx``): a CMA
  read from the dead process is a FATAL UCX error, i.e. ``abort()`` of this process, and a
  writer killed inside this process's shared-memory FIFO leaves the FIFO stuck for every
  later peer. Opt in where peers live and die together (one job, one failure domain).
- **Byte stream over tag messages.** Each ``send(buffers)`` becomes one small control
  message (buffers under ``inline_bytes`` copied into it, and the lengths of the others)
  followed by one tag message per large buffer, sent straight from the caller's memory
  (UCX rendezvous: CMA on one host, zero-copy on RDMA, GPU memory as is). Where UCX has
  neither RDMA nor a GPU, messages up to a control message's size go eagerly (no
  handshake each: ``options.TUNED_DEFAULTS``). ``send`` returns
  while its own messages and up to ``send_window_bytes`` of earlier ones are still in
  flight (as a TCP send returns once the kernel holds the bytes), keeping the buffers
  referenced until UCX is done. ``send_now`` posts a few control bytes (a request's Open)
  from the engine's thread; layers go to the stream's writer, which joins those queued
  together into one control message (up to 1 MiB), since the receiver takes each message
  on its own. The receiver posts each large message's receive straight
  into the destination ``recv_into`` was given, so bulk bytes land in place with no
  Python copy. Tags are ``(connection id << 32) | sequence number``, so many connections
  share one worker.
- **Threads drive progress.** One UCX worker per process, progressed by whichever thread
  is waiting on it (no ucxx progress thread, no event loop: faster on loopback, perf/README.md
  "Measurements behind the code"). One waiting thread at a time leads: it blocks in epoll
  (GIL released) on the worker's event fd, every connection's liveness socket and a kick
  eventfd, progresses the worker and wakes the others; nothing spins while idle. While no
  thread waits, one idle daemon thread leads the same way, so UCX still closes the sockets
  of departed peers. Every call into ucxx holds one lock (``_Hub.lock``): ucxx crashed when
  an endpoint was closed while another thread progressed the worker.
- **Peer death without error handling.** A waiter learns of it from the liveness socket
  (EOF or reset) after one more progress, so bytes the peer sent before dying still count;
  on any failure the endpoint is closed (a forced close that cancels its requests first
  with error handling; otherwise each posted receive is completed by a message from the
  worker to itself, since a flushing close can wait on it forever) and ``recv_into`` /
  ``send`` return once UCX has let go of the caller's buffers (or, if UCX has not within
  ``_CLOSE_GRACE_S``, those buffers are kept referenced forever rather than reused).

All UCX errors become kvwire errors in ``library.map_error`` and nowhere else.

The package: ``options`` (UCX settings kvwire tunes), ``fabrics`` (what a context offers),
``library`` (importing ucxx, its errors), ``hub`` (the worker and its progress),
``control`` (the control message's framing), ``bootstrap``, ``connection``, ``listener``;
the backend is here.
"""

from __future__ import annotations

from ...address import parse_address
from ...errors import KVWireError
from ..base import Capabilities, TcpOptions, UcxOptions, check_options
from ..sockets import configure_socket, dial
from .bootstrap import MAGIC, accept_bootstrap, bootstrap, peek_magic
from .connection import UcxConnection
from .fabrics import context_transports, fabric_transports
from .hub import Hub
from .library import map_error, ucx_available
from .listener import UcxListener
from .options import tuned_defaults

__all__ = ["MAGIC", "UcxBackend", "UcxConnection", "UcxListener", "UcxOptions", "accept_bootstrap",
           "context_transports", "fabric_transports", "fabrics", "local_capabilities", "map_error", "peek_magic",
           "tuned_defaults", "ucx_available"]


def fabrics(options: UcxOptions | None = None) -> list[str]:
    """This process's UCX fabric transports (starting its UCX context if need be)."""
    return Hub.get(options or UcxOptions()).fabrics


def local_capabilities(options: UcxOptions | None = None) -> Capabilities:
    """What UCX offers from this process before any peer is known: whether it takes CUDA
    memory, its fabric transports, and whether shared memory is offered to a peer on this
    host. Starts the process's UCX context; raises where UCX cannot start."""
    options = options or UcxOptions()
    hub = Hub.get(options)
    return Capabilities("ucx", device_memory=hub.takes_device_memory, default_streams=1,
                        fabrics=tuple(hub.fabrics), shared_memory=options.shared_memory)


class UcxBackend:
    """``backend="ucx"``: host and CUDA memory over UCX; no TLS (use ``tcp`` across sites)."""

    name = "ucx"
    options_type = UcxOptions

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None) -> UcxConnection:
        if ssl_context is not None:
            raise ValueError("the ucx backend has no TLS; use backend='tcp' (or 'auto') with an ssl_context")
        options = check_options(self.name, options, self.options_type)
        host, port = parse_address(address, what="peer address")
        sock = dial(address, host, port, timeout_s)
        configure_socket(sock, TcpOptions(peer_timeout_s=options.peer_timeout_s))
        try:
            return bootstrap(sock, address, options, client=True, timeout_s=timeout_s)
        except KVWireError:
            sock.close()
            raise

    def listen(self, address: str, *, ssl_context=None, options=None) -> UcxListener:
        if ssl_context is not None:
            raise ValueError("the ucx backend has no TLS; use backend='tcp' (or 'auto') with an ssl_context")
        return UcxListener(address, check_options(self.name, options, self.options_type))
