"""KVWireConnector between real vLLM engines (separate processes, real sockets).

Every check of tokens also checks how many prompt tokens the decode side took from kvwire:
a decode instance that silently recomputed the prompt would produce the same tokens.

The tokens of a prefill -> decode pair are judged against vLLM's own P/D (NixlConnector)
on the same model, prompts, split and settings, in the same run (``nixl_pd``): the split
runs other bf16 kernels than one prefill, so a single instance may differ on a near-tie
(reported at the end of the run, not asserted). A request the decode side recomputed is
one instance's computation, and is checked against a single instance.
"""

import pytest

from .engines import Engine, consumer_args, disaggregated, one_by_one
from .support import MAX_TOKENS, PAIR_PREFILL_ARGS, free_port, loaded, nixl_reference, prompt, taken

PROMPTS = [prompt(50, 1), prompt(129, 1), prompt(300, 1), prompt(700, 3)]  # < 1 block, 1 block + 1, several
SHARED = [PROMPTS[2][:256] + prompt(120, 7), PROMPTS[2][:256] + prompt(90, 8)]  # PROMPTS[2]'s first 256 tokens
EARLY = [prompt(129, 11)]


@pytest.fixture(scope="module")
def nixl_pd(vllm_model, engine_logs):
    """NixlConnector P/D with the settings of ``pair``, sent this module's prompts in the
    order its tests send them to ``pair`` (so the same prefix-cache history)."""
    return nixl_reference("nixl-pair", vllm_model, [*PROMPTS, *SHARED, *EARLY], log_dir=engine_logs,
                          prefill_args=PAIR_PREFILL_ARGS)


def test_prefill_then_decode_gives_nixls_tokens(nixl_pd, pair, single_instance_report):
    prefill, decode = pair
    prefilled, decoded = one_by_one(prefill, decode, PROMPTS, MAX_TOKENS)
    tokens = [out["token_ids"] for out in decoded]
    assert tokens == nixl_pd.tokens(PROMPTS, MAX_TOKENS)
    single_instance_report(PROMPTS, tokens)
    assert taken(decoded) == [len(p) - 1 for p in PROMPTS]  # all but the token the decode side computes
    assert all(n > 0 for n in loaded(decoded))  # PROMPTS[2] shares 128 tokens with PROMPTS[1]: the rest came by kvwire
    for p, out in zip(PROMPTS, prefilled):
        params = out["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["transfer_mode"] == "push"
        assert params["remote_num_tokens"] == len(p) - 1
        assert params["kvwire"]["num_tokens"] == len(p) - 1 and "error" not in params["kvwire"]


def test_prefix_caching_on_both_sides(nixl_pd, pair):
    """A second round sharing 256-token prefixes: the prefill side computes only the new
    tokens (vLLM's own prefix cache: whole blocks of the shared 256, whatever block size
    this machine's vLLM chose) and still pushes the whole prompt's KV and state."""
    prefill, decode = pair
    disaggregated(prefill, decode, [PROMPTS[2]], MAX_TOKENS)  # the first round (cached, if it ran before)
    prefilled, decoded = one_by_one(prefill, decode, SHARED, MAX_TOKENS)
    cached = [out["kv_transfer_params"]["remote_prefill_cached_tokens"] for out in prefilled]
    assert all(0 < n <= 256 for n in cached), cached
    assert [out["token_ids"] for out in decoded] == nixl_pd.tokens(SHARED, MAX_TOKENS)
    assert taken(decoded) == [len(p) - 1 for p in SHARED]
    assert all(n > 0 for n in loaded(decoded))


def test_the_decode_request_may_come_first(nixl_pd, pair):
    """A router that names the push's id can send the decode request before the prefill."""
    import threading

    prefill, decode = pair
    prompts = EARLY
    target = {"request_id": "early-1", "num_tokens": 128}
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=decode.generate(prompts, MAX_TOKENS, [{"do_remote_prefill": True, "kvwire": target}])))
    thread.start()
    prefill.generate(prompts, 1, [{"do_remote_decode": True, "kvwire": {"request_id": "early-1"}}])
    thread.join(60)
    assert [out["token_ids"] for out in result["out"]] == nixl_pd.tokens(prompts, MAX_TOKENS)
    assert loaded(result["out"]) == [128]


def test_without_the_linear_attention_states_decode_diverges(vllm_model, engine_logs, secret_file, nixl_pd, pair):
    """The control: land attention KV but not the GDN states, and the tokens differ."""
    prefill, _ = pair
    address = f"127.0.0.1:{free_port()}"
    control = Engine("decode-skip-states", vllm_model, "--connector", "SkipStatesConnector", "--connector-module",
                     "tests.vllm.control_connector", *consumer_args(address, secret_file=secret_file),
                     log_dir=engine_logs).wait_ready()
    try:
        prompts = PROMPTS[1:3]
        _, decoded = disaggregated(prefill, control, prompts, MAX_TOKENS, [{"decode": address}] * len(prompts))
    except RuntimeError:
        control.close()
        raise
    control.close()
    assert taken(decoded) == [len(p) - 1 for p in prompts]
    assert all(n > 0 for n in loaded(decoded))
    assert all(out["token_ids"] != ref for out, ref in zip(decoded, nixl_pd.tokens(prompts, MAX_TOKENS)))


def test_prefill_frees_its_blocks_and_an_unclaimed_push_expires(pair, single_instance):
    """Sends copy what they push: the prefill side's blocks are free when its request ends,
    whether or not a decode side ever asks; the decode side drops an unclaimed push after
    its lease (lease_s), and a decode request that comes later recomputes, saying why."""
    import time

    prefill, decode = pair
    free_before = prefill.free_blocks()
    prompts = [prompt(300, 21)]
    prefilled = prefill.generate(prompts, 1, [{"do_remote_decode": True}])
    assert prefill.free_blocks() == free_before
    time.sleep(5.5)  # past lease_s=4 (consumer_args); the receiver's deadline thread checks every 0.1 s
    late = decode.generate(prompts, MAX_TOKENS, [prefilled[0]["kv_transfer_params"]])
    report = late[0]["kv_transfer_params"]["kvwire"]
    assert report["loaded_tokens"] == 0 and report["recomputed"] is True
    assert "TransferTimeout" in report["error"] or "released" in report["error"], report["error"]
    assert [out["token_ids"] for out in late] == single_instance(prompts)  # recomputed: one instance's work
