"""perf vllm-pd: one vLLM prefill -> decode pair with KVWireConnector and with vLLM's
NixlConnector (UCX over tcp, host buffers), same model and prompts, on loopback and
across an emulated WAN link (1 Gbit/s, 40 ms RTT, 0.1% loss).

For each prompt length: the prefill request (``max_tokens=1``, as vLLM's proxy sends it),
then the decode request's time to its first token, which is where each connector's KV
transfer shows (kvwire: the tail of a push that ran during the prefill; NIXL: the pull,
which starts when the decode request arrives). TTFT = the two in series, as a proxy
sees them. Also the bytes each moved, and the greedy tokens: kvwire's must equal NIXL's
on the same link (the same split and settings), or the run fails (``failure``); against
one plain instance they are only reported (the split runs other bf16 kernels, so a
near-tie of the tiny random model may flip).

Tensor parallelism: ``--tp 1:1,2:1,1:2`` (the default) also runs a TP=2 prefill instance
with a TP=1 decode instance and the reverse, each connector in that configuration (kvwire
sends each decode rank its pieces; the rows carry the bytes the decode ranks took in all).

    python -m perf vllm-pd --json                 # loopback + WAN (root), kvwire + NIXL, TP 1:1, 2:1, 1:2
    python -m perf vllm-pd --quick --json         # CI smoke: loopback, 4 layers, kvwire + NIXL, TP 1:1

NIXL comes with the test extra (``pip install -c constraints.txt -e '.[nixl]'``); without
it its rows are skipped with the reason, and the tokens are not checked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import random
import statistics
import tempfile

from serving.vllm_engine import Engine, first_difference, free_port, nixl_engine, start_all, tensor_parallel_args

QUICK_ARGS = ["--quick"]
PAGE_BYTES = 64 << 10  # one block of one layer for this model (an attention block; GDN pages are padded to it)


def unavailable() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install -e '.[vllm]')"
    return None


def _prompts(lengths, seed=5):
    rng = random.Random(seed)
    return [[rng.randrange(3, 2000) for _ in range(n)] for n in lengths]


def nixl_missing() -> str | None:
    if importlib.util.find_spec("nixl") is None and importlib.util.find_spec("nixl_cu12") is None:
        return "nixl is not installed (pip install -c constraints.txt -e '.[nixl]')"
    return None


def _pair(connector: str, model: str, logs: str, link=None, tp=(1, 1)):
    """(prefill, decode) engines of TP sizes ``tp``; in namespaces a and b of ``link`` when given."""
    host_p, host_d = (link.addr_a, link.addr_b) if link else ("127.0.0.1", "127.0.0.1")
    launch = {}
    sides = iter("ba")
    if link is not None:
        launch["popen"] = lambda argv, **kw: link.popen(next(sides), argv, **kw)
    prefill_args, decode_args = tensor_parallel_args(tp[0]), tensor_parallel_args(tp[1])
    if connector == "kvwire":
        listen = f"{host_d}:{free_port(tp[1]) if link is None else 7800}"
        decode = Engine("kvwire-decode", model, "--kv-role", "kv_consumer", "--kv-extra",
                        json.dumps({"listen": listen, "load_timeout_s": 120}), *decode_args, log_dir=logs, **launch)
        prefill = Engine("kvwire-prefill", model, "--kv-role", "kv_producer", "--kv-extra",
                         json.dumps({"decode": listen}), *prefill_args, log_dir=logs, **launch)
    else:  # NIXL's side channel takes port + rank
        ports = (free_port(tp[1]), free_port(tp[0])) if link is None else (5601, 5611)
        decode = nixl_engine("nixl-decode", model, *decode_args, host=host_d, port=ports[0], log_dir=logs, **launch)
        prefill = nixl_engine("nixl-prefill", model, *prefill_args, host=host_p, port=ports[1], log_dir=logs,
                              **launch)
    start_all(decode, prefill)
    return prefill, decode


def _moved_bytes(connector: str, prefill_params: dict, decode_params: dict | None, num_layers: int) -> dict:
    if connector == "kvwire":
        return {"bytes": (decode_params or {}).get("kvwire", {}).get("bytes")}
    blocks = prefill_params.get("remote_block_ids") or []
    return {"bytes_estimate": sum(len(g) for g in blocks) * (num_layers // max(1, len(blocks))) * PAGE_BYTES}


def _measure(prefill, decode, connector: str, prompts, max_tokens: int, reference, num_layers: int, repeats: int):
    rows = []
    for p, ref in zip(prompts, reference):
        ttfts, prefills, decodes, info = [], [], [], {}
        for _ in range(repeats):
            first = {"do_remote_decode": True}
            pre = prefill.generate([p], 1, [first])[0]
            dec = decode.generate([p], 1, [pre["kv_transfer_params"]])[0]
            prefills.append(pre["seconds"])
            decodes.append(dec["seconds"])
            ttfts.append(pre["seconds"] + dec["seconds"])
            info = _moved_bytes(connector, pre["kv_transfer_params"], dec["kv_transfer_params"], num_layers)
            if connector == "kvwire":
                info["loaded_tokens"] = dec["kv_transfer_params"]["kvwire"]["loaded_tokens"]
        pre = prefill.generate([p], 1, [{"do_remote_decode": True}])[0]
        tokens = decode.generate([p], max_tokens, [pre["kv_transfer_params"]])[0]["token_ids"]
        ttft = statistics.median(ttfts)
        rows.append({
            "prompt_tokens": len(p), "prefill_s": statistics.median(prefills),
            "decode_first_token_s": statistics.median(decodes), "ttft_s": ttft,
            "transfer_share_of_ttft": statistics.median(decodes) / ttft,  # the decode side's wait, its step included
            "tokens_equal_single_instance": sum(a == b for a, b in zip(tokens, ref)), "max_tokens": max_tokens,
            "tokens": tokens, **info,
        })
    return rows


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (GDN and full attention alternate)")
    ap.add_argument("--lengths", default="512,1024,3072")
    ap.add_argument("--links", default="loopback,wan")
    ap.add_argument("--connectors", default="kvwire,nixl")
    ap.add_argument("--tp", default="1:1,2:1,1:2", help="prefill:decode tensor-parallel sizes, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=1000)
    ap.add_argument("--rtt-ms", type=float, default=40)
    ap.add_argument("--loss", type=float, default=0.001)
    ap.add_argument("--quick", action="store_true", help="CI smoke: not comparable to the full figures")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.lengths, args.links, args.connectors, args.repeats = 4, "256,700", "loopback", "kvwire,nixl", 1
        args.tp = "1:1"
    from serving.model import vllm_tiny_config, write_tiny_checkpoint

    lengths = [int(n) for n in args.lengths.split(",")]
    configurations = [tuple(int(n) for n in c.split(":")) for c in args.tp.split(",")]
    prompts = _prompts(lengths)
    result = {"benchmark": "vllm-pd", "quick": args.quick, "layers": args.layers, "lengths": lengths,
              "link": {"rate_mbit": args.rate_mbit, "rtt_ms": args.rtt_ms, "loss": args.loss},
              "runs": {}, "skipped": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_checkpoint(f"{tmp}/model", config=vllm_tiny_config(args.layers), dtype="bfloat16",
                                           tokenizer=False))
        single = Engine("single", model, log_dir=tmp).wait_ready()
        reference = [out["token_ids"] for out in single.generate(prompts, args.max_tokens)]
        single.close()
        for link_name, tp in ((name, tp) for name in args.links.split(",") for tp in configurations):
            for connector in args.connectors.split(","):
                key = _key(connector, link_name, tp)
                reason = nixl_missing() if connector == "nixl" else None
                if link_name == "wan" and reason is None:
                    from perf.wanlink import unavailable_reason

                    reason = unavailable_reason()
                if reason:
                    result["skipped"][key] = reason
                    continue
                with contextlib.ExitStack() as stack:
                    link = None
                    if link_name == "wan":
                        from perf.wanlink import LinkSpec, WanLink

                        link = stack.enter_context(WanLink(LinkSpec(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms,
                                                                    loss=args.loss)))
                    prefill, decode = _pair(connector, model, tmp, link, tp)
                    stack.callback(prefill.close)
                    stack.callback(decode.close)
                    warm = _prompts([64], seed=99)
                    _measure(prefill, decode, connector, warm, 2, [[]], args.layers, 1)
                    result["runs"][key] = _measure(prefill, decode, connector, prompts, args.max_tokens, reference,
                                                   args.layers, args.repeats)
    for link_name, tp in ((name, tp) for name in args.links.split(",") for tp in configurations):
        mine, theirs = result["runs"].get(_key("kvwire", link_name, tp)), result["runs"].get(_key("nixl", link_name, tp))
        if mine and theirs:
            where = _key("", link_name, tp).lstrip("/")
            result.setdefault("ttft_ratio_kvwire_to_nixl", {})[where] = [
                round(a["ttft_s"] / b["ttft_s"], 3) for a, b in zip(mine, theirs)]
            differ = tokens_differ(mine, theirs)
            result.setdefault("tokens_kvwire_equal_nixl", {})[where] = not differ
            if differ:
                result.setdefault("failure", f"kvwire's tokens differ from NixlConnector's on {where}: "
                                             + "; ".join(differ))
    return result


def _key(connector: str, link_name: str, tp: tuple[int, int]) -> str:
    """``kvwire/loopback`` for TP 1:1, ``kvwire/loopback/tp2to1`` otherwise."""
    return f"{connector}/{link_name}" + ("" if tp == (1, 1) else f"/tp{tp[0]}to{tp[1]}")


def tokens_differ(mine: list[dict], theirs: list[dict]) -> list[str]:
    """Where kvwire's greedy tokens differ from NIXL's, per prompt (nothing: all equal)."""
    out = []
    for a, b in zip(mine, theirs):
        at = first_difference(a["tokens"], b["tokens"])
        if at is not None:
            out.append(f"{a['prompt_tokens']}-token prompt, from token {at} ({a['tokens'][at:at + 1]} vs "
                       f"{b['tokens'][at:at + 1]})")
    return out


def plot(result: dict, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, rows in result["runs"].items():
        tokens = [r["prompt_tokens"] for r in rows]
        left.plot(tokens, [1000 * r["ttft_s"] for r in rows], marker="o", label=key)
        right.plot(tokens, [1000 * r["decode_first_token_s"] for r in rows], marker="o", label=key)
    left.set_title("TTFT (prefill request + decode's first token)")
    right.set_title("decode side: request to first token (the KV wait)")
    for ax in (left, right):
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.suptitle(f"vLLM prefill -> decode, {result['layers']} layers" + (" (quick smoke)" if result["quick"] else ""))
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
