import logging
import os

# Kernels run on numba's CUDA simulator in tests (no GPU here or in CI); set before numba
# loads. KVWIRE_TEST_DEVICE=cuda (perf/gpu_check.sh, on a GPU) runs them on the real device.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0" if os.environ.get("KVWIRE_TEST_DEVICE") == "cuda" else "1")
import signal
import subprocess
import sys
import threading

import pytest

from kvwire import KVLayout, Receiver, Sender, TensorSpec
from kvwire.testing.data import random_kv  # noqa: F401  (re-exported for the tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory):
    """A shared kvwire secret, as the workers and connectors read it (a file)."""
    path = tmp_path_factory.mktemp("secret") / "secret"
    path.write_text(os.urandom(16).hex())
    return path


@pytest.fixture
def layout():
    return hybrid_layout()


@pytest.fixture
def receiver(layout):
    rx = Receiver(layout, "127.0.0.1:0", secret=b"test-secret")
    yield rx
    rx.close()


@pytest.fixture
def sender(layout, receiver):
    tx = Sender(layout, receiver.address, streams=3, secret=b"test-secret")
    yield tx
    tx.close()


def run_in_subprocess(code: str, *args: str) -> subprocess.Popen:
    """A real second process running kvwire (for kill -9 tests)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(autouse=True)
def no_thread_leaks():
    """Every test must leave no kvwire thread behind once its Sender/Receiver are closed."""
    before = {t.ident for t in threading.enumerate()}
    yield
    for _ in range(50):
        leaked = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("kvwire")]
        if not leaked:
            return
        threading.Event().wait(0.1)
    pytest.fail(f"leaked threads: {[t.name for t in leaked]}")


@pytest.fixture(autouse=True)
def _log_level(caplog):
    caplog.set_level(logging.INFO, logger="kvwire")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A folder with two self-signed certificates for 127.0.0.1: ca.pem/key and other.pem/key."""
    folder = tmp_path_factory.mktemp("tls")
    for name in ("ca", "other"):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(folder / f"{name}.key"),
                "-out",
                str(folder / f"{name}.pem"),
            ],
            check=True,
            capture_output=True,
        )
    return folder


def tls_contexts(folder, client_trusts="ca"):
    """(server, client) SSLContexts from ``tls_files``; the client trusts ``client_trusts``."""
    import ssl

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "ca.pem", folder / "ca.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(folder / f"{client_trusts}.pem")
    return server, client
