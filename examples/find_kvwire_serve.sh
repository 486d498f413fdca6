# Sourced by the two_node_*.sh examples: sets KVWIRE_SERVE, or stops with what to do.
if [ -z "${KVWIRE_SERVE:-}" ]; then
  if command -v kvwire-serve >/dev/null; then
    KVWIRE_SERVE=$(command -v kvwire-serve)
  else
    KVWIRE_SERVE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/kvwire-serve"
  fi
fi
if [ ! -x "$KVWIRE_SERVE" ]; then
  echo "kvwire-serve not found (not on PATH, not at $KVWIRE_SERVE): run README's install command," \
       "activate its venv (. .venv/bin/activate), or set KVWIRE_SERVE" >&2
  exit 1
fi
