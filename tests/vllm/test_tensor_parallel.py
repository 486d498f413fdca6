"""Prefill and decode instances of different tensor-parallel sizes (TP=2 -> TP=1 and
TP=1 -> TP=2, each rank in a worker process bound to a core), judged against vLLM's own
NixlConnector P/D in the same TP configuration, run in the same test run.

The decode instance is configured with one ``listen`` address; the prefill ranks learn its
TP size and ranks by probing it, and each sends each decode rank only its pieces."""

import pytest

from serving.vllm_engine import tensor_parallel_args

from .engines import Engine, consumer_args, one_by_one, producer_args, start_all
from .support import MAX_TOKENS, free_port, loaded, nixl_reference, prompt

# shorter than a block, several blocks with a partial last one (vLLM's block size depends on TP)
PROMPTS = [prompt(60, 81), prompt(300, 82), prompt(700, 83)]
CONFIGS = [(2, 1), (1, 2)]
pytestmark = pytest.mark.timeout(600)  # each configuration starts four engines, two of them with TP workers


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"prefill_tp{p}-decode_tp{d}" for p, d in CONFIGS])
def tp_pair(request, vllm_model, engine_logs, secret_file):
    """(prefill TP, decode TP, NIXL's tokens, kvwire prefill, kvwire decode)."""
    prefill_tp, decode_tp = request.param
    name = f"tp{prefill_tp}to{decode_tp}"
    nixl = nixl_reference(f"nixl-{name}", vllm_model, PROMPTS, log_dir=engine_logs,
                          prefill_args=tensor_parallel_args(prefill_tp), decode_args=tensor_parallel_args(decode_tp))
    listen = f"127.0.0.1:{free_port(decode_tp)}"
    decode = Engine(f"{name}-decode", vllm_model, *consumer_args(listen, secret_file=secret_file),
                    *tensor_parallel_args(decode_tp), log_dir=engine_logs)
    prefill = Engine(f"{name}-prefill", vllm_model, *producer_args(listen, secret_file=secret_file),
                     *tensor_parallel_args(prefill_tp), log_dir=engine_logs)
    start_all(decode, prefill)
    yield prefill_tp, decode_tp, nixl, prefill, decode
    prefill.close()
    decode.close()


def test_tokens_equal_nixl_in_the_same_tp_configuration(tp_pair, pair):
    prefill_tp, _, nixl, prefill, decode = tp_pair
    prefilled, decoded = one_by_one(prefill, decode, PROMPTS, MAX_TOKENS)
    assert [out["token_ids"] for out in decoded] == nixl.tokens(PROMPTS, MAX_TOKENS)
    assert loaded(decoded) == [len(p) - 1 for p in PROMPTS]  # the prompt but its last token, loaded remotely
    for out in prefilled:
        assert out["kv_transfer_params"]["kvwire"]["prefill_tp"] == prefill_tp
    for out in decoded:
        report = out["kv_transfer_params"]["kvwire"]
        assert report["error"] is None and report["recomputed"] is False
    # the decode ranks took, in all, the bytes a TP=1 pair moves for the same prompt: each piece once
    _, same_tp = one_by_one(*pair, PROMPTS[1:2], 1)
    assert decoded[1]["kv_transfer_params"]["kvwire"]["bytes"] == same_tp[0]["kv_transfer_params"]["kvwire"]["bytes"]


def test_another_model_is_refused_before_anything_is_pushed(tp_pair, other_model, engine_logs, secret_file):
    """The pair's prefill instance sent to a decode instance of another model (twice the KV
    heads, TP=1): with the same TP the decode side refuses the kvwire handshake, naming the
    layer; with another TP the prefill rank refuses at the probe, naming the layer and both
    TP sizes. Nothing is loaded; the decode side computes the prompt itself. The prefill
    instance remembers the refusal: the next request's answer carries the reason, and its
    decode request fails over at once."""
    prefill_tp, _, _, prefill, _ = tp_pair
    listen = f"127.0.0.1:{free_port()}"
    stranger = Engine(f"other-model-decode-for-tp{prefill_tp}", other_model,
                      *consumer_args(listen, secret_file=secret_file), log_dir=engine_logs)
    try:
        start_all(stranger)
        _, (out,) = one_by_one(prefill, stranger, [prompt(200, 84)], MAX_TOKENS, [{"decode": listen}])
        report = out["kv_transfer_params"]["kvwire"]
        assert report["loaded_tokens"] == 0 and report["recomputed"] is True, report
        if prefill_tp == 1:
            assert "LayoutMismatchError" in report["error"] and "layer 1 tensor 'kv'" in report["error"], report
        else:
            assert "no prefill instance pushed" in report["error"], report
            assert ("LayoutMismatchError: the decode instance at 127.0.0.1:" in prefill.log_text()
                    and "(TP 1) and this prefill instance (TP 2) hold another model: layer 1: kv bfloat16[2, 2, "
                    in prefill.log_text()), prefill.log_tail()
        _, (again,) = one_by_one(prefill, stranger, [prompt(90, 85)], MAX_TOKENS, [{"decode": listen}])
        report = again["kv_transfer_params"]["kvwire"]
        assert report["recomputed"] is True and "PushFailed" in report["error"], report
        assert f"cannot push to the decode instance at {listen}: LayoutMismatchError" in report["error"], report
        assert "layer 1" in report["error"], report
    finally:
        stranger.close()
