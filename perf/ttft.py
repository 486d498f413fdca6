"""TTFT of the serving workers: layer-wise sending vs send-after-prefill (see serving/ttft_bench.py).

    python -m perf.ttft --json --lengths 1024,4096
"""

from serving.ttft_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
