"""One offline vLLM engine in its own process, driven by JSON lines: what the connector's
tests and ``perf vllm-pd`` run as prefill, decode and single instances.

    python -m serving.vllm_engine --model DIR [--kv-role kv_producer --kv-extra JSON]

prints ``{"ready": ...}`` once the engine is up, then answers each stdin line
``{"prompts": [[ids], ...], "max_tokens": n, "params": [kv_transfer_params | null, ...]}``
with ``{"outputs": [{"token_ids", "kv_transfer_params", "finish_reason", "seconds"}]}``
and ``{"free_blocks": true}`` with the scheduler's free KV blocks. vLLM's in-process mode
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor) keeps start-up near 15 s.
``Engine`` (below) is the parent's handle on one such process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensor_parallel_args(size: int) -> list[str]:
    """This module's flags for an engine of ``size`` ranks (none for one)."""
    return ["--tensor-parallel-size", str(size)] if size > 1 else []


def cpu_thread_binding(size: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``size`` ranks, a core of this process's each: vLLM
    CPU binds each rank's threads, and on one NUMA node refuses two ranks without it."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[r % len(cores)]) for r in range(size))


def build(args):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv_config = None
    if args.kv_role:
        kv_config = KVTransferConfig(
            kv_connector=args.connector, kv_role=args.kv_role,
            kv_connector_module_path=args.connector_module,
            kv_connector_extra_config=json.loads(args.kv_extra), kv_load_failure_policy=args.load_failure_policy,
            **({"kv_buffer_device": "cpu"} if args.connector == "NixlConnector" else {}),
        )
    return LLM(
        model=args.model, skip_tokenizer_init=True, enforce_eager=True, max_model_len=args.max_model_len,
        distributed_executor_backend="uni" if args.tensor_parallel_size == 1 else "mp",
        tensor_parallel_size=args.tensor_parallel_size, enable_prefix_caching=args.prefix_caching, seed=0,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_transfer_config=kv_config,
    )


def free_blocks(llm) -> int:
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def run(llm, job: dict) -> dict:
    from vllm import SamplingParams

    prompts = job["prompts"]
    params = job.get("params") or [None] * len(prompts)
    sampling = [SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0,
                               extra_args={"kv_transfer_params": p} if p is not None else None)
                for p in params]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"outputs": [{
        "token_ids": list(out.outputs[0].token_ids),
        "finish_reason": out.outputs[0].finish_reason,
        "kv_transfer_params": out.kv_transfer_params,
        "seconds": seconds,
    } for out in outputs]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--connector", default="KVWireConnector")
    parser.add_argument("--connector-module", default=None,
                        help="module defining --connector (default: kvwire.integrations.vllm for KVWire*)")
    parser.add_argument("--kv-role", choices=["kv_producer", "kv_consumer", "kv_both"])
    parser.add_argument("--kv-extra", default="{}", help="kv_connector_extra_config as JSON")
    parser.add_argument("--load-failure-policy", default="recompute", choices=["recompute", "fail"])
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks in worker processes; on CPU each is bound to a core of its own")
    args = parser.parse_args(argv)
    if args.tensor_parallel_size > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(args.tensor_parallel_size))
    if args.connector_module is None and args.connector.startswith("KVWire"):
        args.connector_module = "kvwire.integrations.vllm"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM's own prints (and its worker processes', which inherit fd 1) must not mix with
    # the JSON lines: those go to a copy of stdout, and fd 1 becomes stderr.
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    llm = build(args)
    out.write(json.dumps({"ready": True, "free_blocks": free_blocks(llm)}) + "\n")
    out.flush()
    for line in sys.stdin:
        job = json.loads(line)
        try:
            reply = {"free_blocks": free_blocks(llm)} if job.get("free_blocks") else run(llm, job)
        except Exception as exc:  # noqa: BLE001 - the test reads the error
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# -- the parent's side ------------------------------------------------------------------


