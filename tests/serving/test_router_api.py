"""The router's OpenAI completions API over real decode/prefill/router processes."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving import client
from serving.hybrid_cache import kv_layout
from serving.steps import generate_monolithic

PROMPT = np.random.default_rng(7).integers(3, 512, 40).tolist()


@pytest.fixture(scope="module")
def expected(kimi):
    return generate_monolithic(kimi.model, PROMPT, 8)


def test_non_streamed_completion_has_the_openai_shape(cluster, kimi, expected):
    result = client.complete(cluster["router"].url, {"prompt": PROMPT, "max_tokens": 8, "return_token_ids": True})
    assert result.status == 200, result.body
    body = result.body
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    text = kimi.tokenizer.decode(expected, skip_special_tokens=True)
    assert body["choices"] == [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                                "token_ids": expected}]
    assert body["model"] == str(kimi.path)
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48}
    kv = body["kvwire"]
    assert kv["kv_source"] == "transfer" and kv["kv_error"] is None
    # 6 KDA layers x (conv 96x4 + recurrent 2x16x16) fp32 + 2 MLA layers x 40 tokens x (32 + 16) fp32
    assert kv["kv_bytes"] == kv_layout(kimi.config, "float32").nbytes(40) == 6 * 3584 + 2 * 40 * 48 * 4
    assert kv["decode_worker"] == cluster["decode"].url and kv["prefill_worker"] == cluster["prefill"].url
    assert 0 < kv["ttft_s"] < kv["total_s"]


def test_token_ids_only_when_asked(cluster):
    body = client.complete(cluster["router"].url, {"prompt": PROMPT, "max_tokens": 2}).body
    assert "token_ids" not in body["choices"][0]


def test_streamed_completion_is_sse_with_one_token_per_event(cluster, kimi, expected):
    result = client.complete(cluster["router"].url,
                             {"prompt": PROMPT, "max_tokens": 8, "stream": True, "return_token_ids": True})
    assert result.status == 200
    tokens = [e["choices"][0]["token_ids"] for e in result.events[:-1]]
    assert tokens == [[t] for t in expected]
    text = "".join(e["choices"][0]["text"] for e in result.events)
    assert text == kimi.tokenizer.decode(expected, skip_special_tokens=True)
    assert {e["model"] for e in result.events} == {str(kimi.path)}
    assert all(e["choices"][0]["finish_reason"] is None for e in result.events[:-1])
    final = result.events[-1]
    assert final["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "token_ids": []}]
    assert final["usage"] == {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48}
    assert final["kvwire"]["kv_source"] == "transfer"
    assert result.ttft_s is not None and result.ttft_s < result.total_s


def test_stream_ends_with_done(cluster):
    request = urllib.request.Request(cluster["router"].url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": [5, 6, 7], "max_tokens": 2, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line for line in response.read().decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 4  # two tokens, the final chunk, [DONE]


def test_concurrent_requests_do_not_mix_caches(cluster, kimi):
    prompts = [np.random.default_rng(100 + i).integers(3, 512, 20 + 37 * i).tolist() for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda p: client.complete(
            cluster["router"].url, {"prompt": p, "max_tokens": 6, "return_token_ids": True, "stream": len(p) % 2 == 0}),
            prompts))
    for prompt, result in zip(prompts, results):
        assert result.status == 200
        assert result.token_ids == generate_monolithic(kimi.model, prompt, 6)


@pytest.mark.parametrize("body,message", [
    ({"max_tokens": 4}, "`prompt` is required"),
    ({"prompt": [], "max_tokens": 4}, "`prompt` is an empty list"),
    ({"prompt": [1, -2]}, "`prompt[1]` is -2: token ids must be integers in [0, 2147483647]"),
    ({"prompt": [[1, 2]]}, "`prompt[0]` is [1, 2]: token ids must be integers in [0, 2147483647]"),
    ({"prompt": [2**70]}, f"`prompt[0]` is {2**70}: token ids must be integers in [0, 2147483647]"),
    ({"prompt": 5}, "`prompt` must be a string or a list of token ids, got int"),
    ({"prompt": [1, 2], "max_tokens": 0}, "`max_tokens` must be an integer in [1, 65536], got 0"),
    ({"prompt": [1, 2], "temperature": -1}, "`temperature` must be a number in [0, 100], got -1"),
    ({"prompt": [1, 2], "stream": "yes"}, "`stream` must be true or false, got 'yes'"),
    ({"prompt": [1, 2], "n": 2}, "`n` must be 1, got 2"),
    ({"prompt": [1, 600]}, "`prompt[1]` is 600, outside the model's vocabulary of 512 tokens"),
])
def test_bad_requests_are_400_with_the_reason(cluster, body, message):
    result = client.complete(cluster["router"].url, body)
    assert result.status == 400
    assert result.body == {"error": {"type": "invalid_request_error", "message": message}}


def test_text_prompt_is_tokenized_by_the_prefill_worker(cluster, kimi):
    result = client.complete(cluster["router"].url, {"prompt": "Hello there", "max_tokens": 4, "return_token_ids": True})
    assert result.status == 200, result.body
    token_ids = kimi.tokenizer("Hello there")["input_ids"]
    assert result.body["usage"]["prompt_tokens"] == len(token_ids)
    assert result.token_ids == generate_monolithic(kimi.model, token_ids, 4)


def test_invalid_json_is_400(cluster):
    result = client.complete(cluster["router"].url, b"{not json")
    assert result.status == 400
    assert result.body["error"]["message"].startswith("invalid JSON: ")


@pytest.mark.parametrize("role", ["router", "prefill", "decode"])
def test_health_and_metrics_on_every_process(cluster, role):
    status, text = client.get(cluster[role].url, "/health")
    assert status == 200
    assert json.loads(text)["role"] == role and json.loads(text)["status"] == "ok"
    client.complete(cluster["router"].url, {"prompt": [3, 4, 5], "max_tokens": 2})
    status, text = client.get(cluster[role].url, "/metrics")
    assert status == 200
    expected = {
        "router": ['kvwire_serve_router_requests_total{status="200"}', "# TYPE kvwire_serve_router_ttft_seconds_total counter"],
        "prefill": ['kvwire_serve_prefill_requests_total{outcome="ok"}', 'kvwire_serve_kv_goodput_bps{role="prefill",peer='],
        "decode": ['kvwire_serve_decode_requests_total{kv_source="transfer"}', 'kvwire_serve_kv_bytes{role="decode",peer='],
    }[role]
    for needle in expected:
        assert needle in text, text


def test_a_model_nobody_serves_is_404(cluster, kimi):
    result = client.complete(cluster["router"].url, {"model": "gpt-4", "prompt": [1, 2, 3], "max_tokens": 2})
    assert result.status == 404
    assert result.body["error"] == {"type": "NotFoundError",
                                    "message": f"The model `gpt-4` does not exist (served: {kimi.path})"}


def test_the_openai_client_lists_models_completes_and_chats(cluster, kimi):
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
    api = openai.OpenAI(base_url=cluster["router"].url + "/v1", api_key="none", max_retries=0)
    models = api.models.list().data
    assert [m.id for m in models] == [str(kimi.path)]
    model = models[0].id

    completion = api.completions.create(model=model, prompt=PROMPT, max_tokens=5)
    expected = generate_monolithic(kimi.model, PROMPT, 5)
    assert completion.choices[0].text == kimi.tokenizer.decode(expected, skip_special_tokens=True)
    assert completion.model == model
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (40, 5)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    chat_ids = kimi.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = generate_monolithic(kimi.model, chat_ids, 6)
    reply = kimi.tokenizer.decode(expected, skip_special_tokens=True)
    chat = api.chat.completions.create(model=model, messages=messages, max_tokens=6)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reply
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(chat_ids), len(expected))

    chunks = list(api.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert {c.model for c in chunks} == {model} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("body,message", [
    ({"max_tokens": 4}, "`messages` is required"),
    ({"messages": []}, "`messages` must be a non-empty list of {\"role\", \"content\"} objects"),
    ({"messages": [{"role": "robot", "content": "hi"}]},
     "`messages[0]` needs a `role` among ['system', 'user', 'assistant', 'developer', 'tool'], got "
     "{'role': 'robot', 'content': 'hi'}"),
    ({"messages": [{"role": "user", "content": 5}]}, "`messages[0].content` must be a string, got int"),
])
def test_bad_chat_requests_are_400_with_the_reason(cluster, body, message):
    request = urllib.request.Request(cluster["router"].url + "/v1/chat/completions", method="POST",
                                     data=json.dumps(body).encode())
    try:
        urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        assert json.loads(exc.read()) == {"error": {"type": "invalid_request_error", "message": message}}
    else:
        raise AssertionError("a bad chat request was answered 200")
