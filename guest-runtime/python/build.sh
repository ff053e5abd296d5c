#!/usr/bin/env bash
# Builds the Python runtime component: CPython 3.14 pre-initialised by componentize-py with the
# runner in app/ and the world in wit/. Output: target/guest/python-runtime.wasm (+ license notice).
# Rebuilds only when the inputs changed. Needs python3 with venv/pip and access to PyPI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${STEPBOX_GUEST_DIR:-$root/target/guest}"
componentize_version="0.25.1"   # pinned: the runner relies on its bindings' names
mkdir -p "$out"

stamp_input="$componentize_version $(cat "$here/build.sh" "$here"/app/*.py "$here"/wit/*.wit "$here"/wit/deps/*/*.wit | sha256sum)"
if [[ -f "$out/python-runtime.wasm" && -f "$out/python-runtime.stamp" && "$(cat "$out/python-runtime.stamp")" == "$stamp_input" ]]; then
  echo "python runtime: up to date ($out/python-runtime.wasm)"
  exit 0
fi

venv="$out/venv"
if [[ ! -x "$venv/bin/componentize-py" ]] || ! "$venv/bin/pip" show componentize-py 2>/dev/null | grep -q "^Version: $componentize_version\$"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$componentize_version"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# componentize-py runs the app's top level (the stdlib import sweep) and snapshots the result.
(cd "$here" && "$venv/bin/componentize-py" -q -d wit -w runner componentize -p app stepbox_runner -o "$tmp/python-runtime.wasm")
mv "$tmp/python-runtime.wasm" "$out/python-runtime.wasm"
cp "$here/LICENSE-CPython.txt" "$out/python-runtime.LICENSE-CPython.txt"
echo "$stamp_input" > "$out/python-runtime.stamp"
echo "python runtime: built $out/python-runtime.wasm ($(du -h "$out/python-runtime.wasm" | cut -f1))"
