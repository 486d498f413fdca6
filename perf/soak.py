"""Fault-injection soak: many transfers between separate processes while faults are injected.

Processes: one long-lived receiver process (measured for leaks), one sender worker
process (killed and restarted for the kill_sender fault), and a victim receiver process
for kill_receiver. Between each sender and receiver sits a FaultyRelay in this process.
Per transfer one fault is drawn. Over TCP every byte passes through the relay:

  none          clean link                                  -> verified success
  drop          one connection cut mid-transfer             -> success (resumed)
  truncate      every connection cut mid-frame              -> PeerLostError/TransferTimeout
  flip          one bit flipped in the stream               -> success or IntegrityError/ProtocolError
  stall         link stops forwarding                       -> TransferTimeout
  delay         sender slower than the request deadline     -> TransferTimeout
  kill_sender   sender process SIGKILLed mid-transfer       -> PeerLostError
  kill_receiver receiver process SIGKILLed mid-transfer     -> PeerLostError (at the sender)

Over UCX (``--backend ucx``) ucxx moves the bytes itself (shared memory / CMA here), so
byte-level faults (flip, stall, truncate at an offset) cannot be applied to them; only
the bootstrap and liveness TCP socket passes through the relay. The UCX faults are:

  none, delay, kill_sender, kill_receiver   as above
  drop          one connection's liveness socket cut mid-transfer  -> success (resumed)
  truncate      every liveness socket cut mid-transfer             -> success or PeerLostError/TransferTimeout
  freeze_sender sender process SIGSTOPped past the deadline        -> TransferTimeout

Every transfer must end in exactly one of: verified success, or an error of an allowed
class, within its deadline (plus the resume grace). A relay fault placed beyond the
end of a small transfer never fires; such a transfer counts as "none". The receiver checks every byte of
every layer it reports ready against the sender's deterministic data.

    python -m perf.soak --transfers 1000 --json                 # TCP
    python -m perf.soak --transfers 1000 --backend ucx --json   # UCX
    python -m perf.soak --backend both --json                   # {"tcp": ..., "ucx": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

FAULTS = ("none", "drop", "truncate", "flip", "stall", "delay", "kill_sender", "kill_receiver")
UCX_FAULTS = ("none", "drop", "truncate", "delay", "kill_sender", "kill_receiver", "freeze_sender")
FAULTS_BY_BACKEND = {"tcp": FAULTS, "ucx": UCX_FAULTS}
ALLOWED = {
    "none": {"ok"},
    "drop": {"ok"},
    "truncate": {"ok", "TransferTimeout", "PeerLostError"},  # ok: the cut fell after the last data byte
    "flip": {"ok", "IntegrityError", "ProtocolError", "PeerLostError"},
    "stall": {"TransferTimeout", "PeerLostError"},
    "delay": {"TransferTimeout"},
    "kill_sender": {"PeerLostError"},
    "kill_receiver": {"PeerLostError"},
    "freeze_sender": {"TransferTimeout"},
}
UCX_ALLOWED = {**ALLOWED, "truncate": {"ok", "TransferTimeout", "PeerLostError"}}
DEADLINE_S = 3.0
GRACE_S = 1.0  # receivers' resume grace in the soak
SECRET = b"soak"


def soak_layouts():
    """Three hybrid layouts (Kimi-like MLA, Qwen-like GQA, and one with fp8/int8 state)."""
    from kvwire import KVLayout, TensorSpec

    kimi = [{"conv": TensorSpec((96, 4), "float32"), "recurrent": TensorSpec((2, 32, 32), "float32")}] * 3
    kimi.append(
        {
            "latent": TensorSpec((1, 64), "bfloat16", per_token=True),
            "rope": TensorSpec((1, 16), "bfloat16", per_token=True),
        }
    )
    qwen = [{"conv": TensorSpec((64, 4), "bfloat16"), "recurrent": TensorSpec((4, 16, 16), "float32")}] * 3
    qwen.append(
        {"k": TensorSpec((2, 32), "bfloat16", per_token=True), "v": TensorSpec((2, 32), "bfloat16", per_token=True)}
    )
    odd = [
        {"s": TensorSpec((3, 5), "float8_e4m3fn")},
        {"k": TensorSpec((7,), "int8", per_token=True)},
        {"z": TensorSpec((), "float16")},
    ]
    return [KVLayout(kimi), KVLayout(qwen), KVLayout(odd)]


def kv_data(layout, request_id: str, num_tokens: int):
    """The request's KV, reproducible on both sides from its id."""
    from kvwire.testing.data import random_kv

    return random_kv(layout, num_tokens, request_id)


