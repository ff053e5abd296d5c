#!/usr/bin/env bash
# Drives `stepbox serve` with Python grpcio stubs generated from proto/ (a client nobody here
# wrote), then validates the deployment files.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
cargo build --quiet --bin stepbox
STEPBOX_BIN="$PWD/target/debug/stepbox" PYTHONPATH="$STUBS" "$PY" executor/tests/grpc_client/test_grpc_client.py
STEPBOX_BIN="$PWD/target/debug/stepbox" PYTHONPATH="$STUBS" "$PY" executor/tests/grpc_client/test_handoff.py
STEPBOX_BIN="$PWD/target/debug/stepbox" "$PY" scripts/validate-deploy.py
