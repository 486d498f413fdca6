"""The router's Fleet: routing on what workers reported, and the control step per cluster."""

import pytest

from kvwire.metrics import PeerMetrics
from serving.fleet import Fleet
from serving.prefix_cache import block_hashes
from serving.router_config import PrfaasConfig, RouterConfig

GEOMETRY = (4, "salt")


def fleet(threshold=10):
    far = PrfaasConfig("far", ["http://p1"], egress_gbps=0.001, threshold_tokens=threshold, max_threshold_tokens=1000,
                       kv_addresses={"http://d2": "wan:2"})
    f = Fleet(RouterConfig(decode=["http://d1", "http://d2"], prefill=["http://l1"], prfaas=[far]))
    f.geometry = GEOMETRY
    for worker in f.workers.values():
        worker.geometry = GEOMETRY
    return f


def holds(f, url, tokens):
    f.workers[url].blocks = frozenset(block_hashes(tokens, 4, b"salt"))


def test_short_prompt_stays_local_and_long_goes_far():
    f = fleet()
    assert f.decide(list(range(10))).route.cluster is None
    decision = f.decide(list(range(11)))
    assert decision.route.cluster == "far" and decision.route.placement.worker == "http://p1"
    assert decision.decode.worker == "http://d1" and decision.kv_address is None and decision.send_boundary


def test_prefix_holders_win_and_the_kv_starts_after_the_decode_prefix():
    f = fleet()
    prompt = list(range(30))
    holds(f, "http://d2", prompt[:16])
    holds(f, "http://l1", prompt[:24])
    decision = f.decide(prompt)
    # l on the local worker is 30 - 24 = 6 <= t: stays local even though the prompt is long
    assert decision.route.cluster is None and decision.route.placement.cached_tokens == 24
    assert decision.decode.worker == "http://d2" and decision.decode.cached_tokens == 16
    assert decision.decode_hash == block_hashes(prompt[:16], 4, b"salt")[-1]


def test_another_model_s_prefixes_are_ignored():
    f = fleet()
    prompt = list(range(30))
    holds(f, "http://d2", prompt[:16])
    f.workers["http://d2"].geometry = (8, "other")
    f.workers["http://d1"].in_flight = 1  # without its prefix, d2 wins as the less busy
    decision = f.decide(prompt)
    assert decision.decode.worker == "http://d2" and decision.decode.cached_tokens == 0 and not decision.send_boundary


def test_kv_address_as_reached_from_the_cluster():
    f = fleet()
    f.workers["http://d1"].in_flight = 5  # d2 is less busy
    decision = f.decide(list(range(20)))
    assert decision.decode.worker == "http://d2" and decision.kv_address == "wan:2"


def test_a_busy_link_raises_t_and_records_why():
    f = fleet()
    cluster = f.clusters["far"]
    f.workers["http://p1"].peers = [PeerMetrics("p1>d1", bytes=0, requests_completed=0, requests_failed=0, goodput_bps=0)]
    f.step(cluster, now=100.0)
    f.workers["http://p1"].peers = [PeerMetrics("p1>d1", bytes=125_000, requests_completed=1, requests_failed=0, goodput_bps=0)]
    f.step(cluster, now=101.0)  # 1 Mbit/s on a 1 Mbit/s link
    assert cluster.controller.threshold_tokens == 74  # 10 + the minimum step of 64
    (change,) = cluster.changes
    assert change["t"] == 74 and "egress at 100% of capacity" in change["reason"]
    assert f.health()["thresholds"]["far"]["threshold_tokens"] == 74


def test_t_holds_while_a_worker_of_the_cluster_does_not_answer():
    f = fleet()
    cluster, worker = f.clusters["far"], f.workers["http://p1"]
    worker.peers = [PeerMetrics("p1>d1", bytes=0, requests_completed=0, requests_failed=0, goodput_bps=0)]
    f.step(cluster, now=100.0)
    worker.error = "timed out"  # unreachable: its last snapshot would read as an idle link, then as a burst
    for now in (101.0, 102.0, 103.0, 104.0):
        f.step(cluster, now)
    assert cluster.controller.threshold_tokens == 10 and not cluster.changes
    worker.error = None
    worker.peers = [PeerMetrics("p1>d1", bytes=10**6, requests_completed=1, requests_failed=0, goodput_bps=0)]
    f.step(cluster, now=105.0)  # the first answer only starts a new interval
    assert not cluster.changes and cluster.previous_time == 105.0


def test_a_cluster_whose_workers_do_not_answer_gets_nothing():
    f = fleet()
    f.workers["http://p1"].error = "connection refused"
    decision = f.decide(list(range(40)))  # l = 40 > t = 10, but the only PrfaaS worker is gone
    assert decision.route.cluster is None and decision.route.placement.worker == "http://l1"


def test_queue_depth_counts_prefills_not_decoding_requests():
    f = fleet()
    cluster = f.clusters["far"]
    f.workers["http://d1"].in_flight = 20  # decoding: not the PrfaaS cluster's queue
    f.workers["http://p1"].in_flight = 3  # one running, two waiting
    f.step(cluster, now=1.0)
    f.step(cluster, now=2.0)
    assert cluster.last_sample.queue_depth == 2


def vllm_pair():
    """A Fleet of one vLLM prefill and one vLLM decode server, both answering."""
    from serving.identify import Identity

    f = Fleet(RouterConfig(decode=["http://d"], prefill=["http://p"]))
    f.workers["http://p"].identity = Identity("vllm", "prefill", "m")
    f.workers["http://d"].identity = Identity("vllm", "decode", "m", kv_address="d:7800")
    for worker in f.workers.values():
        worker.engine = "vllm"
    return f


def test_a_refused_vllm_push_refuses_the_pair_until_it_is_checked_again(monkeypatch):
    from serving import fleet as fleet_module
    from serving.errors import PairRefused, UpstreamError
    from serving.router import Router
    from serving.vllm_upstream import refuse_misconfigured

    f = vllm_pair()
    f.check_pairs(session=None)
    assert f.decide([1, 2, 3]).kv_address == "d:7800"
    router = Router.__new__(Router)
    router.fleet = f
    error = ("this prefill instance cannot push to the decode instance at d:7800: AuthenticationError: receiver at "
             "d:7800 failed to prove the shared secret (it has a different secret)")
    with pytest.raises(UpstreamError) as caught:
        refuse_misconfigured(router, error, "http://p", "http://d")
    assert (caught.value.status, caught.value.error_type) == (502, "AuthenticationError")
    assert str(caught.value).endswith("(a misconfiguration: not recomputed)")
    refuse_misconfigured(router, "PeerLostError: cannot connect to d:7800", "http://p", "http://d")  # not one
    f.check_pairs(session=None)  # a poll keeps the refusal: nothing can probe a vLLM pair
    with pytest.raises(PairRefused, match="prefill server http://p cannot send KV to decode server http://d: this"):
        f.decide([1, 2, 3])
    assert f.unavailable().startswith("prefill server http://p cannot send KV")
    monkeypatch.setattr(fleet_module, "PROBE_EVERY_S", 0.0)  # ... until it is due again
    f.check_pairs(session=None)
    assert f.decide([1, 2, 3]).kv_address == "d:7800" and f.unavailable() is None
