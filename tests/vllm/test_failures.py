"""Failures through the connector fail (or recompute) one request, say why, and leak nothing."""

import threading
import time

import pytest

from kvwire.testing.relay import Fault, FaultyRelay

from .engines import Engine, consumer_args, disaggregated, producer_args, start_all
from .support import MAX_TOKENS, free_port, prompt


@pytest.fixture(scope="module")
def strangers(vllm_model, other_model, engine_logs, tmp_path_factory, decode_address, secret_file):
    """Prefill instances the decode instance must refuse: a wrong secret, another model."""
    wrong = tmp_path_factory.mktemp("wrong-secret") / "secret"
    wrong.write_text("not-the-secret")
    bad_secret = Engine("prefill-wrong-secret", vllm_model, *producer_args(decode_address, secret_file=wrong),
                        log_dir=engine_logs)
    other = Engine("prefill-other-model", other_model, *producer_args(decode_address, secret_file=secret_file),
                   log_dir=engine_logs)
    yield bad_secret, other
    bad_secret.close()
    other.close()


def recomputed(prefill, decode, prompts, targets=None) -> tuple[dict, list[dict]]:
    """Run the pair on one prompt whose push must fail: the decode side's report (nothing
    loaded, recomputed) and its outputs."""
    _, decoded = disaggregated(prefill, decode, prompts, MAX_TOKENS, targets)
    report = decoded[0]["kv_transfer_params"]["kvwire"]
    assert report["loaded_tokens"] == 0 and report["recomputed"] is True, report
    return report, decoded


def test_a_wrong_secret_is_refused_and_the_decode_side_recomputes(strangers, pair, single_instance):
    bad_secret, _ = strangers
    _, decode = pair
    prompts = [prompt(200, 31)]
    report, decoded = recomputed(bad_secret.wait_ready(), decode, prompts)
    assert "AuthenticationError" in report["error"], report["error"]
    assert [out["token_ids"] for out in decoded] == single_instance(prompts)  # recomputed: one instance's work
    assert "AuthenticationError" in bad_secret.log_text()


def test_a_mismatched_model_is_refused_with_the_layer_named(strangers, pair):
    """Twice the KV heads: refused in the handshake, before any decode, as a layout
    mismatch naming the layer and its tensor (per-token ``kv`` whatever block size vLLM
    chose on either side)."""
    _, other = strangers
    _, decode = pair
    report, _ = recomputed(other.wait_ready(), decode, [prompt(200, 32)])
    error = report["error"]
    assert "LayoutMismatchError" in error and "layer 1 tensor 'kv': receiver has bfloat16[T, 2, " in error, error
    assert "1=model.layers.1.self_attn.attn" in error
    log = other.log_text()
    assert "LayoutMismatchError" in log and "1=model.layers.1.self_attn.attn" in log


def test_a_prefill_instance_killed_mid_transfer(vllm_model, engine_logs, secret_file, pair, decode_address,
                                                single_instance):
    """The push crawls through a throttled relay; the prefill instance is SIGKILLed while
    it is on the way. The recompute-policy decode instance recomputes (right tokens, the
    error reported); the fail-policy one fails that request; both keep serving."""
    _, decode = pair
    fail_address = f"127.0.0.1:{free_port()}"
    strict = Engine("decode-fail-policy", vllm_model, log_dir=engine_logs,
                    *consumer_args(fail_address, secret_file=secret_file, policy="fail"))
    victim = Engine("prefill-killed", vllm_model, *producer_args(secret_file=secret_file), log_dir=engine_logs)
    start_all(strict, victim)

    # First, a prefill request that names no decode address, to an instance with no
    # 'decode' option: the answer says so, and the decode side recomputes at once.
    lone = [prompt(150, 44)]
    nowhere = victim.generate(lone, 1, [{"do_remote_decode": True}])[0]["kv_transfer_params"]
    assert "no decode address" in nowhere["kvwire"]["error"]
    recomputed = decode.generate(lone, MAX_TOKENS, [nowhere])[0]
    report = recomputed["kv_transfer_params"]["kvwire"]
    assert report["recomputed"] is True and "PushFailed" in report["error"] and "no decode address" in report["error"]
    assert recomputed["token_ids"] == single_instance(lone)[0]  # recomputed: one instance's work

    slow = Fault(rate_bytes_per_s=200_000)
    relays = [FaultyRelay(address, slow) for address in (decode_address, fail_address)]
    prompts = [prompt(700, 41), prompt(700, 42)]
    ids = ["killed-1", "killed-2"]
    results = {}

    def decode_one(engine, i):
        params = {"do_remote_prefill": True, "kvwire": {"request_id": ids[i], "num_tokens": len(prompts[i]) - 1}}
        results[i] = engine.generate([prompts[i]], MAX_TOKENS, [params])[0]

    targets = [{"request_id": ids[i], "decode": relays[i].address} for i in range(2)]
    victim.generate(prompts, 1, [{"do_remote_decode": True, "kvwire": t} for t in targets])
    # The decode requests come once the pushes are under way: asked before the prefill, a
    # loaded machine's prefill could outlast their 5 s load timeout (a TransferTimeout,
    # not the lost sender this test is about).
    threads = [threading.Thread(target=decode_one, args=(engine, i)) for i, engine in enumerate((decode, strict))]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # ~200 KB of ~1.1 MB each have crossed
    victim.kill()
    for thread in threads:
        thread.join(120)
    recomputed, failed = results[0], results[1]
    assert recomputed["kv_transfer_params"]["kvwire"]["recomputed"] is True
    assert "PeerLostError" in recomputed["kv_transfer_params"]["kvwire"]["error"]
    assert recomputed["token_ids"] == single_instance([prompts[0]])[0]
    assert failed["finish_reason"] == "error" or not failed["token_ids"], failed
    # both still serve
    assert strict.generate([prompt(20, 43)], 4)[0]["token_ids"]
    for relay in relays:
        relay.close()
    strict.close()


def test_a_corrupted_push_is_never_used(pair, decode_address, single_instance):
    """A bit flipped on the way (a relay between the instances): the decode side's check
    fails that push with IntegrityError and vLLM recomputes; the tokens stay right."""
    prefill, decode = pair
    relay = FaultyRelay(decode_address, Fault(flip_bit_at=60_000))
    try:
        prompts = [prompt(700, 51)]
        report, decoded = recomputed(prefill, decode, prompts, [{"decode": relay.address}])
    finally:
        relay.close()
    assert "IntegrityError" in report["error"], report["error"]
    assert [out["token_ids"] for out in decoded] == single_instance(prompts)
