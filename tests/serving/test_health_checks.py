"""The router finds a broken deployment before the first request: wrong roles at start,
mismatched pairs in /health (503, naming the pair and why) and in the answer to a request
(refused with the same reason, no prefill spent), limits known up front."""

import http.server
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from serving import client, launch
from serving.vllm_engine import free_port

from .support import PROMPT, QWEN, prefill_count, router, wait_for_health

HERE = Path(__file__).parent


def start_router(args):
    """A router that may refuse to start: (worker or None, exit code, last stderr line)."""
    try:
        return launch.start("router", [*args, "--port", "0"], timeout_s=60), None, None
    except launch.LaunchError as exc:
        text = str(exc)
        code = int(text.split("exited with ")[1].split(";")[0])
        lines = [line for line in text.splitlines()[1:] if line.strip()]
        return None, code, lines


def test_swapped_prefill_and_decode_are_refused_at_start_in_one_line(cluster):
    prefill, decode = cluster["prefill"].url, cluster["decode"].url
    front, code, lines = start_router(["--prefill", decode, "--decode", prefill])
    assert front is None
    assert code == 2
    assert lines == [(f"kvwire-serve router: --decode {prefill} is a kvwire-serve prefill worker, not a decode worker; "
                      f"--prefill {decode} is a kvwire-serve decode worker, not a prefill worker")]


def test_decode_pointed_at_a_router_or_at_something_else_is_refused_at_start(cluster):
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    not_kvwire = f"http://127.0.0.1:{other.server_address[1]}"
    try:
        front, code, lines = start_router(["--prefill", cluster["prefill"].url, "--decode", cluster["router"].url])
        assert front is None and code == 2
        assert lines == [(f"kvwire-serve router: --decode {cluster['router'].url} is a kvwire-serve router, not a "
                          "decode worker")]
        front, code, lines = start_router(["--prefill", cluster["prefill"].url, "--decode", not_kvwire])
        assert front is None and code == 2
        assert lines[0].startswith(f"kvwire-serve router: --decode {not_kvwire} is neither a kvwire-serve worker nor "
                                   "an OpenAI server (GET /health answered HTTP 501")
    finally:
        other.shutdown()


@pytest.fixture(scope="module")
def misfits(kimi_dir, checkpoints, tmp_path_factory):
    """Prefill workers that cannot send to the cluster's decode worker: another secret, no
    secret, another architecture."""
    wrong = tmp_path_factory.mktemp("misfits") / "secret"
    wrong.write_text(os.urandom(16).hex())
    common = ["--port", "0"]
    workers = {
        "other secret": launch.start("prefill", ["--model", str(kimi_dir), *common, "--secret-file", str(wrong)]),
        "no secret": launch.start("prefill", ["--model", str(kimi_dir), *common]),
        "other model": launch.start("prefill", ["--model", str(checkpoints(QWEN)), *common, "--secret-file",
                                                str(wrong)]),
    }
    yield workers
    for worker in workers.values():
        worker.stop()


@pytest.mark.parametrize(("misfit", "error_type", "reason"), [
    ("other secret", "AuthenticationError", "failed to prove the shared secret (it has a different secret)"),
    ("no secret", "AuthenticationError", "sender sent no proof, but this receiver requires a secret"),
    ("other model", "LayoutMismatchError", "architecture Qwen3NextForCausalLM"),
])
def test_a_pair_that_cannot_move_kv_is_503_in_health_and_refused_without_a_prefill(cluster, misfits, misfit,
                                                                                  error_type, reason):
    prefill, decode = misfits[misfit], cluster["decode"]
    front = router(prefill, decode, "--control-interval", "0.2")
    try:
        health = wait_for_health(front, 503)
        before = prefill_count(prefill)
        result = client.complete(front.url, {"prompt": PROMPT, "max_tokens": 4})
        after = prefill_count(prefill)
    finally:
        front.stop()
    pair = f"prefill worker {prefill.url} cannot send KV to decode worker {decode.url}"
    assert health["status"] == "degraded"
    assert health["reason"].startswith(pair)
    assert health["pairs"][f"{prefill.url} -> {decode.url}"] == health["reason"]
    if misfit == "other model":
        assert health["reason"] == (f"{pair}: architecture Qwen3NextForCausalLM and KimiLinearForCausalLM differ "
                                    "(Qwen3NextForCausalLM, float32 vs KimiLinearForCausalLM, float32)")
    else:
        assert reason in health["reason"]
    assert result.status == 503
    assert result.body["error"]["type"] == error_type
    assert result.body["error"]["message"] == health["reason"] + "; no prefill was started"
    assert after == before


def test_a_prompt_longer_than_the_model_holds_is_400_at_once(cluster):
    limit = json.loads(client.get(cluster["decode"].url, "/health")[1])["max_model_len"]
    assert limit == 32768  # the tiny Kimi-Linear says 1M positions; a CPU worker holds at most 32768 by default
    prefills = prefill_count(cluster["prefill"])
    text = "hello " * 40000  # under the router's 1M-token limit
    result = client.complete(cluster["router"].url, {"prompt": text, "max_tokens": 4})
    assert result.status == 400
    message = result.body["error"]["message"]
    assert message.startswith("the prompt has ") and message.endswith(
        " tokens and asks for 4 more tokens: more than this model's maximum length of 32768 tokens")
    assert int(message.split()[3]) > 32768
    assert prefill_count(cluster["prefill"]) == prefills


def test_a_prefill_that_fails_to_compute_is_passed_on_not_recomputed(cluster, kimi_dir, secret_file):
    prefill = launch.start("prefill", ["--model", str(kimi_dir), "--port", "0", "--secret-file", str(secret_file)],
                           wrapper=[sys.executable, str(HERE / "failing_prefill.py"), "20"])
    front = router(prefill, cluster["decode"])
    try:
        short = client.complete(front.url, {"prompt": PROMPT[:10], "max_tokens": 2})
        result = client.complete(front.url, {"prompt": PROMPT, "max_tokens": 2})
        log = front.stderr_tail()
    finally:
        front.stop()
        prefill.stop()
    assert short.status == 200
    assert result.status == 500
    assert result.body["error"]["type"] == "prefill_failed"
    assert result.body["error"]["message"] == (
        f"the prefill of {len(PROMPT)} tokens failed: RuntimeError: DefaultCPUAllocator: not enough memory: you tried "
        f"to allocate {len(PROMPT) ** 2 * 8} bytes.")
    assert "KV transfer failed" not in log and "recompute" not in log


def test_a_router_started_before_its_decode_worker_names_the_model_once_it_answers(cluster, kimi_dir, secret_file):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    front = launch.start("router", ["--prefill", cluster["prefill"].url, "--decode", url, "--port", "0",
                                    "--control-interval", "0.2"])
    decode = None
    try:
        assert client.get(front.url, "/health")[0] == 503
        decode = launch.start("decode", ["--model", str(kimi_dir), "--port", str(port), "--kv-listen", "127.0.0.1:0",
                                         "--secret-file", str(secret_file)])
        wait_for_health(front, 200)
        result = client.complete(front.url, {"prompt": PROMPT, "max_tokens": 2})
    finally:
        front.stop()
        if decode is not None:
            decode.stop()
    assert result.status == 200 and result.body["model"] == str(kimi_dir)