class Engine:
    """One vLLM engine process; ``ask(job)`` sends a JSON line and returns its answer."""

    def __init__(self, name: str, model: str, *args: str, log_dir, popen=subprocess.Popen, env=None):
        self.name = name
        self.log_path = os.path.join(str(log_dir), f"{name}.log")
        argv = [sys.executable, "-m", "serving.vllm_engine", "--model", model, *args]
        child_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self._log = open(self.log_path, "w")
        self.proc = popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                          cwd=ROOT, env=child_env)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"engine {self.name} said nothing within {timeout}s; log: {self.log_tail()}") from None
        if line is None:
            raise RuntimeError(f"engine {self.name} exited ({self.proc.poll()}); log: {self.log_tail()}")
        return json.loads(line)

    def wait_ready(self, timeout: float = 240.0) -> "Engine":
        if self.ready is None:
            self.ready = self._line(timeout)
        return self

    def ask(self, job: dict, timeout: float = 180.0) -> dict:
        self.wait_ready()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = self._line(timeout)
        if "error" in reply:
            raise RuntimeError(f"engine {self.name}: {reply['error']}")
        return reply

    def generate(self, prompts, max_tokens: int, params=None, timeout: float = 180.0) -> list[dict]:
        return self.ask({"prompts": prompts, "max_tokens": max_tokens, "params": params}, timeout)["outputs"]

    def free_blocks(self) -> int:
        return self.ask({"free_blocks": True})["free_blocks"]

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-chars:]

    def log_text(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.kill()
        self._log.close()


def nixl_engine(name: str, model: str, *args: str, host: str, port: int, log_dir, **kwargs) -> Engine:
    """An engine with vLLM's own ``NixlConnector`` (UCX over tcp, host buffers, its side
    channel at ``host:port``), the reference kvwire's connector is judged by. A failed
    load fails its request (``kv_load_failure_policy=fail``): never a silent recompute."""
    env = {"UCX_TLS": "tcp,self", "VLLM_NIXL_SIDE_CHANNEL_HOST": host, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(port)}
    return Engine(name, model, "--connector", "NixlConnector", "--kv-role", "kv_both", "--load-failure-policy", "fail",
                  *args, log_dir=log_dir, env=env, **kwargs)


def first_difference(tokens: list[int], other: list[int]) -> int | None:
    """The first position where two token lists differ (a length counts), or None."""
    at = next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), min(len(tokens), len(other)))
    return None if at == len(tokens) == len(other) else at


def free_port(count: int = 1) -> int:
    """A free port below the kernel's ephemeral range, the first of ``count`` free in a row (a
    TP instance's ranks take port + r). Below that range no connect() or bind(0) anywhere on
    the host takes it before the engine that is given it binds, seconds later (a NIXL side
    channel lost that race to another server's connections, and its engine never started)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    choose = random.SystemRandom()
    for _ in range(1000):
        base = choose.randrange(max(1024, low - 16384), low - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} free port(s) in a row below the ephemeral range (from {low})")


def openai_server(model: str, port: int, kv_config: dict, log_path, tp_size: int = 1, args=(),
                  env=None) -> subprocess.Popen:
    """A vLLM OpenAI server process (in-process engine, the ``uni`` executor for one rank)
    with ``kv_config`` as its ``--kv-transfer-config``; its output goes to ``log_path``."""
    child_env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=ROOT,
                     **(env or {}))
    parallel = ["--distributed-executor-backend", "uni"]
    if tp_size > 1:
        child_env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tp_size)
        parallel = ["--distributed-executor-backend", "mp", "--tensor-parallel-size", str(tp_size)]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--enforce-eager", "--max-model-len", "4096", *parallel, *args, "--kv-transfer-config", json.dumps(kv_config)]
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=ROOT)


def wait_http(url: str, proc: subprocess.Popen, log_path, timeout: float = 240.0) -> None:
    """Until ``url`` answers; a process that exits first, or a timeout, raises with its log's tail."""
    import urllib.request

    def tail() -> str:
        with open(log_path) as f:
            return f.read()[-3000:]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up in {timeout}s: {tail()}")


