"""Two vLLM OpenAI servers with KVWireConnector behind ``kvwire-serve router``, driven
with the ``openai`` client as a user would: with the same tensor-parallel size, and with
TP=2 -> TP=1 and TP=1 -> TP=2 (each judged against NixlConnector in that configuration)."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from serving.model import vllm_tiny_config, write_tiny_checkpoint
from serving.vllm_engine import cpu_thread_binding, tensor_parallel_args

from .conftest import MAX_TOKENS, free_port, nixl_reference, prompt
from .engines import ROOT

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
PROMPTS = [prompt(129, 1), prompt(300, 1)]  # sharing 129 tokens: the decode server's own prefix cache may hold some
CONFIGS = [(1, 1), (2, 1), (1, 2)]  # (prefill TP, decode TP)
pytestmark = pytest.mark.timeout(600)  # a configuration starts four engines, TP ones with worker processes


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    """conftest's tiny Qwen3-Next (the same seeded weights) with a tokenizer and chat template:
    the OpenAI servers here also chat."""
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("qwen3next-chat") / "m", config=vllm_tiny_config(4),
                                     dtype="bfloat16"))


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"prefill_tp{p}-decode_tp{d}" for p, d in CONFIGS])
def tp(request):
    return request.param


@pytest.fixture(scope="module")
def nixl_plain(tp, vllm_model, engine_logs):
    """NixlConnector P/D, offline engines with the servers' settings (prefix caching on,
    vLLM's default steps, the TP sizes), the prompts one at a time in the order the test
    sends them."""
    return nixl_reference(f"nixl-http-tp{tp[0]}to{tp[1]}", vllm_model, PROMPTS, log_dir=engine_logs,
                          prefill_args=tensor_parallel_args(tp[0]), decode_args=tensor_parallel_args(tp[1]))


def _server(model: str, port: int, kv_config: dict, log_path, tp_size: int = 1) -> subprocess.Popen:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=ROOT)
    parallel = ["--distributed-executor-backend", "uni"]
    if tp_size > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tp_size)
        parallel = ["--distributed-executor-backend", "mp", "--tensor-parallel-size", str(tp_size)]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--enforce-eager", "--max-model-len", "4096", *parallel,
            "--kv-transfer-config", json.dumps(kv_config)]
    return subprocess.Popen(argv, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_http(url: str, proc: subprocess.Popen, log_path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up in {timeout}s: {open(log_path).read()[-3000:]}")


@pytest.fixture(scope="module")
def served(tp, vllm_model, engine_logs, secret_file):
    """decode and prefill vLLM servers (TP sizes ``tp``) and the router in front of them."""
    decode_port, prefill_port, router_port, kv_port = free_port(), free_port(), free_port(), free_port(tp[1])
    connector = {"kv_connector": "KVWireConnector", "kv_connector_module_path": "kvwire.integrations.vllm"}
    logs = {name: engine_logs / f"http-tp{tp[0]}to{tp[1]}-{name}.log" for name in ("decode", "prefill", "router")}
    procs = {
        "decode": _server(vllm_model, decode_port, {**connector, "kv_role": "kv_consumer", "kv_connector_extra_config": {
            "listen": f"127.0.0.1:{kv_port}", "secret_file": str(secret_file)}}, logs["decode"], tp[1]),
        "prefill": _server(vllm_model, prefill_port, {**connector, "kv_role": "kv_producer", "kv_connector_extra_config": {
            "secret_file": str(secret_file)}}, logs["prefill"], tp[0]),
    }
    decode_url, prefill_url = f"http://127.0.0.1:{decode_port}", f"http://127.0.0.1:{prefill_port}"
    try:
        for name, url in (("decode", decode_url), ("prefill", prefill_url)):
            _wait_http(url + "/v1/models", procs[name], logs[name])
        procs["router"] = subprocess.Popen(
            [sys.executable, "-m", "serving", "router", "--prefill", prefill_url, "--decode", decode_url,
             "--port", str(router_port)],  # the decode server's kvwire address is learned from its /metrics
            stdout=open(logs["router"], "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        _wait_http(f"http://127.0.0.1:{router_port}/health", procs["router"], logs["router"], 60)
        yield {"router": f"http://127.0.0.1:{router_port}", "decode": decode_url, "prefill": prefill_url,
               "kv_address": f"127.0.0.1:{kv_port}"}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_openai_client_through_the_router_gets_nixls_tokens(tp, nixl_plain, served, vllm_model):
    client = openai.OpenAI(base_url=served["router"] + "/v1", api_key="unused")
    for p, expected in zip(PROMPTS, nixl_plain.tokens(PROMPTS, MAX_TOKENS)):
        answer = client.completions.create(model=vllm_model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"return_token_ids": True})
        assert answer.choices[0].token_ids == expected
        report = answer.model_extra["kv_transfer_params"]["kvwire"]
        # the second prompt shares its first 128 tokens with the first: the decode server's own
        # prefix cache holds them (vLLM servers cache by default), kvwire brings the rest
        assert report["loaded_tokens"] + report["local_tokens"] == len(p) - 1 and report["error"] is None
        assert report["loaded_tokens"] >= len(p) - 1 - 128
        route = answer.model_extra["kvwire"]
        assert route["prefill_worker"] == served["prefill"] and route["decode_worker"] == served["decode"]
        assert route["push"]["num_tokens"] == len(p) - 1
        assert route["push"]["prefill_tp"] == tp[0]


def test_a_chat_through_the_router_is_the_completion_of_its_rendered_prompt(served, vllm_model):
    """Both servers render the chat with the model's template; the P/D split is the same."""
    client = openai.OpenAI(base_url=served["router"] + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Tell me a story about a cat who lived in a library."}]
    chat = client.chat.completions.create(model=vllm_model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"return_token_ids": True})
    prompt_ids = chat.model_extra["prompt_token_ids"]
    report = chat.model_extra["kv_transfer_params"]["kvwire"]
    assert report["error"] is None and report["loaded_tokens"] + report["local_tokens"] == len(prompt_ids) - 1
    assert report["loaded_tokens"] > 0
    completion = client.completions.create(model=vllm_model, prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"return_token_ids": True})
    assert chat.choices[0].model_extra["token_ids"] == completion.choices[0].token_ids
    assert chat.choices[0].message.content == completion.choices[0].text


