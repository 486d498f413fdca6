"""How the connector tests configure and drive their vLLM engines (``serving.vllm_engine``),
and the reference a kvwire pair is judged by: vLLM's own P/D with ``NixlConnector``."""

from __future__ import annotations

import json

from serving.vllm_engine import ROOT, Engine, free_port, nixl_engine, start_all  # noqa: F401  (the tests' engines)


def consumer_args(listen: str, *, secret_file=None, prefix_caching=True, policy="recompute", **extra) -> list[str]:
    config = {"listen": listen, "load_timeout_s": 5, "lease_s": 4, **extra}
    if secret_file is not None:
        config["secret_file"] = str(secret_file)
    return ["--kv-role", "kv_consumer", "--kv-extra", json.dumps(config), "--load-failure-policy", policy,
            *(["--prefix-caching"] if prefix_caching else [])]


def producer_args(decode: str | None = None, *, secret_file=None, prefix_caching=True, **extra) -> list[str]:
    config = {**({"decode": decode} if decode else {}), **extra}
    if secret_file is not None:
        config["secret_file"] = str(secret_file)
    return ["--kv-role", "kv_producer", "--kv-extra", json.dumps(config),
            *(["--prefix-caching"] if prefix_caching else [])]


def disaggregated(prefill: Engine, decode: Engine, prompts, max_tokens: int, targets=None):
    """The proxy's two requests: prefill with max_tokens=1, then decode with its parameters
    (all prompts in one batch on each side)."""
    first = [{"do_remote_decode": True, **({"kvwire": t} if t else {})} for t in (targets or [None] * len(prompts))]
    prefilled = prefill.generate(prompts, 1, first)
    return prefilled, decode.generate(prompts, max_tokens, [p["kv_transfer_params"] for p in prefilled])


def one_by_one(prefill: Engine, decode: Engine, prompts, max_tokens: int, targets=None):
    """``disaggregated`` for each prompt alone, in order: how tokens are compared. In bf16
    the numbers depend on which requests share a step, and on the decode side that
    follows when each transfer lands (a push lands before the decode request, a NIXL pull
    after it), so batches of several prompts are no stable basis for equal tokens."""
    prefilled, decoded = [], []
    for p, t in zip(prompts, targets or [None] * len(prompts)):
        pre, dec = disaggregated(prefill, decode, [p], max_tokens, [t])
        prefilled += pre
        decoded += dec
    return prefilled, decoded


class NixlPD:
    """vLLM's own prefill -> decode pair (``NixlConnector``, UCX over tcp, host buffers) on
    the same model and settings as a kvwire pair: the tokens that pair must equal.

    The split (prefill computes the prompt but its last token, decode computes that one
    from the pulled state) runs other bf16 kernels than one instance, so a single instance
    is no reference for it: on a near-tie of a tiny random model the tokens differ, and
    where depends on the machine. ``NixlPD.run`` starts the pair, sends each prompt alone
    (``one_by_one``, as the kvwire tests compare theirs) in the order given, so its prefix
    cache sees the history the kvwire pair's does, and stops the pair again: its engines'
    UCX progress threads would otherwise compete with the tests for the CPU. Its decode
    side fails a load instead of recomputing (``nixl_engine``), so a reference never comes
    from a recompute.
    """

    def __init__(self, made: dict[tuple, list[int]]):
        self._made = made

    @classmethod
    def run(cls, name: str, model: str, prompts, max_tokens: int, *, log_dir, prefix_caching=True,
            prefill_args=(), decode_args=()) -> NixlPD:
        caching = ["--prefix-caching"] if prefix_caching else []

        def engine(side: str, extra=()) -> Engine:
            return nixl_engine(f"{name}-{side}", model, *caching, *extra, host="127.0.0.1", port=free_port(),
                               log_dir=log_dir)

        decode, prefill = engine("decode", decode_args), engine("prefill", prefill_args)
        made: dict[tuple, list[int]] = {}
        try:
            start_all(decode, prefill)
            for p in prompts:
                if (tuple(p), max_tokens) not in made:
                    _, (out,) = disaggregated(prefill, decode, [list(p)], max_tokens)
                    if out["finish_reason"] == "error" or not out["token_ids"]:
                        raise RuntimeError(f"the NIXL reference pair failed a request: {out}; "
                                           f"log: {decode.log_tail()}")
                    made[(tuple(p), max_tokens)] = out["token_ids"]
        finally:
            prefill.close()
            decode.close()
        return cls(made)

    def tokens(self, prompts, max_tokens: int) -> list[list[int]]:
        missing = [len(p) for p in prompts if (tuple(p), max_tokens) not in self._made]
        if missing:
            raise KeyError(f"no NIXL reference was computed for prompts of {missing} tokens ({max_tokens} tokens "
                           "out): add them to the fixture's prompts")
        return [self._made[(tuple(p), max_tokens)] for p in prompts]
