"""KVWireConnector between real vLLM engines (separate processes, real sockets).

Every check of tokens also checks how many prompt tokens the decode side took from kvwire:
a decode instance that silently recomputed the prompt would produce the same tokens.

A note on "the same tokens": the split itself (the prefill instance computes tokens
0..N-2, the decode instance token N-1 in a step of its own, as with vLLM's NixlConnector)
runs the last prompt token through other kernels than one whole prefill does, and in bf16
a near-tied argmax of this tiny random model can flip a few tokens later. NIXL produces
the identical tokens for the same split (perf vllm-pd reports both); the prompts here are
ones where the split agrees with a single instance.
"""

from .conftest import MAX_TOKENS, free_port, loaded, prompt
from .engines import Engine, consumer_args, disaggregated

PROMPTS = [prompt(50, 1), prompt(129, 1), prompt(300, 1), prompt(700, 3)]  # < 1 block, 1 block + 1, several


def test_prefill_then_decode_gives_the_single_instance_tokens(pair, reference):
    prefill, decode = pair
    prefilled, decoded = disaggregated(prefill, decode, PROMPTS, MAX_TOKENS)
    assert [out["token_ids"] for out in decoded] == reference(PROMPTS)
    assert loaded(decoded) == [len(p) - 1 for p in PROMPTS]  # all but the token the decode side computes
    for p, out in zip(PROMPTS, prefilled):
        params = out["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["transfer_mode"] == "push"
        assert params["remote_num_tokens"] == len(p) - 1
        assert params["kvwire"]["num_tokens"] == len(p) - 1 and "error" not in params["kvwire"]


def test_prefix_caching_on_both_sides(pair, reference):
    """A second round sharing 256-token prefixes: the prefill side computes only the new
    tokens (vLLM's own prefix cache) and still pushes the whole prompt's KV and state."""
    prefill, decode = pair
    shared = [PROMPTS[2][:256] + prompt(120, 7), PROMPTS[2][:256] + prompt(90, 8)]
    prefilled, decoded = disaggregated(prefill, decode, shared, MAX_TOKENS)
    assert [out["kv_transfer_params"]["remote_prefill_cached_tokens"] for out in prefilled] == [256, 256]
    assert [out["token_ids"] for out in decoded] == reference(shared)
    reports = [out["kv_transfer_params"]["kvwire"] for out in decoded]
    assert [r["loaded_tokens"] + r.get("local_tokens", 0) for r in reports] == [len(p) - 1 for p in shared]
    assert all(r["loaded_tokens"] > 0 for r in reports)


def test_the_decode_request_may_come_first(pair, reference):
    """A router that names the push's id can send the decode request before the prefill."""
    import threading

    prefill, decode = pair
    prompts = [prompt(129, 11)]
    target = {"request_id": "early-1", "num_tokens": 128}
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=decode.generate(prompts, MAX_TOKENS, [{"do_remote_prefill": True, "kvwire": target}])))
    thread.start()
    prefill.generate(prompts, 1, [{"do_remote_decode": True, "kvwire": {"request_id": "early-1"}}])
    thread.join(60)
    assert [out["token_ids"] for out in result["out"]] == reference(prompts)
    assert loaded(result["out"]) == [128]


def test_without_the_linear_attention_states_decode_diverges(vllm_model, engine_logs, secret_file, pair, reference):
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
    assert loaded(decoded) == [len(p) - 1 for p in prompts]
    assert all(out["token_ids"] != ref for out, ref in zip(decoded, reference(prompts)))


def test_prefill_frees_its_blocks_and_an_unclaimed_push_expires(pair, reference):
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
    assert [out["token_ids"] for out in late] == reference(prompts)
