#!/usr/bin/env bash
# Runs ferrea's main job on an embedded default: two simulated nodes in network namespaces,
# the agent started as in production, pods created through the real CNI binary, traffic shown
# flowing (pod to pod, pod to node, pod to the outside through masquerade). Everything the
# demo creates is deleted when it ends, also on failure or Ctrl-C. Needs root.
# Usage: scripts/demo.sh [--dataplane ebpf|ovs] [--nodes N] [--pods N-per-node]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: the demo creates network namespaces: run it as root" >&2
  exit 1
fi
bash scripts/setup.sh
cargo build --workspace --bins --quiet
exec target/debug/ferrea-demo "$@"
