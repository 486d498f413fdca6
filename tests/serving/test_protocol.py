"""The router-worker messages: what a worker takes is typed and bounded, and a malformed
one is refused with the field it got wrong, before the worker acts on it."""

import json
import urllib.error
import urllib.request

import pytest

from serving import protocol
from serving.errors import BadRequest
from serving.prompts import MAX_PROMPT_TOKENS


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_every_message_comes_back_as_it_was_sent():
    messages = [
        protocol.PrefillJob(request_id="r", prompt=[1, 2, 3], kv_address="127.0.0.1:9", logprobs=2,
                            sampling=protocol.SamplingParams(temperature=0.5, seed=7, top_k=3)),
        protocol.DecodeJob(request_id="r", prompt_token_ids=[5], max_tokens=4, stop=["\n"], first_token=9,
                           first_logprobs=(-0.5, [(9, -0.5), (3, -1.5)]), fallback="error"),
        protocol.TokenEvent(token=3, text="a", logprobs=protocol.LogprobsLine(token="a", logprob=-1.0,
                                                                                  top=[("a", -1.0)])),
        protocol.DecodeFailed(error=protocol.ErrorInfo(type="internal_error", message="boom")),
    ]
    for message in messages:
        kind = protocol.DecodeEvent if isinstance(message, protocol.StreamEvent) else type(message)
        assert protocol.decode(protocol.encode(message), kind) == message


@pytest.mark.parametrize("line,words", [
    (b'{"event": "token", "token": -1, "text": ""}', "Expected `int` >= 0 - at `$.token`"),
    (b'{"event": "finish", "num_tokens": 1}', "Invalid value 'finish' - at `$.event`"),
    (b'{"token": 1, "text": "a"}', "Object missing required field `event`"),
    (b"not json", "decode stream event is not valid JSON"),
])
def test_a_stream_event_that_is_not_one_is_refused_naming_what_is_wrong(line, words):
    with pytest.raises(BadRequest) as refused:
        protocol.decode(line, protocol.DecodeEvent)
    assert str(refused.value).startswith("invalid decode stream event: " if "JSON" not in words else words)
    assert words in str(refused.value)


def test_a_worker_refuses_a_malformed_job_naming_the_field_before_any_work(cluster):
    prefill, decode = cluster["prefill"].url, cluster["decode"].url
    job = {"request_id": "p", "prompt": [1, 2, 3], "kv_address": "127.0.0.1:9"}
    cases = [
        (prefill + "/internal/prefill", {**job, "prompt": [1, -2]}, "invalid PrefillJob: Expected `int` >= 0 - at `$.prompt[1]`"),
        (prefill + "/internal/prefill", {**job, "temperature": 0.5}, "invalid PrefillJob: Object contains unknown field `temperature`"),
        (prefill + "/internal/prefill", {**job, "request_id": ""}, "invalid PrefillJob: Expected `str` of length >= 1 - at `$.request_id`"),
        (prefill + "/internal/probe", {"kv_address": 5}, "invalid ProbeRequest: Expected `str`, got `int` - at `$.kv_address`"),
        (decode + "/internal/decode", {"request_id": "d", "prompt_token_ids": [1], "max_tokens": 0},
         "invalid DecodeJob: Expected `int` >= 1 - at `$.max_tokens`"),
        (decode + "/internal/decode", {"request_id": "d", "prompt_token_ids": [1], "max_tokens": 1, "fallback": "maybe"},
         "invalid DecodeJob: Invalid enum value 'maybe' - at `$.fallback`"),
        (prefill + "/internal/tokenize", b"{", "TokenizeRequest is not valid JSON"),
    ]
    for url, body, words in cases:
        status, answer = post(url, body)
        assert status == 400, (url, answer)
        assert answer["error"]["type"] == "invalid_request_error"
        assert words in answer["error"]["message"], answer


def test_a_prompt_longer_than_the_bound_is_refused_before_it_is_read_as_tokens():
    body = json.dumps({"request_id": "r", "prompt_token_ids": [1] * (MAX_PROMPT_TOKENS + 1), "max_tokens": 1})
    with pytest.raises(BadRequest, match=rf"Expected `array` of length <= {MAX_PROMPT_TOKENS} - at `\$.prompt_token_ids`"):
        protocol.decode(body, protocol.DecodeJob)