def process_stats() -> dict:
    kinds: dict = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":")[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return {"fds": sum(kinds.values()), "fd_kinds": kinds, "threads": threading.active_count(), "rss_mib": rss_kib / 1024}


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- receiver process ------------------------------------------------------------------------


def receiver_main(backend: str) -> None:
    from kvwire import KVWireError, Receiver

    layouts = soak_layouts()
    receivers = [Receiver(layout, secret=SECRET, resume_grace_s=GRACE_S, backend=backend) for layout in layouts]
    _reply({"addresses": [rx.address for rx in receivers]})

    def watch(index: int, request_id: str, num_tokens: int) -> None:
        rx = receivers[index]
        expected = kv_data(layouts[index], request_id, num_tokens)
        start = time.monotonic()
        try:
            got = rx.wait(request_id, timeout=DEADLINE_S + 5)
            for i, tensors in enumerate(expected):
                arrived = got.wait_layer(i, timeout=DEADLINE_S + 10)
                if any(arrived[k].tobytes() != tensors[k].tobytes() for k in tensors):
                    _reply({"id": request_id, "outcome": "corrupted_reported_ready", "s": time.monotonic() - start})
                    got.release()
                    return
            got.release()
            outcome = "ok"
        except KVWireError as exc:
            outcome = type(exc).__name__
        _reply({"id": request_id, "outcome": outcome, "s": time.monotonic() - start})

    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "watch":
            threading.Thread(
                target=watch, args=(command["layout"], command["id"], command["tokens"]), daemon=True
            ).start()
        elif command["op"] == "stats":
            _reply({"stats": process_stats(), "in_use": sum(rx.bytes_in_use for rx in receivers)})
        elif command["op"] == "quit":
            break
    for rx in receivers:
        rx.close()


# -- sender worker process -------------------------------------------------------------------


def sender_main(backend: str) -> None:
    from kvwire import KVWireError, Sender

    layouts = soak_layouts()
    _reply({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        layout = layouts[job["layout"]]
        start = time.monotonic()
        try:
            with Sender(
                layout,
                job["address"],
                backend=backend,
                secret=SECRET,
                streams=job["streams"],
                chunk_bytes=job["chunk_bytes"],
                timeout=5,
            ) as tx:
                xfer = tx.open(job["id"], job["tokens"], timeout=DEADLINE_S)
                for i, tensors in enumerate(kv_data(layout, job["id"], job["tokens"])):
                    if job["pace_s"]:
                        time.sleep(job["pace_s"])
                    xfer.send_layer(i, tensors)
                    if i == 0:
                        _reply({"id": job["id"], "sending": True})
                xfer.finish()
            outcome = "ok"
        except KVWireError as exc:
            outcome = type(exc).__name__
        _reply({"id": job["id"], "outcome": outcome, "s": time.monotonic() - start})


# -- driver --------------------------------------------------------------------------------


class Child:
    """A kvwire process we talk to with JSON lines (and may kill).

    Its stdout carries only our JSON lines; anything else a library prints there (UCX
    writes its log to stdout) is passed on to our stderr rather than breaking the reader.
    """

    def __init__(self, role: str, backend: str):
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perf.soak", "--role", role, "--backend", backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                sys.stderr.write(f"[soak child {self.proc.pid}] {line}")
                continue
            with self.cv:
                self.lines.append(message)
                self.cv.notify_all()
        with self.cv:
            self.lines.append({"eof": True})
            self.cv.notify_all()

    def send(self, obj) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except OSError:  # the child died; its missing replies count as hangs
            pass

    def wait_for(self, match, timeout: float):
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for item in self.lines:
                    if match(item):
                        self.lines.remove(item)
                        return item
                if any("eof" in item for item in self.lines) or time.monotonic() > deadline:
                    return None
                self.cv.wait(0.05)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def soak(num_transfers: int, seed: int, backend: str = "tcp") -> dict:
    """``num_transfers`` transfers over ``backend`` ("tcp" or "ucx"), one fault drawn per transfer."""
    from kvwire.testing.relay import Fault, FaultyRelay

    faults = FAULTS_BY_BACKEND[backend]
    allowed = UCX_ALLOWED if backend == "ucx" else ALLOWED
    rng = random.Random(seed)
    started = time.monotonic()
    receiver = Child("receiver", backend)
    addresses = receiver.wait_for(lambda m: "addresses" in m, 60)["addresses"]
    sender = Child("sender", backend)
    sender.wait_for(lambda m: "ready" in m, 60)
    counts = {fault: {} for fault in faults}
    hangs = corrupted = wrong = 0
    before = None
    for n in range(num_transfers):
        if n == min(20, num_transfers - 1):  # after warm-up: imports, first allocations, thread pools
            receiver.send({"op": "stats"})
            before = receiver.wait_for(lambda m: "stats" in m, 10)
        fault = "none" if n < 5 else rng.choice(faults)
        layout = rng.randrange(3)
        tokens = rng.choice([0, 1, 17, 500, 3000, 6000, 30000])
        # small chunks put many frames in flight; 1 MiB ones are checked while the next arrives
        chunk_bytes = 1 << 20 if tokens == 30000 else 16384
        request_id = f"soak-{seed}-{n}"
        victim = Child("receiver", backend) if fault == "kill_receiver" else None
        target = victim.wait_for(lambda m: "addresses" in m, 60)["addresses"][layout] if victim else addresses[layout]
        if backend == "tcp":
            relay_fault = {
                "drop": Fault(cut_at=rng.randrange(2000, 60000), connections=1),
                "truncate": Fault(cut_at=rng.randrange(2000, 60000)),
                "flip": Fault(flip_bit_at=rng.randrange(600, 80000)),
                "stall": Fault(stall_at=rng.randrange(2000, 40000)),
            }.get(fault, Fault())
        else:
            relay_fault = Fault()  # UCX: the relay carries the bootstrap/liveness socket; cuts come by time
        cut_after_s = rng.uniform(0.0, 0.3)
        relay = FaultyRelay(target, relay_fault)
        if not victim:
            receiver.send({"op": "watch", "layout": layout, "id": request_id, "tokens": tokens})
        timed = fault.startswith(("kill", "freeze")) or (backend == "ucx" and fault in ("drop", "truncate"))
        pace = 1.6 if fault == "delay" else 0.15 if timed else 0.0
        sender.send(
            {
                "layout": layout,
                "address": relay.address,
                "id": request_id,
                "tokens": tokens,
                "streams": rng.choice([1, 2, 3]),
                "chunk_bytes": chunk_bytes,
                "pace_s": pace,
            }
        )
        limit = DEADLINE_S + GRACE_S + 5
        def sending(m, rid=request_id):
            return m.get("id") == rid and "sending" in m

        def finished(m, rid=request_id):
            return m.get("id") == rid and "outcome" in m

        if fault == "kill_sender":
            if sender.wait_for(sending, limit):
                sender.kill()
            else:
                sender.kill()  # it never got going: a hang of its own, counted below via the receiver
            sender = Child("sender", backend)
            sender.wait_for(lambda m: "ready" in m, 60)
            outcome_line = receiver.wait_for(finished, limit)
        elif fault == "kill_receiver":
            if sender.wait_for(sending, limit):
                victim.kill()
            outcome_line = sender.wait_for(finished, limit)
        elif fault == "freeze_sender":
            stopped = sender.wait_for(sending, limit)
            if stopped:
                sender.signal(signal.SIGSTOP)
            outcome_line = receiver.wait_for(finished, limit)
            sender.signal(signal.SIGCONT)
            if sender.wait_for(finished, limit) is None:  # once thawed, the sender must give up too
                outcome_line = None
        else:
            if backend == "ucx" and fault in ("drop", "truncate") and sender.wait_for(sending, limit):
                time.sleep(cut_after_s)  # UCX's bytes bypass the relay: cut its liveness sockets by time
                relay.cut_now(1 if fault == "drop" else None)
            sender_line = sender.wait_for(finished, limit)
            outcome_line = receiver.wait_for(finished, limit)
            if sender_line is None:
                outcome_line = None
            elif outcome_line is not None and outcome_line["outcome"] == "ok" and sender_line["outcome"] != "ok":
                outcome_line = sender_line  # both must agree on success
        sender.wait_for(lambda m, rid=request_id: m.get("id") == rid, 0)  # drop a "sending" line left over
        relay.close()
        if victim:
            victim.kill()
        if fault in ("drop", "truncate", "flip", "stall") and not relay.fired.is_set():
            fault = "none"  # the transfer ended before the fault's byte offset (or cut): a clean run
        if outcome_line is None:
            hangs += 1
            outcome = "hang"
            print(f"soak {backend}: transfer {n} ({fault}) did not end within {limit} s", file=sys.stderr, flush=True)
        else:
            outcome = outcome_line["outcome"]
            corrupted += outcome == "corrupted_reported_ready"
            wrong += outcome not in allowed[fault] and outcome != "corrupted_reported_ready"
        counts[fault][outcome] = counts[fault].get(outcome, 0) + 1
    # connections of the last transfers close asynchronously: settle before measuring
    deadline, after = time.monotonic() + GRACE_S + 10, None
    while time.monotonic() < deadline:
        time.sleep(0.5)
        receiver.send({"op": "stats"})
        after = receiver.wait_for(lambda m: "stats" in m, 10)
        if after is None or (
            before
            and after["stats"]["threads"] <= before["stats"]["threads"]
            and after["stats"]["fds"] <= before["stats"]["fds"]
        ):
            break
    alive = receiver.proc.poll() is None and after is not None
    receiver.send({"op": "quit"})
    sender.kill()
    receiver.proc.wait(timeout=30)
    succeeded = sum(c.get("ok", 0) for c in counts.values())
    return {
        "backend": backend,
        "transfers": num_transfers,
        "seed": seed,
        "succeeded": succeeded,
        "failed_by_kind": {f: {k: v for k, v in c.items() if k != "ok"} for f, c in counts.items()},
        "outcomes_by_fault": counts,
        "hangs": hangs,
        "wrong_error_class": wrong,
        "corrupted_reported_ready": corrupted,
        # fewer fds or threads after than before (the baseline's connections closed since) is no leak
        "leaked_fds": max(0, after["stats"]["fds"] - before["stats"]["fds"]) if after and before else None,
        "leaked_threads": max(0, after["stats"]["threads"] - before["stats"]["threads"]) if after and before else None,
        "fd_change": after["stats"]["fds"] - before["stats"]["fds"] if after and before else None,
        "leaked_fd_kinds": {
            k: n - before["stats"]["fd_kinds"].get(k, 0)
            for k, n in after["stats"]["fd_kinds"].items()
            if n != before["stats"]["fd_kinds"].get(k, 0)
        }
        if after and before
        else None,
        "rss_growth_mib": round(after["stats"]["rss_mib"] - before["stats"]["rss_mib"], 1)
        if after and before
        else None,
        "receiver_bytes_in_use_after": after["in_use"] if after else None,
        "receiver_alive_after": alive,
        "seconds": round(time.monotonic() - started, 1),
    }


def passed(result: dict) -> bool:
    return (
        not (result["hangs"] or result["corrupted_reported_ready"] or result["wrong_error_class"])
        and result["receiver_alive_after"]
    )


def ucx_unavailable() -> str | None:
    try:
        from kvwire.transport.ucx import ucx_available
    except ImportError as exc:
        return str(exc)
    return None if ucx_available() else "ucxx is not importable (install kvwire[ucx])"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transfers", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backend", choices=["tcp", "ucx", "both"], default="tcp")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 40 transfers")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=["receiver", "sender"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "receiver":
        receiver_main(args.backend)
        return 0
    if args.role == "sender":
        sender_main(args.backend)
        return 0
    backends = ["tcp", "ucx"] if args.backend == "both" else [args.backend]
    if "ucx" in backends and ucx_unavailable():
        raise SystemExit(f"perf.soak --backend {args.backend}: {ucx_unavailable()}")
    results = {b: soak(40 if args.quick else args.transfers, args.seed, b) for b in backends}
    result = results if args.backend == "both" else results[args.backend]
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0 if all(passed(r) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
