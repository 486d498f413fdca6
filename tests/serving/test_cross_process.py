"""The core property: a cache prefilled in this process, streamed layer by layer over kvwire
(tcp) and rebuilt in another process, decodes to exactly generate()'s greedy tokens."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from serving.model import load
from serving.prefill import PrefillOptions, PrefillWorker
from serving.steps import Sampling, generate_monolithic

from .support import KIMI, QWEN

CASES = [(KIMI, "float32"), (KIMI, "bfloat16"), (QWEN, "float32"), (QWEN, "bfloat16")]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def decode_process(checkpoints):
    secret = os.urandom(8).hex()
    paths = [str(checkpoints(architecture, dtype)) for architecture, dtype in CASES]
    child = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "decode_child.py"), secret, *paths],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    addresses = json.loads(child.stdout.readline())["addresses"]
    yield child, secret.encode(), addresses
    child.kill()
    child.wait()


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}-{d}" for a, d in CASES])
def test_disaggregated_greedy_tokens_equal_generate(checkpoints, decode_process, case):
    child, secret, addresses = decode_process
    loaded = load(checkpoints(*CASES[case]))
    worker = PrefillWorker(loaded, PrefillOptions(secret=secret, streams=2))
    try:
        for num_tokens in (5, 300):
            prompt = np.random.default_rng(num_tokens).integers(3, 512, num_tokens).tolist()
            request_id = f"case{case}-{num_tokens}"
            (xfer,), (first, _), _, _result = worker.compute(request_id, prompt, addresses[case], Sampling(), 30.0)
            stats = xfer.finish(timeout=30)
            assert stats.raw_bytes == worker.layout.nbytes(num_tokens)
            child.stdin.write(json.dumps({"model": case, "request_id": request_id, "first_token": first,
                                          "max_tokens": MAX_TOKENS}) + "\n")
            child.stdin.flush()
            tokens = json.loads(child.stdout.readline())["tokens"]
            assert tokens == generate_monolithic(loaded.model, prompt, MAX_TOKENS)
            assert len(tokens) == MAX_TOKENS
    finally:
        worker.close()
