"""The stream/buffer/congestion-control policy, on given numbers (no sockets)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.transport.tuning import HostLimits, LinkEstimate, choose, per_stream_bound_bps, stream_buffer_bytes

WAN = LinkEstimate(rtt_s=0.040, bandwidth_bps=1e9, loss=1e-3, mss_bytes=8948)  # the `perf wan` link
RAISED = HostLimits(
    tcp_buffer_max_bytes=32 << 20,
    core_buffer_max_bytes=4 << 20,
    congestion_control="reno",
    allowed_congestion_control=("reno", "bbr"),
)
BBR = HostLimits(
    tcp_buffer_max_bytes=32 << 20,
    core_buffer_max_bytes=4 << 20,
    congestion_control="bbr",
    allowed_congestion_control=("reno", "bbr"),
)


def test_one_reno_stream_is_bounded_by_loss_near_70_mbit():
    assert per_stream_bound_bps("reno", WAN, 1e-3) == pytest.approx(69e6, rel=0.02)


def test_reno_opens_enough_streams_to_fill_a_lossy_long_link():
    tuning = choose(WAN, RAISED)
    assert tuning.num_streams == 15  # ceil(1 Gbit/s / 69 Mbit/s)
    assert tuning.buffer_bytes is None and tuning.congestion_control is None
    assert "loss limit" in tuning.reason


def test_bbr_fills_the_same_link_with_one_stream():
    tuning = choose(WAN, BBR)
    assert tuning.num_streams == 1
    assert tuning.buffer_bytes is None


def test_default_buffer_ceiling_adds_streams_even_under_bbr():
    stock = HostLimits(tcp_buffer_max_bytes=6 << 20, core_buffer_max_bytes=208 << 10, congestion_control="bbr")
    tuning = choose(WAN, stock)
    assert tuning.num_streams == 4  # 4 x 5 MB BDP over a 6 MiB autotuning ceiling
    assert tuning.buffer_bytes is None  # pinning could only make it smaller here
    assert "buffer limit" in tuning.reason


def test_loopback_gets_one_stream():
    loopback = LinkEstimate(rtt_s=50e-6, mss_bytes=65483)  # bandwidth and loss unknown
    assert choose(loopback, RAISED).num_streams == 1


def test_unknown_loss_is_assumed_lossy_and_said_so():
    tuning = choose(LinkEstimate(rtt_s=0.040, bandwidth_bps=1e9, mss_bytes=8948), RAISED)
    assert tuning.num_streams == 15
    assert "(assumed)" in tuning.reason


def test_explicit_settings_are_kept():
    tuning = choose(WAN, RAISED, streams=3, buffer_bytes=1 << 20, congestion_control="bbr")
    assert (tuning.num_streams, tuning.buffer_bytes, tuning.congestion_control) == (3, 1 << 20, "bbr")


def test_explicit_small_buffer_needs_more_streams():
    tuning = choose(WAN, BBR, buffer_bytes=1 << 20)  # pinned 1 MiB -> 2 MiB with the kernel's doubling
    assert tuning.num_streams == math.ceil(stream_buffer_bytes(1e9, 0.040, 1) / (2 << 20))
    assert tuning.buffer_bytes == 1 << 20


def test_pins_buffers_only_when_streams_run_out_and_the_core_limit_is_larger():
    host = HostLimits(tcp_buffer_max_bytes=6 << 20, core_buffer_max_bytes=16 << 20, congestion_control="bbr")
    fat = LinkEstimate(rtt_s=0.040, bandwidth_bps=10e9, loss=1e-4)
    tuning = choose(fat, host, max_streams=2)
    assert tuning.num_streams == 2
    assert tuning.buffer_bytes == 16 << 20


def test_auto_congestion_control_prefers_bbr_where_allowed():
    auto = choose(WAN, RAISED, congestion_control="auto")
    assert auto.congestion_control == "bbr" and auto.num_streams == 1
    reno_only = HostLimits(
        tcp_buffer_max_bytes=32 << 20, congestion_control="reno", allowed_congestion_control=("reno",)
    )
    kept = choose(WAN, reno_only, congestion_control="auto")
    assert kept.congestion_control is None and kept.num_streams == 15


def test_cubic_bound_is_at_least_renos():
    for loss in (1e-6, 1e-4, 1e-2):
        assert per_stream_bound_bps("cubic", WAN, loss) >= per_stream_bound_bps("reno", WAN, loss)


@settings(max_examples=200, deadline=None)
@given(
    rtt=st.floats(1e-5, 0.5),
    bandwidth=st.floats(1e6, 400e9),
    loss=st.floats(0, 0.2),
    cc=st.sampled_from(["reno", "cubic", "bbr"]),
)
def test_streams_stay_in_bounds_and_grow_with_loss_and_rtt(rtt, bandwidth, loss, cc):
    host = HostLimits(tcp_buffer_max_bytes=32 << 20, congestion_control=cc)
    base = choose(LinkEstimate(rtt_s=rtt, bandwidth_bps=bandwidth, loss=loss), host)
    assert 1 <= base.num_streams <= 16
    worse = choose(LinkEstimate(rtt_s=rtt * 2, bandwidth_bps=bandwidth, loss=min(0.5, loss * 2)), host)
    assert worse.num_streams >= base.num_streams


def test_host_limits_read_from_proc_sys(tmp_path):
    for path, value in {
        "net/ipv4/tcp_rmem": "4096 131072 33554432",
        "net/ipv4/tcp_wmem": "4096 16384 16777216",
        "net/core/rmem_max": "4194304",
        "net/core/wmem_max": "212992",
        "net/ipv4/tcp_congestion_control": "bbr",
        "net/ipv4/tcp_allowed_congestion_control": "reno bbr",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(value + "\n")
    host = HostLimits.read(str(tmp_path))
    assert host == HostLimits(16 << 20, 212992, "bbr", ("reno", "bbr"))
    assert HostLimits.read(str(tmp_path / "missing")) == HostLimits()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rtt_s": -1},
        {"rtt_s": 0.01, "bandwidth_bps": 0},
        {"rtt_s": 0.01, "loss": 1.0},
        {"rtt_s": 0.01, "mss_bytes": 10},
    ],
)
def test_link_estimate_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        LinkEstimate(**kwargs)


def test_rejects_bad_stream_settings():
    with pytest.raises(ValueError, match="streams"):
        choose(WAN, RAISED, streams=0)
    with pytest.raises(ValueError, match="max_streams"):
        choose(WAN, RAISED, max_streams=0)
