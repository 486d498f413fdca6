"""What the tests share: layouts, comparisons, polling with a deadline, and child programs.

Test modules import from here, never from one another or from conftest (which holds only
fixtures). Child programs live in tests/programs/ as modules, run with ``run_program``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kvwire import KVLayout, Sender, TensorSpec
from kvwire.testing.data import random_kv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ROOT", "assert_same_bytes", "hybrid_layout", "kill", "random_kv", "run_program", "send_all",
           "still_serves", "tls_contexts", "ucx_missing", "wait_until"]


def hybrid_layout(linear_layers: int = 3, state_dim: int = 32) -> KVLayout:
    """Kimi-Linear-like: three linear-attention layers (conv + recurrent state), then MLA."""
    layers = []
    for _ in range(linear_layers):
        layers.append(
            {
                "conv": TensorSpec((4 * state_dim, 4), "float32"),
                "recurrent": TensorSpec((2, state_dim, state_dim), "float32"),
            }
        )
    layers.append(
        {
            "latent": TensorSpec((1, 64), "bfloat16", per_token=True),
            "rope": TensorSpec((1, 16), "bfloat16", per_token=True),
        }
    )
    return KVLayout(layers)


def assert_same_bytes(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].tobytes() == expected[name].tobytes(), f"tensor {name!r} differs"


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.01)


def send_all(tx, request_id, kv, num_tokens, **open_args):
    """Open ``request_id``, send every layer of ``kv`` and finish: the transfer's stats."""
    xfer = tx.open(request_id, num_tokens, **open_args)
    for i, tensors in enumerate(kv):
        xfer.send_layer(i, tensors)
    return xfer.finish(timeout=30)


def still_serves(receiver, layout, secret: bytes, request_id: str = "after", backend: str = "tcp") -> None:
    """A fresh sender's request still arrives whole, and leaves no memory behind."""
    kv = random_kv(layout, 40, seed=3)
    with Sender(layout, receiver.address, secret=secret, streams=2, backend=backend) as tx:
        send_all(tx, request_id, kv, 40)
    with receiver.wait(request_id, timeout=10) as got:
        for i, tensors in enumerate(kv):
            assert_same_bytes(got.layer(i), tensors)
    wait_until(lambda: receiver.bytes_in_use == 0, what="receiver memory freed")


def run_program(name: str, *args: str) -> subprocess.Popen:
    """tests/programs/``name``.py in a second process (for kill -9 tests); its stdin stays
    open: programs that hold a transfer open wait for it to close."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.programs.{name}", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def ucx_missing() -> str | None:
    """Why the ucx backend cannot run here, or None."""
    try:
        from kvwire.transport.ucx import ucx_available
    except ImportError as exc:
        return str(exc)
    return None if ucx_available() else "ucxx is not importable (install kvwire[ucx])"


def tls_contexts(folder, client_trusts="ca"):
    """(server, client) SSLContexts from the ``tls_files`` fixture; the client trusts ``client_trusts``."""
    import ssl

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "ca.pem", folder / "ca.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(folder / f"{client_trusts}.pem")
    return server, client
