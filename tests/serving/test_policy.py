"""Router policies: cache-aware placement, selective offload, the bandwidth-aware threshold."""

import logging

import pytest

from kvwire.metrics import PeerMetrics
from kvwire.transport.base import LinkStats
from serving.errors import NoWorkerError
from serving.policy import (
    LinkSample,
    PrfaasCluster,
    ThresholdConfig,
    ThresholdController,
    WorkerView,
    egress_sample,
    offload,
    place,
    route,
)
from serving.prefix_cache import block_hashes, prompt_blocks

BLOCK = 4
PROMPT = list(range(40))  # 10 blocks; boundaries 4..36 are reusable
PREFIX = block_hashes(PROMPT, BLOCK)


def held(*num_blocks: int) -> frozenset[str]:
    """The hashes a worker reports when it kept the state at these block boundaries."""
    return frozenset(PREFIX[n - 1] for n in num_blocks)


def blocks(tokens=PROMPT):
    return prompt_blocks(tokens, BLOCK)


# ---------------------------------------------------------------- placement


def test_place_maximises_the_reused_prefix():
    workers = [WorkerView("a", held(2)), WorkerView("b", held(1, 6), load=9), WorkerView("c")]
    chosen = place(blocks(), workers)
    assert (chosen.worker, chosen.cached_tokens, chosen.incremental_tokens) == ("b", 24, 16)


def test_only_held_boundaries_count_for_hybrid_models():
    # Holding boundary 2 but not 3 means the state at 12 tokens is gone: reuse stops at 8.
    assert place(blocks(), [WorkerView("a", held(2))]).cached_tokens == 8
    other = frozenset(block_hashes([9] * 40, BLOCK))  # the same block positions, another prefix
    assert place(blocks(), [WorkerView("a", other)]).cached_tokens == 0


def test_place_ties_go_to_the_least_loaded_then_the_first():
    workers = [WorkerView("a", held(3), load=2), WorkerView("b", held(3), load=1), WorkerView("c", held(3), load=1)]
    assert place(blocks(), workers).worker == "b"
    assert place(blocks(), [WorkerView("x"), WorkerView("y")]).worker == "x"
    with pytest.raises(NoWorkerError):
        place(blocks(), [])


def test_a_whole_prompt_hit_still_prefills_the_last_token():
    whole = frozenset(block_hashes(PROMPT, BLOCK))
    chosen = place(blocks(PROMPT), [WorkerView("a", whole)])
    assert (chosen.cached_tokens, chosen.incremental_tokens) == (36, 4)


# ---------------------------------------------------------------- selective offload


def test_offload_rule():
    assert offload(1001, 1000) and not offload(1000, 1000) and not offload(0, 0)


def cluster(t, *workers, name="dc2"):
    return PrfaasCluster(name, t, tuple(workers))


def test_long_requests_offload_and_short_ones_stay_local():
    local = [WorkerView("pd0")]
    assert route(blocks(), local, [cluster(16, WorkerView("p0"))]).cluster == "dc2"
    short = route(blocks(), local, [cluster(40, WorkerView("p0"))])
    assert short.cluster is None and not short.offloaded and "l=40 stays local" in short.reason


def test_a_local_prefix_hit_keeps_a_long_prompt_local():
    local = [WorkerView("pd0"), WorkerView("pd1", held(8))]
    chosen = route(blocks(), local, [cluster(16, WorkerView("p0"))])
    assert chosen.cluster is None and chosen.placement.worker == "pd1"
    assert chosen.placement.incremental_tokens == 8


def test_offload_picks_the_cluster_and_worker_with_the_best_reuse():
    clusters = [cluster(10, WorkerView("a0"), name="a"), cluster(10, WorkerView("b0", held(5)), name="b"),
                cluster(100, WorkerView("c0", held(9)), name="c")]  # c's t is too high for l=40
    chosen = route(blocks(), [WorkerView("pd0")], clusters)
    assert (chosen.cluster, chosen.placement.worker, chosen.placement.cached_tokens) == ("b", "b0", 20)
    assert "offload to b (t=10)" in chosen.reason


