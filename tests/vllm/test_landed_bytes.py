"""The transport's promise checked byte for byte inside the engine, whatever the tokens do:
once a load completes, and before the decode side's own step writes into them, its blocks
hold exactly the bytes the prefill side held for that request, per layer, by position
(tests/vllm/witness_connector.py reads both sides' cache tensors)."""

import numpy as np
import pytest

from .conftest import MAX_TOKENS, free_port, loaded, prompt
from .engines import Engine, consumer_args, disaggregated, producer_args, start_all


@pytest.fixture(scope="module")
def witnessed(vllm_model, engine_logs, secret_file, tmp_path_factory):
    """A pair running the witness connector (prefix caching off: every token travels)."""
    folder = tmp_path_factory.mktemp("witness")
    listen = f"127.0.0.1:{free_port()}"
    witness = ["--connector", "WitnessConnector", "--connector-module", "tests.vllm.witness_connector"]
    env = {"KVWIRE_WITNESS_DIR": str(folder)}
    decode = Engine("witness-decode", vllm_model, *witness, *consumer_args(listen, secret_file=secret_file,
                    prefix_caching=False), log_dir=engine_logs, env=env)
    prefill = Engine("witness-prefill", vllm_model, *witness, *producer_args(listen, secret_file=secret_file,
                     prefix_caching=False), log_dir=engine_logs, env=env)
    start_all(decode, prefill)
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
