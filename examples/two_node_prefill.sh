#!/usr/bin/env bash
# Prefill node (and the router) of a two-host deployment.
#   DECODE_URL=http://10.0.0.2:8200 MODEL=/models/kimi-linear SECRET_FILE=secret.txt examples/two_node_prefill.sh
set -euo pipefail
kvwire-serve prefill --model "${MODEL:?}" --host 0.0.0.0 --port "${PORT:-8100}" --secret-file "${SECRET_FILE:?}" &
prefill=$!
trap 'kill $prefill' EXIT
kvwire-serve router --prefill "http://127.0.0.1:${PORT:-8100}" --decode "${DECODE_URL:?}" --port "${ROUTER_PORT:-8000}"
