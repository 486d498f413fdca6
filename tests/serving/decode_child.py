"""A decode process for test_cross_process: receives KV over kvwire, rebuilds, decodes.

argv: secret, then checkpoint folders. Prints {"addresses": [...]} (one kvwire receiver
per model), then answers each stdin line {"model", "request_id", "first_token",
"max_tokens"} with {"tokens": [...]}, the first token included.
"""

import json
import sys

from serving.decode import DecodeOptions, DecodeWorker
from serving.model import load
from serving.steps import Sampling, decode


def main() -> None:
    secret, paths = sys.argv[1].encode(), sys.argv[2:]
    workers = [DecodeWorker(load(path), DecodeOptions(secret=secret)) for path in paths]
    print(json.dumps({"addresses": [w.kv_address for w in workers]}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        worker = workers[job["model"]]
        cache = worker.receive(job["request_id"], timeout_s=30)
        first = job["first_token"]
        tokens = [first, *decode(worker.loaded.model, cache, first, job["max_tokens"], Sampling(),
                                 worker.loaded.eos_token_ids)]
        print(json.dumps({"tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
