#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 60 s each) and prints executions and findings.
# Not part of CI. Needs cargo-fuzz (`cargo install cargo-fuzz`); this machine's stable toolchain is
# used with RUSTC_BOOTSTRAP=1 and no sanitizer (libFuzzer's coverage only).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in request_validation policy_parsing conversation_import config_parsing; do
  mkdir -p "corpus/$target" artifacts
  echo "== $target (${seconds}s)"
  cargo fuzz run --sanitizer none --release "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=4096 2>&1 \
    | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|SUMMARY|ERROR|panicked|deadly signal" | tail -3
done
echo "findings: $(find artifacts -type f | wc -l)"
find artifacts -type f | sed 's/^/finding: /'
