"""A CI-sized fault-injection soak per backend (separate processes, real faults); the full
runs are `python -m perf.soak --transfers 1000 --backend tcp|ucx --json`."""

import pytest

from perf.soak import soak, ucx_unavailable

# (transfers, seed) per backend; the UCX seed draws each of its six fault kinds in 12 transfers.
RUNS = {"tcp": (16, 7), "ucx": (12, 173)}


@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_quick_soak_every_transfer_ends_verified_or_with_the_right_error(backend):
    if backend == "ucx" and ucx_unavailable():
        pytest.skip(ucx_unavailable())
    transfers, seed = RUNS[backend]
    result = soak(transfers, seed=seed, backend=backend)
    assert result["hangs"] == 0, result["outcomes_by_fault"]
    assert result["corrupted_reported_ready"] == 0
    assert result["wrong_error_class"] == 0, result["outcomes_by_fault"]
    assert result["receiver_alive_after"] is True
    assert result["receiver_bytes_in_use_after"] == 0
    assert result["leaked_fds"] == 0 and result["leaked_threads"] == 0, result
    assert result["succeeded"] >= 5  # the first five transfers are fault-free
