#!/usr/bin/env bash
# A bounded fuzzing run of every decoder of outside input: the fuzz/ targets (cargo-fuzz with
# libFuzzer), each for FERREA_FUZZ_SECONDS (default 45) from the committed corpus in
# fuzz/corpus/<target>. New inputs libFuzzer finds go to a scratch directory, so a run never
# changes the repository; a crash, hang or runaway allocation fails the run, with the input
# left in fuzz/artifacts/<target>/ and the command that replays it printed. Built with
# `--sanitizer none` (the decoders are safe Rust, and it needs no nightly toolchain) and
# `--dev` (quick to build; debug assertions catch integer overflow as well as panics).
# Targets run FERREA_FUZZ_JOBS at a time (default: one per core; libFuzzer uses one).
# Usage: scripts/fuzz.sh [TARGET...]   (scripts/setup.sh installs cargo-fuzz)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${FERREA_FUZZ_SECONDS:-45}
all=(cni_config cni_env cni_request manifests agent_config openflow ovsdb)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")

flags=(--sanitizer none --dev)
# The fuzz targets link the agent's library, whose build script compiles the eBPF programs
# (a release build of the ebpf crate). No target loads them, so the objects of the workspace's
# own debug build are taken when there are some (the test command has just built them).
if [ -z "${FERREA_BPF_OBJECT:-}" ]; then
  obj=$(ls -t ../target/debug/build/ferrea-agent-*/out/ferrea.bpf.o 2>/dev/null | head -n1 || true)
  if [ -n "$obj" ] && [ -f "${obj%/*}/ferrea-vlan.bpf.o" ]; then
    export FERREA_BPF_OBJECT=$PWD/$obj
    echo "fuzz: the eBPF objects of the debug build: ${obj%/*}" >&2
  fi
fi
# One build for all targets (they share every dependency).
cargo fuzz build "${flags[@]}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# libFuzzer runs on one core: FERREA_FUZZ_JOBS targets (default: one per core) at a time.
jobs=${FERREA_FUZZ_JOBS:-$(nproc)}
run_one() {
  local t=$1 log="$scratch/$1.log"
  if cargo fuzz run "${flags[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 >"$log" 2>&1; then
    runs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n1)
    echo "fuzz: $t: ${runs:-?} runs, ${cov:-cov: ?}, no failure" >&2
  else
    tail -n 40 "$log" >&2
    return 1
  fi
}
failed=()
declare -A running=()
# Waits for one running target and records it if it failed.
reap() {
  local pid rc=0
  wait -n -p pid "${!running[@]}" || rc=$?
  [ "$rc" = 0 ] || failed+=("${running[$pid]}")
  unset "running[$pid]"
}
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "artifacts/$t"
  while [ "${#running[@]}" -ge "$jobs" ]; do reap; done
  echo "fuzz: $t for ${secs}s" >&2
  run_one "$t" &
  running[$!]=$t
done
while [ "${#running[@]}" -gt 0 ]; do reap; done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}; the inputs are in fuzz/artifacts/<target>/; replay one with" >&2
  echo "  (cd fuzz && cargo fuzz run ${flags[*]} <target> artifacts/<target>/<file>)" >&2
  exit 1
fi
