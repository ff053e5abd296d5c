#!/usr/bin/env bash
# Installs what Stepbox needs on a fresh machine (idempotent): the wasm32-wasip1 Rust target,
# Python's venv module, and the Python runtime component (componentize-py from PyPI, pinned).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
fi
if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
  # Debian splits venv/ensurepip out of python3.
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >/dev/null
  fi
fi
guest-runtime/python/build.sh