def test_route_without_local_or_prfaas_workers():
    only_prfaas = route(blocks(), [], [cluster(10_000, WorkerView("p0"))])
    assert only_prfaas.cluster == "dc2" and "no local" in only_prfaas.reason
    assert route(blocks(), [WorkerView("pd0")], [cluster(0)]).cluster is None  # an empty cluster
    with pytest.raises(NoWorkerError):
        route(blocks(), [], [cluster(0)])


# ---------------------------------------------------------------- threshold controller

GBIT = 1e9


def quiet(**overrides) -> LinkSample:
    values = dict(egress_bps=0.1 * GBIT, capacity_bps=GBIT, rtt_ms=40, min_rtt_ms=40, retransmit_ratio=0.0,
                  queue_depth=0)
    return LinkSample(**{**values, **overrides})


def controller(t=1000, **overrides):
    return ThresholdController(ThresholdConfig(min_tokens=1000, max_tokens=8000, **overrides), t)


def test_a_raise_from_zero_moves_by_a_useful_step():
    ctl = ThresholdController(ThresholdConfig(min_tokens=0, max_tokens=8000, raise_hold_intervals=0), 0)
    assert [ctl.observe(quiet(queue_depth=9)).threshold_tokens for _ in range(3)] == [64, 128, 192]


def test_rtt_counts_only_on_a_loaded_link_and_above_the_floor():
    ctl = controller()
    loaded = 0.4 * GBIT
    # loopback: 0.5 ms against a 0.02 ms minimum is 25x, but no queue worth backing off for
    assert not ctl.observe(quiet(rtt_ms=0.5, min_rtt_ms=0.02, egress_bps=loaded)).changed
    # an app-limited link's smoothed RTT carries delayed acks: not a queue either
    assert not ctl.observe(quiet(rtt_ms=100, egress_bps=0.1 * GBIT)).changed
    assert ctl.observe(quiet(rtt_ms=2.5, min_rtt_ms=0.5, egress_bps=loaded)).changed


@pytest.mark.parametrize("sample, signal", [
    (quiet(egress_bps=0.9 * GBIT), "egress at 90% of capacity"),
    (quiet(rtt_ms=100, egress_bps=0.4 * GBIT), "rtt 2.50x its minimum"),
    (quiet(retransmit_ratio=0.02), "retransmits 2.00% of bytes"),
    (quiet(queue_depth=8), "queue depth 8"),
])
def test_each_pressure_signal_raises_t(sample, signal, caplog):
    ctl = controller()
    with caplog.at_level(logging.INFO, logger="serving.policy"):
        decision = ctl.observe(sample)
    assert decision.changed and decision.threshold_tokens == 1500 == ctl.threshold_tokens
    assert decision.reason.startswith("raise t 1000 -> 1500 (offload less)") and signal in decision.reason
    assert decision.reason in caplog.text


def test_raise_hold_bounds_and_release():
    ctl = controller(raise_hold_intervals=1)
    busy = quiet(egress_bps=0.95 * GBIT)
    steps = [ctl.observe(busy).threshold_tokens for _ in range(8)]
    assert steps == [1500, 1500, 2250, 2250, 3375, 3375, 5063, 5063]
    assert [ctl.observe(busy).threshold_tokens for _ in range(3)] == [7595, 7595, 8000]
    at_max = ctl.observe(busy)
    assert not at_max.changed and "at its maximum 8000" in at_max.reason


def test_idle_link_lowers_t_after_a_streak_down_to_the_minimum():
    ctl = controller(t=2000)
    decisions = [ctl.observe(quiet()) for _ in range(3)]
    assert [d.threshold_tokens for d in decisions] == [2000, 2000, 1600]
    assert decisions[0].reason == "hold t=2000: idle 1/3 intervals"
    assert decisions[2].reason.startswith("lower t 2000 -> 1600 (offload more): link idle for 3 intervals")
    for _ in range(6):
        ctl.observe(quiet())
    assert ctl.threshold_tokens == 1024
    for _ in range(3):
        last = ctl.observe(quiet())
    assert ctl.threshold_tokens == 1000
    for _ in range(3):
        last = ctl.observe(quiet())
    assert not last.changed and "at its minimum 1000" in last.reason


