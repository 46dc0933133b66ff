#!/usr/bin/env bash
# The whole test suite: unit tests and the privileged integration tests on simulated nodes
# (network namespaces this suite creates and deletes; the root namespace is never changed).
# Then a bounded fuzzing run of every decoder of outside input (scripts/fuzz.sh). Installs
# what it needs first (Debian packages, rustfmt, clippy, cargo-nextest, cargo-fuzz,
# bpf-linker), idempotently. Needs root. A test may skip only for lack of a kernel or machine feature, and
# only if tests/expected-skips.txt lists it: any other skip fails the suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the suite creates network namespaces and loads BPF programs: run it as root" >&2
  exit 1
fi
# Each phase's end is logged with the seconds since the start (cold-run budgets).
t0=$SECONDS
phase() { echo "test.sh: $1 done at $((SECONDS - t0)) s" >&2; }
bash scripts/setup.sh
phase setup

export FERREA_SKIP_LOG="$PWD/target/ferrea-skips.log"
mkdir -p target && : > "$FERREA_SKIP_LOG"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The kernel-side programs are a workspace of their own (built by agent/build.rs); they are
# checked for the host target, as agent/build.rs compiles them, in their own target dir.
cargo fmt --manifest-path ebpf/Cargo.toml -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path ebpf/Cargo.toml --locked -- -D warnings
phase "fmt and clippy"
# The integration tests run the real binaries (the agent, the CNI plugin, the demo).
cargo build --workspace --bins
phase build
status=0
cargo nextest run --workspace --no-fail-fast --test-threads 2 "$@" || status=$?
phase tests
# Every benchmark scaled down to seconds on the debug build, gated at half its goals
# (bench/src/quick.rs), then a bounded fuzzing run of every decoder of outside input
# (scripts/fuzz.sh). Both skipped when the run is narrowed to some tests (arguments given).
if [ "$#" -eq 0 ]; then
  target/debug/ferrea-bench --quick all || status=$?
  phase "quick benchmarks"
  bash scripts/fuzz.sh || status=$?
  phase fuzzing
fi

# Each skip line is `SKIP: <id>: <reason>`; tests/expected-skips.txt lists `<id> <feature>`.
allowlist=tests/expected-skips.txt
expected_ids=$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$allowlist" | awk '{print $1}')
unexpected=()
while IFS= read -r line; do
  [[ $line == SKIP:* ]] || continue
  rest=${line#SKIP: }
  id=${rest%%: *}
  grep -qxF -- "$id" <<<"$expected_ids" || unexpected+=("$line")
done < "$FERREA_SKIP_LOG"

skips=$(grep -c '^SKIP' "$FERREA_SKIP_LOG" || true)
echo
echo "ferrea: ${skips} test(s) skipped for lack of a kernel or machine feature:"
sed 's/^/  /' "$FERREA_SKIP_LOG"
if [ "${#unexpected[@]}" -gt 0 ]; then
  echo "ferrea: FAILED: ${#unexpected[@]} skip(s) not in $allowlist (a test skipped that must run here):"
  for line in "${unexpected[@]}"; do
    rest=${line#SKIP: }
    echo "  test ${rest%%: *}: skipped because: ${rest#*: }"
  done
  [ "$status" != 0 ] || status=1
fi
exit "$status"
