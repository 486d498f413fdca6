"""Fixtures for the serving tests: tiny seeded checkpoints and running worker processes.

Every worker is a real OS process started through ``python -m serving``; the cluster is
shared by the tests of a session because importing torch is the slow part.
"""


import pytest

from serving.model import block_gpu_kernels, load, write_tiny_checkpoint

block_gpu_kernels()

from .support import KIMI


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Write tiny checkpoints on demand: checkpoints(architecture, dtype) -> path."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def get(architecture=KIMI, dtype="float32"):
        key = (architecture, dtype)
        if key not in made:
            made[key] = write_tiny_checkpoint(root / f"{architecture}-{dtype}", architecture, dtype=dtype)
        return made[key]

    return get


@pytest.fixture(scope="session")
def kimi_dir(checkpoints):
    return checkpoints(KIMI, "float32")


@pytest.fixture(scope="session")
def kimi(kimi_dir):
    return load(kimi_dir)


@pytest.fixture(scope="session")
def cluster(kimi_dir, secret_file):
    """decode, prefill and router processes serving the tiny Kimi-Linear model."""
    from serving.demo import start_cluster, stop

    workers = start_cluster(kimi_dir, secret_file)
    yield {worker.role: worker for worker in workers}
    stop(workers)
