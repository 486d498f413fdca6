"""Failures become clear HTTP errors or a recomputed prefill, quickly, never wrong tokens."""

import json
import socket
import time

import numpy as np

from serving import client, launch
from serving.steps import generate_monolithic

from .support import PROMPT, prefill_count, router, wait_for_health


def test_a_transfer_that_fails_in_transit_is_recomputed_with_the_same_tokens(cluster, kimi, tmp_path):
    """The PrfaaS route reaches the decode worker at a KV address where nobody listens (a
    decode host that went away): the decode worker recomputes, and says so."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{probe.getsockname()[1]}"
    decode = cluster["decode"].url
    config = tmp_path / "router.toml"
    config.write_text(f'decode = ["{decode}"]\n[[prfaas]]\nname = "far"\nprefill = ["{cluster["prefill"].url}"]\n'
                      f'egress_gbps = 1.0\nkv_addresses = {{ "{decode}" = "{gone}" }}\n')
    front = launch.start("router", ["--config", str(config), "--port", "0"])
    try:
        result = client.complete(front.url, {"prompt": PROMPT, "max_tokens": 6, "return_token_ids": True})
    finally:
        front.stop()
    assert result.status == 200, result.body
    assert result.token_ids == generate_monolithic(kimi.model, PROMPT, 6)
    kv = result.body["kvwire"]
    assert kv["kv_source"] == "recomputed"
    assert kv["kv_error"] == f"PeerLostError: cannot connect to {gone}: Connection refused"
    assert kv["kv_bytes"] == 0
    _, metrics = client.get(cluster["decode"].url, "/metrics")
    assert 'kvwire_serve_kv_recomputed_total{error="PeerLostError"} 1' in metrics


def test_dead_decode_worker_degrades_health_and_is_refused_before_any_prefill(cluster, kimi_dir, secret_file):
    decode = launch.start("decode", ["--model", str(kimi_dir), "--port", "0", "--kv-listen", "127.0.0.1:0",
                                     "--secret-file", str(secret_file)])
    front = router(cluster["prefill"], decode, "--control-interval", "0.2")
    results = []
    try:
        assert client.get(front.url, "/health")[0] == 200
        assert client.complete(front.url, {"prompt": PROMPT, "max_tokens": 2}).status == 200
        decode.kill()
        health = wait_for_health(front, 503)
        prefills = prefill_count(cluster["prefill"])
        for stream in (False, True):
            started = time.monotonic()
            results.append((client.complete(front.url, {"prompt": PROMPT, "max_tokens": 2, "stream": stream}),
                            time.monotonic() - started))
        assert prefill_count(cluster["prefill"]) == prefills  # no prefill spent for a dead decode worker
    finally:
        front.stop()
        decode.stop()
    assert health["status"] == "degraded"
    assert health["reason"].startswith(f"no decode worker is reachable ({decode.url}: ")
    for result, elapsed in results:
        assert result.status == 503, result.body
        assert result.body["error"]["type"] == "worker_unavailable"
        message = result.body["error"]["message"]
        assert message.startswith(f"decode worker {decode.url} is unreachable (") and message.endswith(
            "); no prefill was started")
        assert elapsed < 5


def test_router_started_before_its_workers_is_degraded_then_ok(cluster):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{probe.getsockname()[1]}"
    front = launch.start("router", ["--prefill", nobody, "--decode", cluster["decode"].url, "--port", "0"])
    try:
        status, text = client.get(front.url, "/health")
        result = client.complete(front.url, {"prompt": PROMPT, "max_tokens": 2})
        log = front.stderr_tail()
    finally:
        front.stop()
    assert status == 503
    health = json.loads(text)
    assert health["status"] == "degraded"
    assert health["reason"].startswith(f"no prefill worker is reachable ({nobody}: ")
    assert health["workers"][nobody]["reachable"] is False
    assert "router starts degraded: no prefill worker is reachable" in log
    assert result.status == 502 and result.body["error"]["type"] == "worker_unavailable"


def burst_with_kill(front, worker, prompts, max_tokens: int, kill_after_s: float, limit_s: float) -> dict:
    """Send every prompt at once, kill -9 ``worker`` after ``kill_after_s``; all answers,
    after asserting that none hung and all came within ``limit_s``."""
    import threading

    results: dict[int, object] = {}

    def ask(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "return_token_ids": True}
        results[i] = client.complete(front.url, body, timeout_s=limit_s)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        time.sleep(kill_after_s)
        worker.kill()
        for thread in threads:
            thread.join(limit_s)
    finally:
        front.stop()
        worker.stop()
    assert all(not thread.is_alive() for thread in threads), "a request hung"
    assert time.monotonic() - started < limit_s
    assert len(results) == len(prompts)
    return results


def test_prefill_worker_killed_during_a_burst_every_request_gets_right_tokens_or_a_clear_error(
    cluster, kimi_dir, secret_file, kimi
):
    prefill = launch.start("prefill", ["--model", str(kimi_dir), "--port", "0", "--secret-file", str(secret_file)])
    prompts = [np.random.default_rng(100 + i).integers(3, 512, 200 + 40 * i).tolist() for i in range(6)]
    results = burst_with_kill(router(prefill, cluster["decode"]), prefill, prompts, 4, kill_after_s=0.3, limit_s=90)
    sources = []
    for i, result in results.items():
        if result.status == 200:  # served: the tokens must be exactly the monolithic ones
            assert result.token_ids == generate_monolithic(kimi.model, prompts[i], 4)
            sources.append(result.body["kvwire"]["kv_source"])
        else:  # or a clear error naming what failed
            assert result.status == 502, result.body
            assert result.body["error"]["type"] and result.body["error"]["message"]
    assert "recomputed" in sources or len(sources) < len(prompts)  # the kill was felt, and survived


def test_decode_worker_killed_during_a_burst_fails_its_requests_fast_and_clearly(cluster, kimi_dir, secret_file, kimi):
    decode = launch.start(
        "decode", ["--model", str(kimi_dir), "--port", "0", "--kv-listen", "127.0.0.1:0", "--secret-file", str(secret_file)]
    )
    prompts = [np.random.default_rng(200 + i).integers(3, 512, 100).tolist() for i in range(6)]
    results = burst_with_kill(router(cluster["prefill"], decode), decode, prompts, 40, kill_after_s=0.5, limit_s=60)
    failed = 0
    for i, result in results.items():
        if result.status == 200 and "error" not in result.body:
            assert result.token_ids == generate_monolithic(kimi.model, prompts[i], 40)
        else:
            failed += 1
            error = result.body.get("error") or {}
            assert error.get("type") and error.get("message"), result.body
    assert failed >= 1  # requests on the killed worker did not pretend to succeed
