"""The connector over kvwire's other paths: UCX, an emulated WAN link; judged against
vLLM's NixlConnector P/D with the same settings (``nixl_plain``)."""

import pytest

from perf.wanlink import ADDR_B, LinkSpec, WanLink, unavailable_reason

from .engines import Engine, consumer_args, one_by_one, producer_args, start_all
from .support import MAX_TOKENS, free_port, loaded, nixl_reference, prompt

# sharing no prefix, so each fresh pair and the reference compute them alike whatever ran before
PROMPTS = [prompt(129, 61), prompt(300, 62)]


@pytest.fixture(scope="module")
def nixl_plain(vllm_model, engine_logs):
    """NixlConnector P/D with these pairs' settings (prefix caching on, vLLM's default steps)."""
    return nixl_reference("nixl-plain", vllm_model, PROMPTS, log_dir=engine_logs)


def _pair(name, model, logs, secret_file, listen, *, consumer=None, producer=None, **kwargs):
    decode_engine = Engine(f"{name}-decode", model, *consumer_args(listen, secret_file=secret_file, **(consumer or {})),
                           log_dir=logs, **kwargs)
    prefill_engine = Engine(f"{name}-prefill", model, *producer_args(listen, secret_file=secret_file,
                                                                     **(producer or {})), log_dir=logs, **kwargs)
    return start_all(decode_engine, prefill_engine)


def _check(prefill, decode, nixl_plain) -> None:
    """The pair gives NIXL's P/D tokens, from pushed KV; closes both."""
    try:
        _, decoded = one_by_one(prefill, decode, PROMPTS, MAX_TOKENS)
    finally:
        prefill.close()
        decode.close()
    assert [out["token_ids"] for out in decoded] == nixl_plain.tokens(PROMPTS, MAX_TOKENS)
    assert loaded(decoded) == [len(p) - 1 for p in PROMPTS]


def test_over_ucx(vllm_model, engine_logs, secret_file, nixl_plain):
    pytest.importorskip("ucxx", reason="ucxx is in the test extra (kvwire[ucx])")
    listen = f"127.0.0.1:{free_port()}"
    decode, prefill = _pair("ucx", vllm_model, engine_logs, secret_file, listen,
                            consumer={"backend": "ucx"}, producer={"backend": "ucx"})
    _check(prefill, decode, nixl_plain)


def test_across_an_emulated_wan_link(vllm_model, engine_logs, secret_file, nixl_plain):
    """Prefill in one namespace, decode in another, 1 Gbit/s, 40 ms RTT, 0.1% loss."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"WAN emulation unavailable: {reason}")
    with WanLink(LinkSpec(rate_mbit=1000, rtt_ms=40, loss=0.001)) as link:
        sides = iter("ba")  # _pair starts the decode engine first
        decode, prefill = _pair("wan", vllm_model, engine_logs, secret_file, f"{ADDR_B}:7800",
                                popen=lambda argv, **kw: link.popen(next(sides), argv, **kw))
        _check(prefill, decode, nixl_plain)
