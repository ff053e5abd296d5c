# Sourced by the scripts that need Python packages: a venv in target/py-venv with pinned grpcio,
# grpcio-tools, health/reflection stubs and PyYAML, and the stepbox.v1 stubs generated from proto/
# into $STUBS (a temporary directory removed on exit).
venv=target/py-venv
grpc_version=1.85.1
pyyaml_version=6.0.3
if ! "$venv/bin/python" -c "import grpc, grpc_tools, grpc_health, grpc_reflection, yaml; assert grpc.__version__ == '$grpc_version'" >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "grpcio==$grpc_version" "grpcio-tools==$grpc_version" "grpcio-health-checking==$grpc_version" \
    "grpcio-reflection==$grpc_version" "PyYAML==$pyyaml_version"
fi
PY="$venv/bin/python"
STUBS="$(mktemp -d)"
trap 'rm -rf "$STUBS"' EXIT
"$PY" -m grpc_tools.protoc -I proto --python_out="$STUBS" --grpc_python_out="$STUBS" proto/stepbox/v1/*.proto