def test_openai_parameters_pass_through_to_the_vllm_servers(served, vllm_model):
    client = openai.OpenAI(base_url=served["router"] + "/v1", api_key="unused")
    plain = client.completions.create(model=vllm_model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"return_token_ids": True}).choices[0].token_ids
    stop_at = plain.index(plain[3])
    answer = client.completions.create(model=vllm_model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=2, extra_body={"return_token_ids": True, "stop_token_ids": [plain[3]]})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.token_ids == plain[:len(choice.token_ids)] and stop_at <= len(choice.token_ids) <= stop_at + 1
    assert len(choice.logprobs.token_logprobs) == len(choice.token_ids)
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)


def test_a_prompt_longer_than_the_servers_hold_is_400_before_any_prefill(served, vllm_model):
    client = openai.OpenAI(base_url=served["router"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=vllm_model, prompt=prompt(5000, 3), max_tokens=4)
    assert caught.value.body["message"] == ("the prompt has 5000 tokens and asks for 4 more tokens: more than this "
                                            "model's maximum length of 4096 tokens")  # the servers' --max-model-len


def test_swapped_vllm_servers_are_refused_at_start_in_one_line(served):
    done = subprocess.run([sys.executable, "-m", "serving", "router", "--prefill", served["decode"], "--decode",
                           served["prefill"], "--port", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"kvwire-serve router: --decode {served['prefill']} is a vLLM server with KVWireConnector as prefill (kv_role), "
        f"not a decode worker; --prefill {served['decode']} is a vLLM server with KVWireConnector as decode (kv_role), "
        "not a prefill worker")


def test_router_health_knows_the_vllm_servers_and_metrics_reach_prometheus(served):
    with urllib.request.urlopen(served["router"] + "/health", timeout=5) as response:
        health = json.load(response)
    assert all(w["reachable"] for w in health["workers"].values()), health
    assert health["status"] == "ok" and health["pairs"] == {f"{served['prefill']} -> {served['decode']}": "ok"}
    assert health["kv_addresses"] == {served["decode"]: served["kv_address"]}  # from vllm:kvwire_info
    assert health["workers"][served["decode"]]["is"] == "a vLLM server with KVWireConnector as decode (kv_role)"
    with urllib.request.urlopen(served["decode"] + "/metrics", timeout=5) as response:
        metrics = response.read().decode()
    loaded = [line for line in metrics.splitlines() if line.startswith("vllm:kvwire_loaded_tokens_total")]
    assert loaded and float(loaded[0].split()[-1]) >= 128 + 171, loaded
    assert "vllm:kvwire_link_rtt_ms{" in metrics
