"""Fault-injection soak: many transfers between separate processes while faults are injected.

Processes: one long-lived receiver process (measured for leaks), one sender worker
process (killed and restarted for the kill_sender fault), and a victim receiver process
for kill_receiver. Between each sender and receiver sits a FaultyRelay in this process.
Per transfer one fault is drawn:

  none          clean link                                  -> verified success
  drop          one connection cut mid-transfer             -> success (resumed)
  truncate      every connection cut mid-frame              -> PeerLostError/TransferTimeout
  flip          one bit flipped in the stream               -> success or IntegrityError/ProtocolError
  stall         link stops forwarding                       -> TransferTimeout
  delay         sender slower than the request deadline     -> TransferTimeout
  kill_sender   sender process SIGKILLed mid-transfer       -> PeerLostError
  kill_receiver receiver process SIGKILLed mid-transfer     -> PeerLostError (at the sender)

Every transfer must end in exactly one of: verified success, or an error of an allowed
class, within its deadline (plus the resume grace). A relay fault placed beyond the
end of a small transfer never fires; such a transfer counts as "none". The receiver checks every byte of
every layer it reports ready against the sender's deterministic data.

    python -m perf.soak --transfers 1000 --json
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
ALLOWED = {
    "none": {"ok"},
    "drop": {"ok"},
    "truncate": {"ok", "TransferTimeout", "PeerLostError"},  # ok: the cut fell after the last data byte
    "flip": {"ok", "IntegrityError", "ProtocolError", "PeerLostError"},
    "stall": {"TransferTimeout", "PeerLostError"},
    "delay": {"TransferTimeout"},
    "kill_sender": {"PeerLostError"},
    "kill_receiver": {"PeerLostError"},
}
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
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return {"fds": fds, "threads": threading.active_count(), "rss_mib": rss_kib / 1024}


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- receiver process ------------------------------------------------------------------------


def receiver_main() -> None:
    from kvwire import KVWireError, Receiver

    layouts = soak_layouts()
    receivers = [Receiver(layout, secret=SECRET, resume_grace_s=GRACE_S) for layout in layouts]
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


def sender_main() -> None:
    from kvwire import KVWireError, Sender

    layouts = soak_layouts()
    _reply({"ready": True})
    for line in sys.stdin:
        job = json.loads(line)
        layout = layouts[job["layout"]]
        start = time.monotonic()
        try:
            with Sender(
                layout, job["address"], secret=SECRET, streams=job["streams"], chunk_bytes=16384, timeout=5
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
    """A kvwire process we talk to with JSON lines (and may kill)."""

    def __init__(self, role: str):
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perf.soak", "--role", role],
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
            with self.cv:
                self.lines.append(json.loads(line))
                self.cv.notify_all()
        with self.cv:
            self.lines.append({"eof": True})
            self.cv.notify_all()

    def send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

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

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def soak(num_transfers: int, seed: int) -> dict:
    from kvwire.testing.relay import Fault, FaultyRelay

    rng = random.Random(seed)
    receiver = Child("receiver")
    addresses = receiver.wait_for(lambda m: "addresses" in m, 60)["addresses"]
    sender = Child("sender")
    sender.wait_for(lambda m: "ready" in m, 60)
    counts = {fault: {} for fault in FAULTS}
    hangs = corrupted = wrong = 0
    receiver.send({"op": "stats"})
    before = None
    for n in range(num_transfers):
        if n == min(20, num_transfers - 1):  # after warm-up: imports, first allocations, thread pools
            receiver.send({"op": "stats"})
            before = receiver.wait_for(lambda m: "stats" in m and m is not None, 10)
        fault = "none" if n < 5 else rng.choice(FAULTS)
        layout = rng.randrange(3)
        tokens = rng.choice([0, 1, 17, 500, 3000, 6000])
        request_id = f"soak-{seed}-{n}"
        victim = Child("receiver") if fault == "kill_receiver" else None
        target = victim.wait_for(lambda m: "addresses" in m, 60)["addresses"][layout] if victim else addresses[layout]
        relay_fault = {
            "drop": Fault(cut_at=rng.randrange(2000, 60000), connections=1),
            "truncate": Fault(cut_at=rng.randrange(2000, 60000)),
            "flip": Fault(flip_bit_at=rng.randrange(600, 80000)),
            "stall": Fault(stall_at=rng.randrange(2000, 40000)),
        }.get(fault, Fault())
        relay = FaultyRelay(target, relay_fault)
        if not victim:
            receiver.send({"op": "watch", "layout": layout, "id": request_id, "tokens": tokens})
        pace = 1.6 if fault == "delay" else 0.15 if fault.startswith("kill") else 0.0
        sender.send(
            {
                "layout": layout,
                "address": relay.address,
                "id": request_id,
                "tokens": tokens,
                "streams": rng.choice([1, 2, 3]),
                "pace_s": pace,
            }
        )
        limit = DEADLINE_S + GRACE_S + 5
        if fault == "kill_sender":
            if sender.wait_for(lambda m: m.get("id") == request_id and "sending" in m, limit):
                sender.kill()
            sender = Child("sender")
            sender.wait_for(lambda m: "ready" in m, 60)
            outcome_line = receiver.wait_for(lambda m: m.get("id") == request_id and "outcome" in m, limit)
        elif fault == "kill_receiver":
            if sender.wait_for(lambda m: m.get("id") == request_id and "sending" in m, limit):
                victim.kill()
            outcome_line = sender.wait_for(lambda m: m.get("id") == request_id and "outcome" in m, limit)
        else:
            sender_line = sender.wait_for(lambda m: m.get("id") == request_id and "outcome" in m, limit)
            outcome_line = receiver.wait_for(lambda m: m.get("id") == request_id and "outcome" in m, limit)
            if sender_line is None:
                outcome_line = None
            elif outcome_line is not None and outcome_line["outcome"] == "ok" and sender_line["outcome"] != "ok":
                outcome_line = sender_line  # both must agree on success
            sender.wait_for(lambda m: m.get("id") == request_id, 0)  # drop the "sending" line
        relay.close()
        if victim:
            victim.kill()
        if fault in ("drop", "truncate", "flip", "stall") and not relay.fired.is_set():
            fault = "none"  # the transfer ended before the fault's byte offset: a clean run
        if outcome_line is None:
            hangs += 1
            outcome = "hang"
        else:
            outcome = outcome_line["outcome"]
            corrupted += outcome == "corrupted_reported_ready"
            wrong += outcome not in ALLOWED[fault] and outcome != "corrupted_reported_ready"
        counts[fault][outcome] = counts[fault].get(outcome, 0) + 1
    # connections of the last transfers close asynchronously: settle before measuring
    deadline, after = time.monotonic() + GRACE_S + 10, None
    while time.monotonic() < deadline:
        time.sleep(0.5)
        receiver.send({"op": "stats"})
        after = receiver.wait_for(lambda m: "stats" in m, 10)
        if after is None or (before and after["stats"]["threads"] <= before["stats"]["threads"] and after["stats"]["fds"] <= before["stats"]["fds"]):
            break
    alive = receiver.proc.poll() is None and after is not None
    receiver.send({"op": "quit"})
    sender.kill()
    receiver.proc.wait(timeout=30)
    succeeded = sum(c.get("ok", 0) for c in counts.values())
    return {
        "transfers": num_transfers,
        "succeeded": succeeded,
        "failed_by_kind": {f: {k: v for k, v in c.items() if k != "ok"} for f, c in counts.items()},
        "outcomes_by_fault": counts,
        "hangs": hangs,
        "wrong_error_class": wrong,
        "corrupted_reported_ready": corrupted,
        "leaked_fds": after["stats"]["fds"] - before["stats"]["fds"] if after and before else None,
        "leaked_threads": after["stats"]["threads"] - before["stats"]["threads"] if after and before else None,
        "rss_growth_mib": round(after["stats"]["rss_mib"] - before["stats"]["rss_mib"], 1)
        if after and before
        else None,
        "receiver_bytes_in_use_after": after["in_use"] if after else None,
        "receiver_alive_after": alive,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transfers", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 40 transfers")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=["receiver", "sender"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "receiver":
        receiver_main()
        return 0
    if args.role == "sender":
        sender_main()
        return 0
    result = soak(40 if args.quick else args.transfers, args.seed)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    ok = (
        not (result["hangs"] or result["corrupted_reported_ready"] or result["wrong_error_class"])
        and result["receiver_alive_after"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
