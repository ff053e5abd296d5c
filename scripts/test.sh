#!/usr/bin/env bash
# The test command: set up, check formatting and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --workspace
scripts/grpc-client-test.sh
