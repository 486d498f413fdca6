#!/usr/bin/env bash
# Decode node of a two-host deployment: the KV port must be reachable from the prefill host.
#   DECODE_HOST=10.0.0.2 MODEL=/models/kimi-linear SECRET_FILE=secret.txt examples/two_node_decode.sh
set -euo pipefail
exec kvwire-serve decode --model "${MODEL:?}" --host 0.0.0.0 --port "${PORT:-8200}" \
  --kv-listen "0.0.0.0:${KV_PORT:-7800}" --kv-advertise "${DECODE_HOST:?}:${KV_PORT:-7800}" \
  --secret-file "${SECRET_FILE:?}"
