"""Every OpenAI parameter is honoured by kvwire-serve workers or refused with 400 naming it,
checked with the ``openai`` client against transformers' ``generate()``."""

import re

import pytest
import torch

from serving.steps import generate_monolithic

from .support import PROMPT

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
        chunks = list(answer)
        got = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
        extension = next(c.model_extra["kvwire"] for c in chunks if "kvwire" in c.model_extra)
    else:
        got, extension = answer.choices[0].model_extra["token_ids"], answer.model_extra["kvwire"]
    assert got == expected
    assert extension["kv_source"] == "transfer"  # the decode worker continued the prefill's generator
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


def test_logprobs_are_the_models_own(api, kimi, greedy):
    """Each token's log-probability and the top 3, as generate()'s logits give them."""
    with torch.no_grad():
        out = kimi.model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=MAX_TOKENS,
                                  output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(PROMPT):].tolist()
    answer = api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=MAX_TOKENS, logprobs=3,
                                    extra_body={"return_token_ids": True})
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].model_extra["token_ids"] == tokens
    assert answer.model_extra["kvwire"]["kv_source"] == "transfer"  # the first token's logprobs came with the KV
    assert logprobs.tokens == [kimi.tokenizer.decode([t]) for t in tokens]
    for step, token in enumerate(tokens):
        expected = torch.log_softmax(out.logits[step][0].float(), dim=-1)
        assert logprobs.token_logprobs[step] == pytest.approx(float(expected[token]), abs=1e-5)
        top = torch.topk(expected, 3)
        assert logprobs.top_logprobs[step] == pytest.approx(
            {kimi.tokenizer.decode([i]): v for i, v in zip(top.indices.tolist(), top.values.tolist())}
            | {logprobs.tokens[step]: logprobs.token_logprobs[step]}, abs=1e-5)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(tokens))]


def test_chat_logprobs_have_the_chat_shape(api, kimi):
    answer = api.chat.completions.create(model=kimi.path, messages=[{"role": "user", "content": "hello"}],
                                         max_completion_tokens=5, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # the top one is at least the chosen one


def test_penalties_apply_to_the_tokens_generated_so_far(api, kimi, greedy):
    """OpenAI's presence and frequency penalties, as a logits processor given to generate()
    (negative: the random model rarely repeats a token, rewarding repeats changes its output)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Penalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            counts = torch.bincount(input_ids[0, len(PROMPT):], minlength=scores.shape[-1]).float()
            return scores - (-0.5) * counts - (-2.0) * (counts > 0).float()

    with torch.no_grad():
        out = kimi.model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=MAX_TOKENS,
                                  logits_processor=LogitsProcessorList([Penalties()]))
    expected = out[0, len(PROMPT):].tolist()
    assert expected != greedy[0]
    answer = api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=MAX_TOKENS, presence_penalty=-2.0,
                                    frequency_penalty=-0.5, extra_body={"return_token_ids": True})
    assert answer.choices[0].model_extra["token_ids"] == expected


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_the_completion(api, kimi, greedy, stream):
    for prompt, prompt_text in (("Hello there", "Hello there"),
                                (PROMPT, kimi.tokenizer.decode(PROMPT, skip_special_tokens=True))):
        answer = api.completions.create(model=kimi.path, prompt=prompt, max_tokens=4, echo=True, stream=stream)
        text = "".join(c.choices[0].text for c in answer if c.choices) if stream else answer.choices[0].text
        plain = api.completions.create(model=kimi.path, prompt=prompt, max_tokens=4).choices[0].text
        assert text == prompt_text + plain


@pytest.mark.parametrize(("params", "message"), [
    ({"logprobs": 21}, "`logprobs` must be an integer in [0, 20], got 21"),
    ({"echo": True, "logprobs": 1}, "`echo` is supported for /v1/completions without `logprobs` (the prompt's "
                                    "logprobs are not computed)"),
    ({"presence_penalty": 3}, "`presence_penalty` must be a number in [-2, 2], got 3"),
    ({"n": 2}, "`n` must be 1, got 2"),
    ({"extra_body": {"best_of": 3}}, "`best_of` is not supported by kvwire-serve workers (got 3)"),
    ({"extra_body": {"repetition_penalty": 1.2}}, "`repetition_penalty` is not supported by kvwire-serve workers "
                                                  "(got 1.2)"),
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
    answer = api.completions.create(model=kimi.path, prompt=PROMPT, max_tokens=4, n=1, user="someone",
                                    extra_body={"repetition_penalty": 1.0, "min_p": 0})
    assert answer.choices[0].finish_reason == "length"
