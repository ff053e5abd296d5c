#!/usr/bin/env bash
# Soak test against a release build of `stepbox serve` (see scripts/soak.py for the options).
# Not part of every CI run: run it by hand, e.g. `scripts/soak.sh --clients 8 --minutes 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
cargo build --quiet --release --bin stepbox
PYTHONPATH="$STUBS" "$PY" scripts/soak.py --bin target/release/stepbox "$@"