def test_hysteresis_between_idle_and_busy_holds_and_resets_the_streak():
    ctl = controller(t=2000)
    middling = quiet(egress_bps=0.7 * GBIT)  # above idle (50%), below busy (85%)
    sequence = [quiet(), quiet(), middling, quiet(), quiet()]
    decisions = [ctl.observe(s) for s in sequence]
    assert not any(d.changed for d in decisions)
    assert decisions[2].reason == "hold t=2000: signals between idle and busy"
    assert ctl.observe(quiet()).changed  # the third idle interval in a row since the middling one


def test_the_controller_is_deterministic():
    samples = [quiet(egress_bps=x * GBIT, queue_depth=q) for x, q in
               [(0.9, 0), (0.6, 2), (0.2, 0), (0.1, 0), (0.1, 1), (0.99, 9), (0.3, 0)] * 3]
    first, second = controller(), controller()
    runs = [[ctl.observe(s) for s in samples] for ctl in (first, second)]
    assert runs[0] == runs[1]
    assert any(d.changed for d in runs[0]) and any(not d.changed for d in runs[0])


def test_config_and_sample_validation():
    with pytest.raises(ValueError, match="idle_utilization"):
        ThresholdConfig(1, 10, idle_utilization=0.9, busy_utilization=0.8)
    with pytest.raises(ValueError, match="min_tokens"):
        ThresholdConfig(10, 1)
    with pytest.raises(ValueError, match="raise_factor"):
        ThresholdConfig(1, 10, raise_factor=1.0)
    with pytest.raises(ValueError, match="outside"):
        ThresholdController(ThresholdConfig(1000, 2000), 500)
    with pytest.raises(ValueError, match="capacity_bps"):
        LinkSample(egress_bps=1, capacity_bps=0)
    with pytest.raises(ValueError, match="negative"):
        LinkSample(egress_bps=-1, capacity_bps=1)
    assert LinkSample(egress_bps=1, capacity_bps=1, rtt_ms=50).rtt_ratio == 1.0  # no minimum yet: no signal


def link(rtt_ms, min_rtt_ms, bytes_retrans):
    return LinkStats(rtt_ms=rtt_ms, rttvar_ms=1, min_rtt_ms=min_rtt_ms, cwnd_segments=10, total_retrans=0, lost=0,
                     delivery_rate_bps=0, bytes_retrans=bytes_retrans)


def test_egress_sample_from_peer_metrics():
    before = [PeerMetrics("d0", 1_000, 1, 0, 0.0, (link(40, 40, 0),)),
              PeerMetrics("d1", 5_000, 1, 0, 0.0, (link(40, 40, 100),))]
    after = [PeerMetrics("d0", 126_000, 2, 0, 0.0, (link(90, 40, 2_500),)),  # 125 kB sent, 2.5 kB resent
             PeerMetrics("d1", 1_000, 2, 0, 0.0, (link(42, 40, 0),)),  # reconnected: counters restarted
             PeerMetrics("d2", 4_000, 1, 0, 0.0, ())]  # new peer, no TCP_INFO
    sample = egress_sample(before, after, interval_s=1.0, capacity_bps=GBIT, queue_depth=3)
    assert sample.egress_bps == (125_000 + 1_000 + 4_000) * 8
    assert sample.retransmit_ratio == pytest.approx(2_500 / 130_000)
    assert (sample.rtt_ms, sample.min_rtt_ms, sample.queue_depth) == (90, 40, 3)
    with pytest.raises(ValueError, match="interval_s"):
        egress_sample(before, after, interval_s=0, capacity_bps=GBIT, queue_depth=0)
