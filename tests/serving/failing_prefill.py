"""A prefill worker whose forward fails as an out-of-memory one does for prompts over a
length (a fault injected on purpose). Used as launch.start's wrapper:
``python failing_prefill.py LIMIT python -m serving prefill ARGS``."""

import sys

import serving.prefill
from serving.cli import main

LIMIT = int(sys.argv[1])
real = serving.prefill.prefill_reusing


def failing(model, token_ids, *args, **kwargs):
    if len(token_ids) > LIMIT:
        raise RuntimeError(f"DefaultCPUAllocator: not enough memory: you tried to allocate {len(token_ids) ** 2 * 8} bytes.")
    return real(model, token_ids, *args, **kwargs)


serving.prefill.prefill_reusing = failing
sys.exit(main(sys.argv[sys.argv.index("serving") + 1:]))
