"""PrfaaS routing over real processes: selective offload, prefix reuse, the threshold loop.

One decode worker, one local PD prefill worker and one PrfaaS prefill worker, all with
prefix caches, behind routers configured by flags and by a TOML file.
"""

import time

import numpy as np
import pytest

from kvwire.testing.relay import Fault, FaultyRelay
from serving import client, launch
from serving.hybrid_cache import kv_layout
from serving.steps import generate_monolithic

BLOCK = 64
T = 256  # the offload threshold the first router starts from
MAX_TOKENS = 6


def prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, length).tolist()


@pytest.fixture(scope="module")
def workers(kimi_dir, secret_file):
    common = ["--model", str(kimi_dir), "--port", "0", "--secret-file", str(secret_file),
              "--prefix-cache-mib", "64", "--block-tokens", str(BLOCK)]
    started = []
    try:
        for role, name, extra in (("decode", "decode", ["--kv-listen", "127.0.0.1:0"]), ("prefill", "local", []),
                                  ("prefill", "prfaas", [])):
            started.append(launch.start(role, [*common, *extra]))
        yield dict(zip(("decode", "local", "prfaas"), started))
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="module")
def router(workers):
    worker = launch.start("router", [
        "--prefill", workers["local"].url, "--prfaas", workers["prfaas"].url, "--decode", workers["decode"].url,
        "--prfaas-threshold", str(T), "--egress-gbps", "100", "--control-interval", "0.2", "--port", "0"])
    yield worker
    worker.stop()


def complete(url: str, ids: list[int]) -> dict:
    result = client.complete(url, {"prompt": ids, "max_tokens": MAX_TOKENS, "return_token_ids": True})
    assert result.status == 200, result.body
    return result.body


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def health(url: str) -> dict:
    import json

    status, text = client.get(url, "/health")
    assert status == 200
    return json.loads(text)


@pytest.mark.parametrize("length,pool", [(100, "local"), (T, "local"), (T + 1, "prfaas"), (900, "prfaas")])
def test_long_prompts_go_to_prfaas_and_short_ones_stay_local(kimi, workers, router, length, pool):
    ids = prompt(1000 + length, length)
    body = complete(router.url, ids)
    route = body["kvwire"]["route"]
    assert route["prefill_pool"] == pool, route["reason"]
    assert body["kvwire"]["prefill_worker"] == workers[pool].url
    assert route["incremental_tokens"] == length and route["threshold_tokens"] == (T if pool == "prfaas" else None)
    assert body["choices"][0]["token_ids"] == generate_monolithic(kimi.model, ids, MAX_TOKENS)
    assert body["kvwire"]["kv_bytes"] == kv_layout(kimi.config, "float32").nbytes(length)


def test_repeated_prefix_is_served_from_cache_and_only_new_tokens_move(kimi, workers, router):
    layout = kv_layout(kimi.config, "float32")
    shared = prompt(7, 5 * BLOCK)
    first_ids, second_ids = shared + prompt(8, 20), shared + prompt(9, 30)
    def held():
        seen = health(router.url)["workers"]
        return seen[workers["prfaas"].url]["prefix_blocks"], seen[workers["decode"].url]["prefix_blocks"]

    before = held()
    first = complete(router.url, first_ids)["kvwire"]
    assert first["route"]["prefill_pool"] == "prfaas"
    assert first["prefix"] == {"reused_tokens": 0, "computed_tokens": 340, "boundary_tokens": 320,
                               "sent_from_token": 0, "boundary_sent": True}
    # the router learns of both workers' new boundary at its next poll
    wait_for(lambda: all(now > then for now, then in zip(held(), before)), what="prefix reports")
    body = complete(router.url, second_ids)
    second = body["kvwire"]
    assert second["route"]["prefill_cached_tokens"] == 320 and second["route"]["decode_cached_tokens"] == 320
    assert second["route"]["incremental_tokens"] == 30
    assert second["prefill_worker"] == workers["prfaas"].url  # l on the local worker is 350 > t
    assert second["prefix"]["reused_tokens"] == 320 and second["prefix"]["computed_tokens"] == 30
    assert second["prefix"]["sent_from_token"] == 320
    assert second["kv_source"] == "transfer"
    assert second["kv_bytes"] == layout.nbytes(30)  # the 30 new tokens' KV and the final states, nothing else
    assert body["choices"][0]["token_ids"] == generate_monolithic(kimi.model, second_ids, MAX_TOKENS)


def test_throttled_link_raises_the_threshold_and_idle_lowers_it(kimi, workers, tmp_path):
    """The PrfaaS link to the decode worker is a 1 MB/s relay; declared capacity 8 Mbit/s."""
    decode_kv = health(workers["decode"].url)["kv_address"]
    with FaultyRelay(decode_kv, Fault(rate_bytes_per_s=1e6)) as link:
        config = tmp_path / "router.toml"
        config.write_text(f'''
decode = ["{workers["decode"].url}"]
prefill = ["{workers["local"].url}"]

[[prfaas]]
name = "far"
prefill = ["{workers["prfaas"].url}"]
egress_gbps = 0.008
threshold_tokens = 128
max_threshold_tokens = 100000
kv_addresses = {{ "{workers["decode"].url}" = "{link.address}" }}

[control]
interval_s = 0.2
''')
        router = launch.start("router", ["--config", str(config), "--port", "0"])
        try:
            from concurrent.futures import ThreadPoolExecutor

            long_prompts = [prompt(2000 + i, 1500) for i in range(4)]  # 576 KB of KV each
            with ThreadPoolExecutor(4) as pool:
                bodies = list(pool.map(lambda ids: complete(router.url, ids), long_prompts))
            assert [b["kvwire"]["route"]["prefill_pool"] for b in bodies].count("far") >= 1
            changes = health(router.url)["thresholds"]["far"]["changes"]
            raised = [c for c in changes if c["reason"].startswith("raise t")]
            assert raised, changes
            assert "egress at" in raised[0]["reason"] or "queue depth" in raised[0]["reason"]
            for ids, body in zip(long_prompts, bodies):
                assert body["choices"][0]["token_ids"] == generate_monolithic(kimi.model, ids, MAX_TOKENS)
            # idle: t comes back down to the configured 128
            wait_for(lambda: health(router.url)["thresholds"]["far"]["threshold_tokens"] == 128, 30, "t to fall back")
            changes = health(router.url)["thresholds"]["far"]["changes"]
            assert any(c["reason"].startswith("lower t") and "link idle" in c["reason"] for c in changes)
        finally:
            router.stop()


def test_openai_client_completes_through_the_router(kimi, router):
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
    api = openai.OpenAI(base_url=router.url + "/v1", api_key="unused")
    ids = prompt(42, 50)
    model = api.models.list().data[0].id
    completion = api.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS,
                                        extra_body={"return_token_ids": True})
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == 50 and completion.usage.completion_tokens == MAX_TOKENS
    assert completion.choices[0].model_extra["token_ids"] == generate_monolithic(kimi.model, ids, MAX_TOKENS)
    streamed = list(api.completions.create(model=model, prompt=ids, max_tokens=MAX_TOKENS, stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"
