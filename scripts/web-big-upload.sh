#!/usr/bin/env bash
# Measures what a too-large upload costs the web page's server: starts `stepbox serve --web` (no
# tenants, loopback, the default 64 MiB upload limit) on a scratch directory with the example
# validator published, sends a SIZE upload (default 2G, a sparse file) to the JSON endpoint with
# curl, and prints the answer, the time it took, the server's resident memory before and after
# (VmRSS, and its peak VmHWM), and what is left in the upload directory.
#   scripts/web-big-upload.sh [SIZE]        (needs curl and a debug build: cargo build)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
bin=$PWD/target/debug/stepbox
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
export XDG_DATA_HOME=$dir/data STEPBOX_WORK_ROOT=$dir/work HOME=$dir
export STEPBOX_PYTHON_COMPONENT=${STEPBOX_PYTHON_COMPONENT:-$PWD/target/guest/python-runtime.wasm}
export STEPBOX_CACHE_DIR=${STEPBOX_CACHE_DIR:-$PWD/target/test-cache}
unset STEPBOX_CONFIG STEPBOX_SERVER STEPBOX_TOKEN
"$bin" step publish examples/bulk-edit-validator/step.toml >/dev/null
"$bin" step promote bulk-edit-validator@v1 --to staging >/dev/null
"$bin" step promote bulk-edit-validator@v1 --to prod >/dev/null
"$bin" serve --addr 127.0.0.1:0 --web 127.0.0.1:0 >"$dir/out" 2>"$dir/err" &
pid=$!
for _ in $(seq 100); do grep -q "^web page on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
web=$(sed -n 's/^web page on //p' "$dir/out")
truncate -s "$size" "$dir/big.bin"
echo "before: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s ' ' | tr '\n' ' ')"
start=$(date +%s.%N)
curl -s -o "$dir/answer" -w "HTTP %{http_code}\n" -F "files=@$dir/big.bin" \
  "$web/api/v1/steps/bulk-edit-validator@prod:run"
end=$(date +%s.%N)
echo "answer: $(cat "$dir/answer")"
echo "took: $(echo "$end - $start" | bc) s for $size"
echo "after: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s ' ' | tr '\n' ' ')"
echo "left in the upload directory: $(find "$dir"/work/stepbox-web-*/uploads -mindepth 1 | wc -l) entries"
