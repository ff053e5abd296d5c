#!/usr/bin/env bash
# From a fresh checkout: set up, build, and run the example step (a bulk-edit CSV validator) under
# the embedded `default` policy. Its report lands in ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --quiet --bin stepbox
rm -rf out
set -x
target/debug/stepbox run --input examples/bulk_edit.csv --output-dir out examples/validate_bulk_edit.py -- /input /output
