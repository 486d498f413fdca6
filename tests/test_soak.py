"""A CI-sized fault-injection soak (separate processes, real faults); the full run is
`python -m perf.soak --transfers 1000 --json`."""

from perf.soak import soak


def test_quick_soak_every_transfer_ends_verified_or_with_the_right_error():
    result = soak(16, seed=7)
    assert result["hangs"] == 0
    assert result["corrupted_reported_ready"] == 0
    assert result["wrong_error_class"] == 0, result["outcomes_by_fault"]
    assert result["receiver_alive_after"] is True
    assert result["receiver_bytes_in_use_after"] == 0
    assert result["leaked_fds"] == 0 and result["leaked_threads"] == 0
    assert result["succeeded"] >= 5  # the first five transfers are fault-free
