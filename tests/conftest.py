import logging
import os

# Kernels run on numba's CUDA simulator in tests (no GPU here or in CI); set before numba
# loads. KVWIRE_TEST_DEVICE=cuda (perf/gpu_check.sh, on a GPU) runs them on the real device.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0" if os.environ.get("KVWIRE_TEST_DEVICE") == "cuda" else "1")
import subprocess
import threading

import pytest

from kvwire import Receiver, Sender

from .support import hybrid_layout


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
