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


def start_cluster(model_dir: Path, secret_file: Path, extra_router_args: list[str] = ()) -> list[launch.Worker]:
    """decode, prefill and router processes, in that order (stop them when done)."""
    common = ["--model", str(model_dir), "--port", "0", "--secret-file", str(secret_file)]
    workers = []
    try:
        workers.append(launch.start("decode", [*common, "--kv-listen", "127.0.0.1:0"]))
        workers.append(launch.start("prefill", common))
        workers.append(launch.start("router", ["--prefill", workers[1].url, "--decode", workers[0].url,
                                               "--port", "0", *extra_router_args]))
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
    model_path = Path(model_dir) if model_dir else tiny_model_dir()
    print(f"model: {model_path}")
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = Path(tmp) / "secret"
        secret_file.write_text(os.urandom(16).hex())
        workers = start_cluster(model_path, secret_file)
        try:
            decode, prefill, router = workers
            print(f"decode  {decode.url}  (kv {decode.info['kv_address']})\nprefill {prefill.url}\nrouter  {router.url}")
            from .model import load

            loaded = load(model_path)
            batch = prompts(list(prompt_lengths), loaded.config.vocab_size)
            results = [_send(router.url, prompt, max_tokens) for prompt in batch]
        finally:
            stop(workers)
    print("monolithic generate() of the same prompts:")
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
    goodput = kv.get("kv_goodput_bps") or 0.0
    link = kv.get("link_goodput_bps") or 0.0
    print(
        f"request {len(prompt):5d} prompt tokens -> {result.token_ids}\n"
        f"    TTFT {ttft_ms:.1f} ms (prefill {kv['prefill_s'] * 1e3:.1f} ms); KV {kv['kv_bytes']} bytes streamed "
        f"layer by layer over {kv['kv_transfer_s'] * 1e3:.1f} ms, {kv['kv_after_prefill_s'] * 1e3:.1f} ms of it "
        f"after the prefill; goodput {goodput / 1e6:.1f} Mbit/s over that window, link EWMA {link / 1e6:.1f} Mbit/s, "
        f"rtt {kv['link_rtt_ms']:.3f} ms; source {kv['kv_source']}"
    )
    return result
