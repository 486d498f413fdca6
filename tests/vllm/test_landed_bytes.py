"""The transport's promise checked byte for byte inside the engine, whatever the tokens do:
once a load completes, and before the decode side's own step writes into them, its blocks
hold exactly the bytes the prefill side held for that request, per layer, by position
(tests/vllm/witness_connector.py reads both sides' cache tensors)."""

import numpy as np
import pytest

from serving.vllm_engine import tensor_parallel_args

from .engines import Engine, consumer_args, disaggregated, producer_args, start_all
from .support import MAX_TOKENS, free_port, loaded, prompt


def witness_pair(name: str, model: str, folder, engine_logs, secret_file, prefill_args=()) -> tuple[Engine, Engine]:
    """(prefill, decode) running the witness connector, writing into ``folder`` (prefix
    caching off: every token travels)."""
    listen = f"127.0.0.1:{free_port()}"
    witness = ["--connector", "WitnessConnector", "--connector-module", "tests.vllm.witness_connector"]
    env = {"KVWIRE_WITNESS_DIR": str(folder)}
    decode = Engine(f"{name}-decode", model, *witness, *consumer_args(listen, secret_file=secret_file,
                    prefix_caching=False), log_dir=engine_logs, env=env)
    prefill = Engine(f"{name}-prefill", model, *witness, *producer_args(listen, secret_file=secret_file,
                     prefix_caching=False), *prefill_args, log_dir=engine_logs, env=env)
    start_all(decode, prefill)
    return prefill, decode


@pytest.fixture(scope="module")
def witnessed(vllm_model, engine_logs, secret_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("witness")
    prefill, decode = witness_pair("witness", vllm_model, folder, engine_logs, secret_file)
    yield prefill, decode, folder
    prefill.close()
    decode.close()


def test_the_decode_side_holds_the_prefill_sides_bytes(witnessed):
    prefill, decode, folder = witnessed
    # several blocks and a partial last one for any block size vLLM picks (699 = 2*256 + 187 = 5*128 + 59)
    prompts, ids = [prompt(700, 71), prompt(300, 72)], ["witness-1", "witness-2"]
    _, decoded = disaggregated(prefill, decode, prompts, MAX_TOKENS, [{"request_id": i} for i in ids])
    assert loaded(decoded) == [len(p) - 1 for p in prompts]
    for kvwire_id in ids:
        held = np.load(folder / f"{kvwire_id}.prefill.npz")
        landed = np.load(folder / f"{kvwire_id}.decode.npz")
        assert landed["first_loaded_token"].tolist() == [0]
        layers = sorted(held.files)
        assert layers == sorted(n for n in landed.files if n != "first_loaded_token")
        assert any(":recurrent" in n for n in layers) and any(n.endswith("self_attn.attn") for n in layers), layers
        for name in layers:
            assert held[name].nbytes > 0
            assert held[name].tobytes() == landed[name].tobytes(), f"{kvwire_id}: {name} differs"


def join_prefill_shards(ranks: list, name: str, config) -> np.ndarray:
    """Two prefill ranks' bytes of one tensor, joined the way vLLM splits it: attention KV
    by KV head, GDN recurrent state by value head, GDN conv channels as q | k | v, each
    split on its own (bytes here: the last dimension counts bytes)."""
    shards = [rank[name] for rank in ranks]
    if name.endswith(":conv"):
        assert shards[0].shape[0] < shards[0].shape[1], shards[0].shape  # vLLM's (state_len, channels) layout
        channels = (2 * config.linear_num_key_heads * config.linear_key_head_dim
                    + config.linear_num_value_heads * config.linear_value_head_dim) // 2  # one rank's
        q = config.linear_num_key_heads * config.linear_key_head_dim // 2 * (shards[0].shape[1] // channels)
        parts = [np.split(s, [q, 2 * q], axis=1) for s in shards]
        return np.concatenate([p[i] for i in range(3) for p in parts], axis=1)
    return np.concatenate(shards, axis=1 if name.endswith("attn.attn") else 0)


@pytest.mark.timeout(480)  # a TP=2 engine starts its worker processes and warms up on the first request
def test_a_tp2_prefill_lands_the_bytes_a_tp1_decode_holds(vllm_model, engine_logs, secret_file, tmp_path_factory):
    """Prefill TP=2 -> decode TP=1: each prefill rank sends its pieces; the decode side's
    blocks then hold exactly the prefill ranks' bytes joined, per layer, by position."""
    from serving.model import vllm_tiny_config

    folder = tmp_path_factory.mktemp("witness-tp")
    prefill, decode = witness_pair("witness-tp2to1", vllm_model, folder, engine_logs, secret_file,
                                   tensor_parallel_args(2))
    try:
        _, decoded = disaggregated(prefill, decode, [prompt(400, 73)], MAX_TOKENS, [{"request_id": "witness-tp"}])
        assert loaded(decoded) == [399]
    finally:
        prefill.close()
        decode.close()
    ranks = [np.load(folder / f"witness-tp.prefill.rank{r}.npz") for r in range(2)]
    landed = np.load(folder / "witness-tp.decode.npz")
    layers = sorted(ranks[0].files)
    assert layers == sorted(n for n in landed.files if n != "first_loaded_token")
    config = vllm_tiny_config(4)
    for name in layers:
        joined = join_prefill_shards(ranks, name, config)
        assert joined.shape == landed[name].shape, name
        assert joined.tobytes() == landed[name].tobytes(), f"{name} differs"
