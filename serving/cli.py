"""``kvwire-serve``: start a decode worker, a prefill worker, a router, or the demo; write a tiny model.

This is the one place that reads the environment and sets up logging. Each worker prints
one JSON line on stdout once it is listening (``{"ready": role, "url": ..., ...}``), so a
launcher can start it on port 0 and learn where it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from . import flags, progress
from .model import quiet_transformers

log = logging.getLogger("serving")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, "DEBUG" if args.debug else args.log_level.upper()),
                        format=f"%(asctime)s {args.command} %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    progress.configure(quiet=args.quiet)
    if args.debug:
        return args.run(args)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except flags.UsageError as exc:
        print(f"kvwire-serve {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line for the user; --debug shows the traceback
        print(f"kvwire-serve {args.command}: {type(exc).__name__}: {exc} (--debug for the traceback)", file=sys.stderr)
        return 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints its usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    top = OneLineParser(prog="kvwire-serve", description=__doc__.splitlines()[0].replace("``", ""))
    top.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                     help="what goes to stderr (default: warning)")
    top.add_argument("--debug", action="store_true", help="debug logging, and tracebacks instead of one-line errors")
    top.add_argument("--quiet", action="store_true", help="no progress lines (they are off anyway when stderr is not "
                                                           "a terminal)")
    commands = top.add_subparsers(dest="command", required=True)

    decode = commands.add_parser("decode", help="a decode worker: receives KV over kvwire, streams tokens")
    _worker_arguments(decode)
    decode.add_argument("--kv-listen", required=True, type=flags.listen_address, metavar="HOST:PORT",
                        help="where kvwire KV arrives, e.g. 0.0.0.0:7800 (port 0: any free port)")
    decode.add_argument("--kv-advertise", type=flags.peer_address, metavar="HOST:PORT",
                        help="the KV address prefill workers should dial (default: --kv-listen, with this host's "
                             "address for 0.0.0.0)")
    decode.add_argument("--kv-wait", type=flags.positive_float, default=30.0, metavar="S",
                        help="seconds to wait for a request's KV before recomputing (default 30)")
    decode.set_defaults(run=run_decode)

    prefill = commands.add_parser("prefill", help="a prefill worker: runs prompts, streams KV layer by layer")
    _worker_arguments(prefill)
    prefill.add_argument("--streams", type=flags.positive_int, default=4,
                         help="kvwire connections per decode worker (default 4)")
    prefill.set_defaults(run=run_prefill)

    router = commands.add_parser("router", help="the OpenAI completions endpoint in front of the workers")
    router.add_argument("--config", type=Path, metavar="TOML", help="pools, PrfaaS clusters and links (flags add to it)")
    router.add_argument("--prefill", action="append", type=flags.worker_url, metavar="URL",
                        help="a local PD prefill worker, e.g. http://10.0.0.2:8100 (repeat)")
    router.add_argument("--decode", action="append", type=flags.worker_url, metavar="URL",
                        help="a decode worker, e.g. http://10.0.0.3:8200 (repeat)")
    router.add_argument("--prfaas", action="append", type=flags.worker_url, metavar="URL",
                        help="a prefill worker of the PrfaaS cluster 'prfaas' (repeat); long prompts go there")
    router.add_argument("--prfaas-threshold", type=int, metavar="TOKENS",
                        help="offload threshold t (kvwire-plan's); the controller raises it when the link is busy")
    router.add_argument("--prfaas-max-threshold", type=int, metavar="TOKENS", help="default 1048576")
    router.add_argument("--egress-gbps", type=flags.positive_float,
                        help="the PrfaaS cluster's egress link capacity (default 10)")
    router.add_argument("--control-interval", type=flags.positive_float, metavar="S",
                        help="seconds between worker-state polls (default 0.5)")
    router.add_argument("--engine", choices=["auto", "kvwire", "vllm", "vllm-nixl"],
                        help="what the workers are: kvwire-serve workers, vLLM OpenAI servers running "
                             "KVWireConnector, or (vllm-nixl) running vLLM's NixlConnector, driven as vLLM's "
                             "proxy drives them (default auto: asked at start-up; NIXL servers are never guessed)")
    router.add_argument("--decode-kv", action="append", type=flags.url_and_address, metavar="URL=HOST:PORT",
                        help="a vLLM decode server's kvwire address (its connector's listen), as prefill servers "
                             "reach it (repeat; unset: the prefill servers' own 'decode' option)")
    router.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1; 0.0.0.0: all)")
    router.add_argument("--port", type=flags.port, required=True, help="HTTP port (0: any free port)")
    router.add_argument("--kv-fallback", choices=["recompute", "error"],
                        help="on a failed KV transfer: the decode worker recomputes the prefill (default), or the client gets the error")
    router.add_argument("--timeout", type=flags.positive_float, metavar="S",
                        help="prefill timeout; also the token gap limit (default 120)")
    router.set_defaults(run=run_router)

    profile = commands.add_parser("profile", help="measure prefill time, KV bytes and decode step: a kvwire-plan profile")
    profile.add_argument("--model", type=flags.checkpoint, metavar="DIR",
                         help="a local checkpoint (default: the demo's tiny Kimi-Linear)")
    profile.add_argument("--dtype", choices=["float32", "bfloat16"])
    profile.add_argument("--lengths", type=flags.profile_lengths, default=[256, 1024, 4096],
                         help="comma-separated prompt lengths (default 256,1024,4096)")
    profile.add_argument("--repeats", type=flags.positive_int, default=3,
                         help="runs per length; the fastest is kept (default 3)")
    profile.add_argument("--prfaas-instances", type=flags.positive_int, default=1,
                         help="prefill instances in the PrfaaS cluster, for kvwire-plan (default 1)")
    profile.add_argument("--pd-instances", type=flags.positive_int, default=2,
                         help="instances in the local PD cluster, for kvwire-plan (default 2)")
    profile.add_argument("--egress-gbps", type=float, default=1.0, help="the PrfaaS cluster's egress link")
    profile.add_argument("--output-tokens", type=flags.positive_int, default=16,
                         help="mean output length of the workload (default 16)")
    profile.add_argument("--out", type=Path, help="write the profile here (default: stdout)")
    profile.set_defaults(run=run_profile)

    demo = commands.add_parser("demo", help="run decode, prefill and router here and check tokens against generate()")
    demo.add_argument("--model", type=flags.checkpoint, metavar="DIR",
                      help="a local checkpoint (default: a seeded tiny Kimi-Linear)")
    demo.add_argument("--max-tokens", type=flags.positive_int, default=16, help="tokens per request (default 16)")
    demo.add_argument("--prompt-lengths", type=flags.token_counts, default=[16, 200, 1000],
                      help="comma-separated prompt lengths in tokens (default 16,200,1000)")
    demo.set_defaults(run=run_demo)

    make = commands.add_parser("make-model", help="write a tiny seeded checkpoint (with a tokenizer) for --model")
    make.add_argument("dir", type=Path, metavar="DIR", help="the folder to write (created)")
    make.add_argument("--architecture", choices=["kimi-linear", "qwen3-next"], default="kimi-linear",
                      help="KDA:MLA 3:1 (default) or GatedDeltaNet:GQA 3:1")
    make.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="default float32")
    make.add_argument("--seed", type=int, default=0, help="weight seed (default 0, the demo's model)")
    make.set_defaults(run=run_make_model)
    return top


def _worker_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", required=True, type=flags.checkpoint, metavar="DIR",
                         help="a save_pretrained() checkpoint folder ('kvwire-serve make-model DIR' writes a tiny one)")
    command.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the checkpoint's dtype")
    command.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    command.add_argument("--port", type=flags.port, required=True, help="HTTP port (0: any free port)")
    command.add_argument("--kv-backend", choices=["tcp", "ucx", "auto"], default="tcp",
                         help="kvwire transport: tcp (default), ucx, or auto (UCX where both ends have a fabric)")
    command.add_argument("--secret-file", type=Path, help="shared kvwire secret (both workers must use the same)")
    command.add_argument("--prefix-cache-mib", type=float, default=0.0, metavar="MIB",
                         help="keep KV and linear states of prompt prefixes at block boundaries, LRU up to this size")
    command.add_argument("--block-tokens", type=flags.positive_int, default=64,
                         help="prefix cache block size in tokens (default 64)")
    command.add_argument("--max-model-len", type=flags.positive_int, metavar="TOKENS",
                         help="longest prompt plus completion served (default: the model's max_position_embeddings, "
                              "at most 32768: a CPU forward's memory grows with the prompt's square)")


def _backend(name: str) -> str:
    """The kvwire backend name, checked: 'auto' picks per peer (UCX where it has a fabric
    to offer, TCP otherwise; kvwire.transport.auto)."""
    from kvwire.transport import get_backend

    try:
        get_backend(name)
    except ValueError as exc:
        raise flags.UsageError(f"--kv-backend {name}: {exc}") from None
    return name


def _secret(path: Path | None) -> bytes | None:
    if path is None:
        log.warning("no --secret-file: kvwire peers are not authenticated")
        return None
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise flags.UsageError(f"cannot read --secret-file: {exc}") from None
    if not secret:
        raise flags.UsageError(f"secret file {path} is empty")
    return secret


def _load(args):
    from .model import load

    try:
        with progress.step(f"loading the model from {args.model}"):
            return load(args.model, dtype=args.dtype, max_model_len=getattr(args, "max_model_len", None))
    except (OSError, ValueError) as exc:
        raise flags.UsageError(f"cannot load --model {args.model}: {exc}") from None


def _announce(role: str, **fields):
    def on_ready(url: str) -> None:
        print(json.dumps({"ready": role, "url": url, **fields}), flush=True)
        log.info("%s listening on %s %s", role, url, fields or "")

    return on_ready


def _serve(app, sock, on_ready) -> int:
    from .http import serve_forever

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        await serve_forever(app, sock, on_ready)

    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        pass
    return 0


def run_decode(args) -> int:
    from .decode import DecodeOptions, DecodeWorker

    # both ports are checked before the model loads
    http_socket = flags.bind("--port", args.host, args.port, host_flag="--host")
    flags.check_listen_free("--kv-listen", args.kv_listen)
    quiet_transformers()
    options = DecodeOptions(kv_listen=args.kv_listen, kv_advertise=args.kv_advertise, backend=_backend(args.kv_backend),
                            secret=_secret(args.secret_file), kv_wait_s=args.kv_wait, **_prefix_cache(args))
    loaded = _load(args)
    try:
        with progress.step("warming up and opening --kv-listen"):
            worker = DecodeWorker(loaded, options)
    except OSError as exc:  # the KV port was taken since the check
        raise flags.UsageError(f"--kv-listen {args.kv_listen}: {exc.strerror or exc}") from None
    try:
        return _serve(worker.app(), http_socket, _announce("decode", kv_address=worker.kv_address))
    finally:
        worker.close()


def run_prefill(args) -> int:
    from .prefill import PrefillOptions, PrefillWorker

    http_socket = flags.bind("--port", args.host, args.port, host_flag="--host")
    quiet_transformers()
    options = PrefillOptions(backend=_backend(args.kv_backend), secret=_secret(args.secret_file), streams=args.streams,
                             **_prefix_cache(args))
    loaded = _load(args)
    with progress.step("warming up"):
        worker = PrefillWorker(loaded, options)
    try:
        return _serve(worker.app(), http_socket, _announce("prefill"))
    finally:
        worker.close()


def _prefix_cache(args) -> dict:
    if args.prefix_cache_mib < 0 or args.block_tokens < 1:
        raise flags.UsageError("need --prefix-cache-mib >= 0 and --block-tokens >= 1")
    return {"prefix_cache_bytes": int(args.prefix_cache_mib * (1 << 20)), "block_tokens": args.block_tokens}


def router_config(args):
    """The TOML file (if any) with the flags applied on top."""
    from . import router_config as rc

    try:
        base = rc.load(args.config) if args.config else None
        prfaas = None
        cluster_flags = {"threshold_tokens": args.prfaas_threshold, "max_threshold_tokens": args.prfaas_max_threshold,
                         "egress_gbps": args.egress_gbps}
        if args.prfaas:
            defaults = {"threshold_tokens": 0, "max_threshold_tokens": 1 << 20, "egress_gbps": 10.0}
            prfaas = [{"name": "prfaas", "prefill": args.prfaas,
                       **{k: defaults[k] if v is None else v for k, v in cluster_flags.items()}}]
        elif any(v is not None for v in cluster_flags.values()):
            raise ValueError("--prfaas-threshold, --prfaas-max-threshold and --egress-gbps describe the cluster of "
                             "--prfaas workers: give --prfaas (or set them in the config's [[prfaas]])")
        control = {"interval_s": args.control_interval} if args.control_interval is not None else None
        decode_kv = dict(args.decode_kv) if args.decode_kv else None
        return rc.merge(base, prefill=args.prefill, decode=args.decode, prfaas=prfaas, kv_fallback=args.kv_fallback,
                        prefill_timeout_s=args.timeout, token_timeout_s=args.timeout, control=control,
                        engine=args.engine, decode_kv=decode_kv)
    except ValueError as exc:
        raise flags.UsageError(str(exc)) from None


def check_worker_roles(config) -> None:
    """A worker URL given in the wrong role (a prefill worker as --decode, a router, something
    not kvwire) stops the router at start with one line per URL."""
    from .identify import wrong_roles

    urls = {url: ("--decode", "decode") for url in config.decode}
    urls.update({url: ("--prefill", "prefill") for url in config.prefill})
    urls.update({url: (f"--prfaas ({cluster.name})", "prefill") for cluster in config.prfaas for url in cluster.prefill})
    wrong = asyncio.run(wrong_roles(urls, timeout_s=config.connect_timeout_s, engine=config.engine))
    if wrong:
        raise flags.UsageError("; ".join(wrong))


def run_router(args) -> int:
    from .router import Router

    logging.getLogger("serving.policy").setLevel(logging.INFO)  # every change of t, with its reason

    config = router_config(args)
    http_socket = flags.bind("--port", args.host, args.port, host_flag="--host")
    check_worker_roles(config)
    return _serve(Router(config).app(), http_socket, _announce("router"))


def run_profile(args) -> int:
    import msgspec

    from .demo import tiny_model_dir
    from .profile import measure

    quiet_transformers()
    if args.model is None:
        args.model = str(tiny_model_dir())
    lengths = args.lengths
    try:
        profile = measure(_load(args), lengths, prfaas_instances=args.prfaas_instances, pd_instances=args.pd_instances,
                          egress_gbps=args.egress_gbps, output_tokens=args.output_tokens, repeats=args.repeats)
    except ValueError as exc:
        raise flags.UsageError(str(exc)) from None
    text = msgspec.json.format(msgspec.json.encode(profile), indent=2).decode()
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


def run_demo(args) -> int:
    from .demo import run

    quiet_transformers()
    return run(model_dir=args.model, max_tokens=args.max_tokens, prompt_lengths=args.prompt_lengths)


def run_make_model(args) -> int:
    if args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())):
        raise flags.UsageError(f"{args.dir} exists and is not empty; give a new folder")
    from .model import write_tiny_checkpoint

    quiet_transformers()
    architecture = {"kimi-linear": "KimiLinearForCausalLM", "qwen3-next": "Qwen3NextForCausalLM"}[args.architecture]
    with progress.step(f"writing a tiny seeded {args.architecture} checkpoint"):
        write_tiny_checkpoint(args.dir, architecture, dtype=args.dtype, seed=args.seed)
    print(f"wrote {args.dir} ({args.architecture}, {args.dtype}, seed {args.seed}, with a tokenizer); "
          f"use it as --model {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
