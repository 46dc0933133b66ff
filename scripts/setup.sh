#!/usr/bin/env bash
# Installs what ferrea's build, demo and tests need on a Debian machine, idempotently:
# Debian packages (iproute2, nftables, OVS, iperf3, tcpdump, reference CNI plugins, openssl,
# podman deps, prometheus: the metrics tests run a real server in a node's namespace;
# containerd, runc, busybox-static and gcc for the kubelet harness's nodes and images), the
# Kubernetes binaries the suite runs (kube-apiserver, kubectl, etcd, kube-proxy, kubelet,
# kube-controller-manager, kube-scheduler) and the pause binary of the pod sandbox image, the
# toolchain's rustfmt and clippy components, cargo-nextest (the suite's test runner),
# cargo-fuzz (the bounded fuzzing run; g++ builds its libFuzzer), and bpf-linker built
# against the stable toolchain's own libLLVM: rustc emits LLVM bitcode for the eBPF crate and
# only a linker built on the same LLVM major version can read it, which needs no nightly
# toolchain and no rust-src.
set -euo pipefail

PKGS=(iproute2 nftables iptables iperf3 tcpdump ethtool openvswitch-switch
      containernetworking-plugins procps psmisc jq iputils-ping netcat-openbsd openssl
      prometheus containerd runc busybox-static gcc g++ libc6-dev)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Do not let the packages' init scripts start daemons (OVS, prometheus) in the root
  # namespace: the tests start their own, inside the namespaces they build.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# rustfmt and clippy, for `cargo fmt --check` and `cargo clippy` in scripts/test.sh.
installed_components=$(rustup component list --installed)
for c in rustfmt clippy; do
  if ! grep -q "^$c" <<<"$installed_components"; then
    echo "setup: adding the rustup component $c" >&2
    rustup component add "$c" >&2
  fi
done

# cargo-nextest, the runner scripts/test.sh uses (one process per test).
NEXTEST_VERSION=0.9.151
if ! cargo nextest --version 2>/dev/null | grep -q "^cargo-nextest $NEXTEST_VERSION "; then
  echo "setup: installing cargo-nextest $NEXTEST_VERSION (a few minutes, once)" >&2
  cargo install cargo-nextest --locked --version "$NEXTEST_VERSION" >&2
fi

# cargo-fuzz, for the bounded fuzzing run of scripts/fuzz.sh (libFuzzer is built from source
# by the libfuzzer-sys crate, with g++).
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "setup: installing cargo-fuzz $CARGO_FUZZ_VERSION (a minute, once)" >&2
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" >&2
fi

# bpf-linker, linked against rustc's own LLVM so it reads the bitcode that rustc emits.
BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  sysroot=$(rustc --print sysroot)
  lib=$(ls "$sysroot"/lib/libLLVM.so.*-rust-* 2>/dev/null | head -n1)
  [ -n "$lib" ] || { echo "setup: no libLLVM in $sysroot/lib" >&2; exit 1; }
  major=$(basename "$lib" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/')
  prefix=${FERREA_LLVM_PREFIX:-$HOME/.cache/ferrea/llvm-prefix}
  mkdir -p "$prefix/lib"
  ln -sf "$lib" "$prefix/lib/libLLVM.so"
  echo "setup: building bpf-linker $BPF_LINKER_VERSION against $lib (a few minutes, once)" >&2
  # rpath so the binary finds rustc's libLLVM at run time without LD_LIBRARY_PATH.
  LLVM_PREFIX="$prefix" RUSTFLAGS="-C link-arg=-Wl,-rpath,$sysroot/lib" \
    cargo install --force "bpf-linker@$BPF_LINKER_VERSION" --locked \
    --no-default-features --features "llvm-$major" >&2
fi
# kube-apiserver, kubectl, etcd and kube-proxy, built from their Go modules at the pinned
# release into ${FERREA_CACHE:-~/.cache/ferrea}/k8s/ (tests/tests/kubernetes.rs runs them,
# tests/tests/services.rs runs kube-proxy beside ferrea; the harness makes its certificates
# with openssl). A cold build takes about 12-15 minutes, once (kube-proxy a few more); after
# that the binaries are cached and this step takes a fraction of a second.
bash "$(dirname "$0")/k8s/build.sh" kube-apiserver kubectl etcd kube-proxy >/dev/null
# kubelet, kube-controller-manager and kube-scheduler for tests/tests/kubelet.rs (real nodes:
# tests/src/kubelet.rs); a cold build adds about 10 minutes, cached afterwards.
bash "$(dirname "$0")/k8s/build.sh" kubelet kube-controller-manager kube-scheduler >/dev/null
# The pause binary (Kubernetes' build/pause/linux/pause.c, gcc -static), cached; the harness
# packs it into the pod sandbox image with scripts/images/build.sh.
bash "$(dirname "$0")/images/build.sh" --pause-binary >/dev/null

echo "setup: ok" >&2
