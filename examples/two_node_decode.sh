#!/usr/bin/env bash
# Decode node of a two-host deployment: the KV port must be reachable from the prefill host.
#   DECODE_HOST=10.0.0.2 MODEL=/models/kimi-linear SECRET_FILE=secret.txt examples/two_node_decode.sh
# kvwire-serve is found on PATH, else in this checkout's .venv (README's install); KVWIRE_SERVE overrides.
# No model yet? `kvwire-serve make-model /tmp/tiny-kimi` writes a tiny seeded one (use the same on both hosts).
set -euo pipefail
source "$(dirname "$0")/find_kvwire_serve.sh"
exec "$KVWIRE_SERVE" decode --model "${MODEL:?set MODEL to a checkpoint folder}" --host 0.0.0.0 --port "${PORT:-8200}" \
  --kv-listen "0.0.0.0:${KV_PORT:-7800}" --kv-advertise "${DECODE_HOST:?set DECODE_HOST to the address prefill hosts reach}:${KV_PORT:-7800}" \
  --secret-file "${SECRET_FILE:?set SECRET_FILE to a file both hosts share}"
