#!/usr/bin/env bash
# Prefill node (and the router) of a two-host deployment.
#   DECODE_URL=http://10.0.0.2:8200 MODEL=/models/kimi-linear SECRET_FILE=secret.txt examples/two_node_prefill.sh
# kvwire-serve is found on PATH, else in this checkout's .venv (README's install); KVWIRE_SERVE overrides.
set -euo pipefail
source "$(dirname "$0")/find_kvwire_serve.sh"
"$KVWIRE_SERVE" prefill --model "${MODEL:?set MODEL to a checkpoint folder}" --host 0.0.0.0 --port "${PORT:-8100}" \
  --secret-file "${SECRET_FILE:?set SECRET_FILE to a file both hosts share}" &
prefill=$!
trap 'kill $prefill' EXIT
"$KVWIRE_SERVE" router --prefill "http://127.0.0.1:${PORT:-8100}" --decode "${DECODE_URL:?set DECODE_URL to the decode node, e.g. http://10.0.0.2:8200}" \
  --port "${ROUTER_PORT:-8000}"
