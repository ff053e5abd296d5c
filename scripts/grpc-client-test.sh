#!/usr/bin/env bash
# Drives `stepbox serve` with Python grpcio stubs generated from proto/ (a client nobody here
# wrote). Installs pinned grpcio packages into target/grpc-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/grpc-venv
version=1.85.1
if ! "$venv/bin/python" -c "import grpc, grpc_tools, grpc_health, grpc_reflection; assert grpc.__version__ == '$version'" >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "grpcio==$version" "grpcio-tools==$version" "grpcio-health-checking==$version" "grpcio-reflection==$version"
fi
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
"$venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$gen" --grpc_python_out="$gen" proto/stepbox/v1/executor.proto
cargo build --quiet --bin stepbox
STEPBOX_BIN="$PWD/target/debug/stepbox" PYTHONPATH="$gen" "$venv/bin/python" executor/tests/grpc_client/test_grpc_client.py
