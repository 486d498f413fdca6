"""Runs the decode node and the prefill node as two separate processes on this machine.

    python examples/two_node_demo.py

Exits 0 only if every request's KV arrived byte-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "secret"
        secret.write_bytes(os.urandom(16).hex().encode())
        tokens = ["1024", "8192", "32768", "4096"]
        decode = subprocess.Popen(
            [sys.executable, str(HERE / "decode_node.py"), "--listen", "127.0.0.1:0",
             "--secret-file", str(secret), "--requests", str(len(tokens))],
            stdout=subprocess.PIPE, text=True,
        )
        address = json.loads(decode.stdout.readline())["listening"]
        print(f"decode node listening on {address}")
        prefill = subprocess.run(
            [sys.executable, str(HERE / "prefill_node.py"), "--decode", address,
             "--secret-file", str(secret), "--tokens", *tokens],
            stdout=subprocess.PIPE, text=True, timeout=300,
        )
        for line in prefill.stdout.splitlines():
            print("prefill:", line)
        out, _ = decode.communicate(timeout=60)
        for line in out.splitlines():
            print("decode: ", line)
        ok = prefill.returncode == 0 and decode.returncode == 0
        print("DEMO OK: every byte matched" if ok else "DEMO FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
