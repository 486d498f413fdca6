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
from serving.vllm_engine import pd_servers, tensor_parallel_args

from .engines import ROOT
from .support import MAX_TOKENS, nixl_reference, prompt

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


@pytest.fixture(scope="module")
def served(tp, vllm_model, engine_logs, secret_file):
    """decode and prefill vLLM servers (TP sizes ``tp``) and the router in front of them."""
    with pd_servers("kvwire", vllm_model, engine_logs, secret_file=secret_file, tp=tp) as urls:
        yield urls


def _router_at_start(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", "router", *args, "--port", "0"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=False)


def _answers_with_nixls_tokens(router: str, model: str, nixl_plain):
    """(prompt, answer) for each of PROMPTS through ``router``, its tokens NIXL's P/D's."""
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused")
    for p, expected in zip(PROMPTS, nixl_plain.tokens(PROMPTS, MAX_TOKENS)):
        answer = client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"return_token_ids": True})
        assert answer.choices[0].token_ids == expected
        yield p, answer


def test_openai_client_through_the_router_gets_nixls_tokens(tp, nixl_plain, served, vllm_model):
    for p, answer in _answers_with_nixls_tokens(served["router"], vllm_model, nixl_plain):
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
    done = _router_at_start("--prefill", served["decode"], "--decode", served["prefill"])
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


@pytest.fixture(scope="module")
def nixl_served(vllm_model, engine_logs):
    """vLLM's NixlConnector on a decode and a prefill server, ``kvwire-serve router --engine
    vllm-nixl`` in front: how ``perf vllm-serve`` compares the two connectors."""
    pytest.importorskip("nixl", reason="nixl is in the test extra (vLLM's NixlConnector)")
    with pd_servers("nixl", vllm_model, engine_logs) as urls:
        yield urls


ONE_TO_ONE = pytest.mark.parametrize("tp", [(1, 1)], indirect=True, ids=["prefill_tp1-decode_tp1"])


@ONE_TO_ONE
def test_the_router_drives_nixl_servers_as_vllms_proxy_does(tp, nixl_plain, nixl_served, vllm_model):
    for _, answer in _answers_with_nixls_tokens(nixl_served["router"], vllm_model, nixl_plain):
        route = answer.model_extra["kvwire"]
        assert route["prefill_worker"] == nixl_served["prefill"] and route["decode_worker"] == nixl_served["decode"]
        assert "push" not in route and route["prefill_s"] > 0
    client = openai.OpenAI(base_url=nixl_served["router"] + "/v1", api_key="unused")
    streamed = client.completions.create(model=vllm_model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True)
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    plain = client.completions.create(model=vllm_model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert text == plain.choices[0].text
    deadline = time.monotonic() + 10  # the router counts a stream once it has ended it (polled, not slept)
    while True:
        with urllib.request.urlopen(nixl_served["router"] + "/metrics", timeout=5) as response:
            metrics = response.read().decode()
        first_token = [line for line in metrics.splitlines()
                       if line.startswith("kvwire_serve_router_decode_first_token_seconds_total ")]
        if (first_token and float(first_token[0].split()[-1]) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert first_token and float(first_token[0].split()[-1]) > 0  # the streamed request's decode leg
    deadline = time.monotonic() + 30  # vLLM publishes a step's connector stats with the next ones
    while time.monotonic() < deadline:
        with urllib.request.urlopen(nixl_served["decode"] + "/metrics", timeout=5) as response:
            pulls = [line for line in response.read().decode().splitlines()
                     if line.startswith("vllm:nixl_xfer_time_seconds_count")]
        if pulls and float(pulls[0].split()[-1]) >= 1:
            break
        time.sleep(0.5)
    assert pulls and float(pulls[0].split()[-1]) >= 1, pulls  # the decode server pulled the KV: not recomputed


def test_nixl_servers_without_engine_vllm_nixl_are_refused_at_start(nixl_served, vllm_model):
    done = _router_at_start("--prefill", nixl_served["prefill"], "--decode", nixl_served["decode"])
    assert done.returncode == 2
    hint = (f"an OpenAI server serving {vllm_model!r} without KVWireConnector (its /metrics has no vllm:kvwire_info; "
            "vLLM servers running NixlConnector need --engine vllm-nixl)")
    assert done.stderr.strip().splitlines()[-1] == (
        f"kvwire-serve router: --decode {nixl_served['decode']} is {hint}; --prefill {nixl_served['prefill']} is {hint}")


@ONE_TO_ONE
def test_kvwire_servers_under_engine_vllm_nixl_are_refused_at_start(tp, served):
    done = _router_at_start("--prefill", served["prefill"], "--decode", served["decode"], "--engine", "vllm-nixl")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"kvwire-serve router: --decode {served['decode']} is a vLLM server with KVWireConnector as decode (kv_role), "
        "but the router was told --engine vllm-nixl; --prefill "
        f"{served['prefill']} is a vLLM server with KVWireConnector as prefill (kv_role), but the router was told "
        "--engine vllm-nixl")
