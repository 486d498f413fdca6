"""Every OpenAI parameter is honoured by kvwire-serve workers or refused with 400 naming it,
checked with the ``openai`` client against transformers' ``generate()``."""

import re

import pytest
import torch

from serving.steps import generate_monolithic

from .test_failures import PROMPT

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def api(cluster):
    return openai.OpenAI(base_url=cluster["router"].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def greedy(kimi):
    """generate()'s greedy tokens for PROMPT, and their text."""
    tokens = generate_monolithic(kimi.model, PROMPT, MAX_TOKENS)
    return tokens, kimi.tokenizer.decode(tokens, skip_special_tokens=True)


def stopped_by(tokens, tokenizer, stop: str) -> tuple[list[int], str]:
    """vLLM's rule: tokens up to the one whose text completes ``stop``; the text before it."""
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        if stop in text:
            return tokens[:k], text[:text.index(stop)]
    raise AssertionError(f"{stop!r} not in the output")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_output_before_the_string(api, kimi, greedy, stream):
    tokens, text = greedy
    stop = re.findall(r"[a-z]{3,}", text[6:])[0]  # a word the output reaches after a few tokens
    expected_tokens, expected_text = stopped_by(tokens, kimi.tokenizer, stop)
    assert len(expected_tokens) < MAX_TOKENS
    answer = api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=MAX_TOKENS, stop=[stop, "never seen"],
                                    stream=stream, extra_body={"return_token_ids": True})
    if stream:
        chunks = list(answer)
        got_text = "".join(c.choices[0].text for c in chunks if c.choices)
        got_tokens = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
        finish = chunks[-1].choices[0].finish_reason
    else:
        got_text, got_tokens = answer.choices[0].text, answer.choices[0].model_extra["token_ids"]
        finish = answer.choices[0].finish_reason
    assert (got_tokens, got_text, finish) == (expected_tokens, expected_text, "stop")


def test_stop_token_ids_end_the_output_with_the_token(api, kimi, greedy):
    tokens, _ = greedy
    stop_id = tokens[5]
    answer = api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                    extra_body={"return_token_ids": True, "stop_token_ids": [stop_id]})
    assert answer.choices[0].model_extra["token_ids"] == tokens[:tokens.index(stop_id) + 1]
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_seeded_sample_draws_what_generate_draws(api, kimi, stream):
    settings = {"temperature": 0.8, "top_p": 0.9, "top_k": 20}
    torch.manual_seed(1234)
    with torch.no_grad():
        out = kimi.model.generate(torch.tensor([PROMPT]), do_sample=True, max_new_tokens=MAX_TOKENS, **settings)
    expected = out[0, len(PROMPT):].tolist()
    answer = api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=MAX_TOKENS, seed=1234, stream=stream,
                                    temperature=settings["temperature"], top_p=settings["top_p"],
                                    extra_body={"top_k": settings["top_k"], "return_token_ids": True})
    if stream:
        got = [t for c in answer if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
    else:
        got = answer.choices[0].model_extra["token_ids"]
    assert got == expected
    assert expected != generate_monolithic(kimi.model, PROMPT, MAX_TOKENS)  # it did sample


def test_include_usage_ends_the_stream_with_the_usage(api, kimi):
    chunks = list(api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(PROMPT), 4)


def test_max_completion_tokens_bounds_a_chat(api, kimi):
    answer = api.chat.completions.create(model=kimi.path, messages=[{"role": "user", "content": "hello"}],
                                         max_completion_tokens=3)
    assert answer.usage.completion_tokens <= 3


@pytest.mark.parametrize(("params", "message"), [
    ({"logprobs": 2}, "`logprobs` is not supported by kvwire-serve workers (got 2)"),
    ({"echo": True}, "`echo` is not supported by kvwire-serve workers (got True)"),
    ({"presence_penalty": 0.5}, "`presence_penalty` is not supported by kvwire-serve workers (got 0.5)"),
    ({"frequency_penalty": 1.0}, "`frequency_penalty` is not supported by kvwire-serve workers (got 1.0)"),
    ({"n": 2}, "`n` must be 1, got 2"),
    ({"extra_body": {"best_of": 3}}, "`best_of` is not supported by kvwire-serve workers (got 3)"),
    ({"extra_body": {"mirostat": 1}}, "unknown parameter `mirostat`"),
    ({"top_p": 0}, "`top_p` must be a number in (0, 1], got 0"),
    ({"stop": [""]}, "`stop` must be a non-empty string or a list of them, got ['']"),
])
def test_a_parameter_not_honoured_is_400_naming_it(api, kimi, params, message):
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=4, **params)
    assert caught.value.body["message"] == message + (
        "; vLLM servers behind the router take it" if "not supported" in message else "")


def test_defaults_of_unsupported_parameters_are_accepted(api, kimi, greedy):
    answer = api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=4, echo=False, logprobs=None,
                                    presence_penalty=0, frequency_penalty=0.0, n=1, user="someone")
    assert answer.choices[0].finish_reason == "length"
