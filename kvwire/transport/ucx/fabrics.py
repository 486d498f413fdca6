"""What a UCX context offers: its transports, which of them are fabrics (RDMA), and which
processes can share memory with this one."""

from __future__ import annotations

import os
import re
import socket

# UCX transports that stay inside one host, or that UCX runs over plain sockets.
_NOT_FABRICS = frozenset(
    {"self", "tcp", "sysv", "posix", "cma", "knem", "xpmem", "cuda_copy", "cuda_ipc", "gdr_copy"}
    | {"rocm_copy", "rocm_ipc", "rocm_gdr", "ze_copy", "ze_ipc"}
)
_RESOURCE = re.compile(r"resource\s+\d+\s*:.*flags\s+\S+\s+([\w.]+)/")


def context_transports(context_info: str) -> set[str]:
    """The transports in a UCX context's resource list (tcp, cma, cuda_copy, rc, ...)."""
    return {m.group(1) for m in _RESOURCE.finditer(context_info)}


def fabric_transports(context_info: str) -> list[str]:
    """The fabric transports (RDMA: rc, ud, dc, ...) in a UCX context's resource list."""
    return sorted(context_transports(context_info) - _NOT_FABRICS)


def host_id() -> str:
    """Equal for two processes that can share memory: hostname, boot id, pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return f"{socket.gethostname()}/{boot}/{pidns}"
