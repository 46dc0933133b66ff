#!/usr/bin/env bash
# The whole test suite: unit tests and the privileged integration tests on simulated nodes
# (network namespaces this suite creates and deletes; the root namespace is never changed).
# Installs what it needs first (Debian packages, bpf-linker), idempotently. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the suite creates network namespaces and loads BPF programs: run it as root" >&2
  exit 1
fi
bash scripts/setup.sh

export FERREA_SKIP_LOG="$PWD/target/ferrea-skips.log"
mkdir -p target && : > "$FERREA_SKIP_LOG"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests run the real binaries (the agent, the CNI plugin, the demo).
cargo build --workspace --bins
status=0
cargo nextest run --workspace --no-fail-fast --test-threads 2 "$@" || status=$?

skips=$(grep -c '^SKIP' "$FERREA_SKIP_LOG" || true)
echo
echo "ferrea: ${skips} test(s) skipped for lack of a kernel or machine feature:"
sed 's/^/  /' "$FERREA_SKIP_LOG"
exit "$status"
