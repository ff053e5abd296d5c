#!/usr/bin/env bash
# The test command: set up, check formatting and lints, run every test.
#
# A throwaway PostgreSQL server (scripts/postgres.sh) runs for the length of `cargo test`, so the
# PostgreSQL tests of the store and of the catalog's replicas run here and in CI (under CI they
# fail, rather than skip, without it). It is stopped and deleted on exit, whatever happened.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
already=${STEPBOX_TEST_POSTGRES_DIR:-}
eval "$(bash scripts/postgres.sh start)"
if [[ "$STEPBOX_TEST_POSTGRES_DIR" != "$already" ]]; then
    # Ours, not a cluster the caller started and start reused.
    trap 'bash scripts/postgres.sh stop "$STEPBOX_TEST_POSTGRES_DIR"' EXIT
fi
cargo test --workspace
STEPBOX_BIN_BUILT=1 scripts/grpc-client-test.sh