KVWIRE_CONNECTOR = {"kv_connector": "KVWireConnector", "kv_connector_module_path": "kvwire.integrations.vllm"}
NIXL_CONNECTOR = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}


@contextlib.contextmanager
def pd_servers(connector: str, model: str, log_dir, *, secret_file=None, tp=(1, 1), args=(), kv_config=None,
               router_args=(), omp_threads: int | None = None):
    """A decode and a prefill vLLM OpenAI server with ``connector`` ("kvwire" or "nixl"), of
    TP sizes ``tp``, and ``kvwire-serve router`` in front of them (``--engine vllm-nixl`` for
    NIXL). Yields the URLs (router, prefill, decode), kvwire's ``kv_address`` and the ``pids``;
    stops them all after. ``kv_config`` adds to both servers' --kv-transfer-config.

    ``omp_threads``: OpenMP threads per engine (default: vLLM's, a team of every core, which
    it means to cut to one for serving but does not once bound). Two such teams on one host
    spin against each other at every barrier: under load both servers stall for seconds."""
    decode_port, prefill_port, router_port = free_port(), free_port(), free_port()
    ports = {"decode": decode_port, "prefill": prefill_port}
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    if connector == "kvwire":
        kv_address = f"127.0.0.1:{free_port(tp[1])}"
        extra = {"secret_file": str(secret_file)} if secret_file else {}
        configs = {"decode": ({**KVWIRE_CONNECTOR, "kv_role": "kv_consumer",
                               "kv_connector_extra_config": {"listen": kv_address, **extra}}, {}),
                   "prefill": ({**KVWIRE_CONNECTOR, "kv_role": "kv_producer", "kv_connector_extra_config": extra}, {})}
        engine = "vllm"  # the decode server's kvwire address is learned from its /metrics
    elif connector == "nixl":  # each server's side channel on a port of its own; UCX over tcp, as on any host here
        kv_address = None
        roles = {"decode": "kv_consumer", "prefill": "kv_producer"}  # vLLM deprecates kv_both for NIXL
        configs = {role: ({**NIXL_CONNECTOR, "kv_role": roles[role]},
                          {"UCX_TLS": "tcp,self", "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                           "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}) for role in ports}
        engine = "vllm-nixl"
    else:
        raise ValueError(f"connector must be 'kvwire' or 'nixl', not {connector!r}")
    if omp_threads:
        for role in configs:
            configs[role] = (configs[role][0], {**configs[role][1], "OMP_NUM_THREADS": str(omp_threads)})
    logs = {name: os.path.join(str(log_dir), f"{connector}-tp{tp[0]}to{tp[1]}-{name}.log")
            for name in ("decode", "prefill", "router")}
    procs = {}
    try:
        for role, (config, env) in configs.items():
            procs[role] = openai_server(model, ports[role], {**config, **(kv_config or {})}, logs[role],
                                        tp[1] if role == "decode" else tp[0], args=args, env=env)
        for role in ("decode", "prefill"):
            wait_http(urls[role] + "/v1/models", procs[role], logs[role], timeout=300)
        with open(logs["router"], "w") as log:
            procs["router"] = subprocess.Popen(
                [sys.executable, "-m", "serving", "router", "--prefill", urls["prefill"], "--decode", urls["decode"],
                 "--port", str(router_port), "--engine", engine, *router_args],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        router = f"http://127.0.0.1:{router_port}"
        wait_http(router + "/health", procs["router"], logs["router"], 60)
        yield {"router": router, **urls, "kv_address": kv_address, "pids": {r: p.pid for r, p in procs.items()}}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_all(*engines: Engine) -> list[Engine]:
    """Wait for engines started together (they load in parallel)."""
    deadline = time.monotonic() + 300
    for engine in engines:
        engine.wait_ready(max(1.0, deadline - time.monotonic()))
    return list(engines)


if __name__ == "__main__":
    main()
