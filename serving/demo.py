"""``kvwire-serve demo``: disaggregated serving on one machine, checked against generate().

Starts a decode worker, a prefill worker and a router as three processes, sends a few
prompts through the router's OpenAI endpoint (streamed), prints each request's tokens,
time to first token, KV bytes moved and goodput, then runs the same prompts through one
monolithic ``generate()`` and exits 0 only if every token matches.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from . import client, launch

TINY_MODEL_NAME = "tiny-kimi-linear-seed0-v2"  # v2: with a tokenizer


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvwire"


def tiny_model_dir() -> Path:
    """The seeded tiny Kimi-Linear checkpoint, written on first use."""
    path = cache_dir() / TINY_MODEL_NAME
    if not (path / "config.json").is_file():
        from .model import write_tiny_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix=TINY_MODEL_NAME, dir=path.parent if path.parent.exists() else None))
        write_tiny_checkpoint(tmp, "KimiLinearForCausalLM", dtype="float32", seed=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(path)
        except OSError:  # another demo wrote it first
            pass
    return path


def prompts(lengths: list[int], vocab_size: int, seed: int = 1) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in lengths]


def start_cluster(model_dir: Path, secret_file: Path, extra_router_args: list[str] = (),
                  say=lambda line: None) -> list[launch.Worker]:
    """decode, prefill and router processes, in that order (stop them when done).
    ``say`` hears each phase as it starts and ends (each worker loads the model: seconds)."""
    common = ["--model", str(model_dir), "--port", "0", "--secret-file", str(secret_file)]
    workers = []
    phases = [("decode", [*common, "--kv-listen", "127.0.0.1:0"]), ("prefill", common), ("router", None)]
    try:
        for role, args in phases:
            if args is None:
                args = ["--prefill", workers[1].url, "--decode", workers[0].url, "--port", "0", *extra_router_args]
            started = time.monotonic()
            say(f"starting the {role} process" + (" (loads the model, warms up) ..." if role != "router" else " ..."))
            workers.append(launch.start(role, args))
            say(f"  {role} ready at {workers[-1].url} after {time.monotonic() - started:.1f} s")
    except BaseException:
        stop(workers)
        raise
    return workers


def stop(workers: list[launch.Worker]) -> None:
    for worker in reversed(workers):
        worker.stop()


def run(model_dir: str | None = None, max_tokens: int = 16, prompt_lengths: list[int] = (16, 200, 1000)) -> int:
    from .model import block_gpu_kernels

    block_gpu_kernels()
    if model_dir:
        model_path = Path(model_dir)
    else:
        say("writing the demo's tiny seeded Kimi-Linear model (first run only) ...")
        model_path = tiny_model_dir()
    say(f"model: {model_path}  (pass it to 'kvwire-serve decode/prefill --model' to run the workers yourself)")
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = Path(tmp) / "secret"
        secret_file.write_text(os.urandom(16).hex())
        workers = start_cluster(model_path, secret_file, say=say)
        try:
            decode, prefill, router = workers
            say(f"decode  {decode.url}  (kv {decode.info['kv_address']})\nprefill {prefill.url}\nrouter  {router.url}")
            from .model import load

            loaded = load(model_path)
            batch = prompts(list(prompt_lengths), loaded.config.vocab_size)
            say(f"sending {len(batch)} streamed requests through the router ...")
            results = [_send(router.url, prompt, max_tokens) for prompt in batch]
        finally:
            stop(workers)
    say("checking against a monolithic generate() of the same prompts, in this process ...")
    from .steps import generate_monolithic

    num_ok = 0
    for prompt, result in zip(batch, results):
        expected = generate_monolithic(loaded.model, prompt, max_tokens)
        got = result.token_ids if result.status == 200 else None
        same = got == expected
        num_ok += same
        print(f"  {len(prompt):5d} prompt tokens: {'MATCH' if same else 'MISMATCH'}" + ("" if same else f" expected {expected}"))
    ok = num_ok == len(batch)
    print(f"DEMO {'OK' if ok else 'FAILED'}: {num_ok}/{len(batch)} requests gave the monolithic tokens")
    return 0 if ok else 1


def _send(router_url: str, prompt: list[int], max_tokens: int) -> client.Completion:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "return_token_ids": True}
    result = client.complete(router_url, body, timeout_s=300)
    if result.status != 200:
        print(f"request of {len(prompt)} tokens failed: HTTP {result.status} {result.body}", file=sys.stderr)
        return result
    kv = result.kvwire
    ttft_ms = result.ttft_s * 1e3 if result.ttft_s is not None else float("nan")
    # The KV streams while the prefill computes, so bytes over that window measure the
    # model's pace, not the link's: what matters is how little waits after the prefill.
    print(
        f"request {len(prompt):5d} prompt tokens -> {result.token_ids}\n"
        f"    TTFT {ttft_ms:.1f} ms (prefill {kv['prefill_s'] * 1e3:.1f} ms); KV {kv['kv_bytes']} bytes streamed "
        f"layer by layer during the prefill, {kv['kv_after_prefill_s'] * 1e3:.1f} ms of transfer after its last "
        f"layer; link rtt {kv['link_rtt_ms']:.3f} ms; source {kv['kv_source']}", flush=True,
    )
    return result


def say(line: str) -> None:
    print(line, flush=True)
