#!/usr/bin/env bash
# Drives `stepbox serve` with Python grpcio stubs generated from proto/ (a client nobody here
# wrote), then validates the deployment files.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
# scripts/test.sh runs this right after `cargo test`, which has just built target/debug/stepbox (the
# binary the integration tests run) and says so with STEPBOX_BIN_BUILT=1: a `cargo build` here would
# recompile much of the tree with the non-test feature set (minutes on a fresh clone).
if [[ "${STEPBOX_BIN_BUILT:-}" != 1 ]]; then
  cargo build --quiet --bin stepbox
fi
STEPBOX_BIN="$PWD/target/debug/stepbox" PYTHONPATH="$STUBS" "$PY" executor/tests/grpc_client/test_grpc_client.py
STEPBOX_BIN="$PWD/target/debug/stepbox" PYTHONPATH="$STUBS" "$PY" executor/tests/grpc_client/test_handoff.py
STEPBOX_BIN="$PWD/target/debug/stepbox" "$PY" scripts/validate-deploy.py
