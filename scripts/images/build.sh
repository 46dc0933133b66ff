#!/usr/bin/env bash
# Builds the images a node of the kubelet harness (tests/src/kubelet.rs) runs besides ferrea's
# own, as OCI image archives that `ctr -n k8s.io images import` reads, with no registry, no
# Docker engine and no network:
#
#   pause    registry.k8s.io/pause:3.10.2   the pod sandbox; Kubernetes' own pause.c from the
#                                           pinned k8s.io/kubernetes module, gcc -static
#   busybox  ferrea.test/busybox:1          the workload: Debian's busybox-static, its applets
#                                           linked under /bin, plus /etc/passwd and /etc/group,
#                                           and /bin/ferrea-test-dns (scripts/images/dns, a tiny
#                                           DNS responder in Go, stdlib only, CGO_ENABLED=0)
#
# ferrea's agent image is deploy/image/build.sh's (the harness runs it with --bin-dir target/debug).
#
#   scripts/images/build.sh [--out DIR] [pause] [busybox]   (default: both, into target/image)
#   scripts/images/build.sh --pause-binary                  build (or find) the pause binary only;
#                                                           print its path
#
# The pause binary is cached in ${FERREA_CACHE:-~/.cache/ferrea}/images/pause-<tag>; the archives
# are rebuilt on every run (a second or two) and are reproducible (sorted files, owner root,
# mtime 0).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
PAUSE_TAG=3.10.2
PAUSE_REF=registry.k8s.io/pause:$PAUSE_TAG
BUSYBOX_REF=ferrea.test/busybox:1
cache=${FERREA_CACHE:-$HOME/.cache/ferrea}/images
GO=${GO:-/usr/local/go/bin/go}
log() { echo "images/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

k8s_version=$(sed -n 's/^K8S_VERSION=//p' "$repo/scripts/k8s/build.sh")

pause_binary() {
  local bin=$cache/pause-$PAUSE_TAG src
  if [ -x "$bin" ]; then echo "$bin"; return; fi
  src=$(GOTOOLCHAIN=local GOFLAGS=-mod=mod "$GO" env GOMODCACHE)/k8s.io/kubernetes@$k8s_version/build/pause/linux/pause.c
  if [ ! -f "$src" ]; then
    (cd /tmp && GOTOOLCHAIN=local "$GO" mod download "k8s.io/kubernetes@$k8s_version") >&2 ||
      die "cannot download k8s.io/kubernetes@$k8s_version for pause.c"
  fi
  [ -f "$src" ] || die "no $src"
  command -v gcc >/dev/null || die "gcc is needed for the pause binary"
  mkdir -p "$cache"
  # As build/pause/Makefile does: -Os -Wall -Werror -static -DVERSION=v<tag>-<rev>.
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_TAG-$k8s_version" -o "$bin.tmp.$$" "$src" ||
    { rm -f "$bin.tmp.$$"; die "gcc failed on $src"; }
  mv -f "$bin.tmp.$$" "$bin"
  log "built $bin from $src"
  echo "$bin"
}

dns_binary() {
  local sum bin
  sum=$(cat "$repo/scripts/images/dns/main.go" "$repo/scripts/images/dns/go.mod" | sha256sum | cut -c1-16)
  bin=$cache/ferrea-test-dns-$sum
  if [ ! -x "$bin" ]; then
    mkdir -p "$cache"
    (cd "$repo/scripts/images/dns" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
      "$GO" build -trimpath -ldflags "-s -w" -o "$bin.tmp.$$" .) || { rm -f "$bin.tmp.$$"; die "building the DNS responder failed"; }
    mv -f "$bin.tmp.$$" "$bin"
    log "built $bin"
  fi
  echo "$bin"
}

# oci_archive <rootfs> <ref> <out> <entrypoint JSON array>: one layer, an OCI layout plus the
# manifest.json of `docker save`, as deploy/image/build.sh writes it.
oci_archive() {
  local root=$1 ref=$2 out=$3 entry=$4 work oci blobs diff_id layer layer_size config config_size
  local manifest manifest_size arch tag=${2##*:} name=${2%:*}
  case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
  work=$(mktemp -d)
  oci=$work/oci; blobs=$oci/blobs/sha256; mkdir -p "$blobs"
  local tarflags=(--sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)
  (cd "$root" && tar "${tarflags[@]}" -cf "$work/layer.tar" -- *)
  diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  gzip -n -6 < "$work/layer.tar" > "$work/layer.tar.gz"
  layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$work/layer.tar.gz")
  mv "$work/layer.tar.gz" "$blobs/$layer"
  jq -cn --arg arch "$arch" --arg diff "sha256:$diff_id" --argjson entry "$entry" '{
    architecture: $arch, os: "linux", created: "1970-01-01T00:00:00Z",
    config: {Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
             Entrypoint: $entry},
    rootfs: {type: "layers", diff_ids: [$diff]},
    history: [{created: "1970-01-01T00:00:00Z", created_by: "scripts/images/build.sh"}]
  }' > "$work/config.json"
  config_size=$(stat -c %s "$work/config.json")
  config=$(sha256sum "$work/config.json" | cut -d' ' -f1); mv "$work/config.json" "$blobs/$config"
  jq -cn --arg c "sha256:$config" --argjson cs "$config_size" --arg l "sha256:$layer" \
    --argjson ls "$layer_size" '{
    schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
    layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $l, size: $ls}]
  }' > "$work/manifest.json"
  manifest_size=$(stat -c %s "$work/manifest.json")
  manifest=$(sha256sum "$work/manifest.json" | cut -d' ' -f1); mv "$work/manifest.json" "$blobs/$manifest"
  jq -cn --arg m "sha256:$manifest" --argjson ms "$manifest_size" --arg arch "$arch" \
    --arg ref "$ref" --arg tag "$tag" '{
    schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
      platform: {architecture: $arch, os: "linux"},
      annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": $tag}}]
  }' > "$oci/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
  jq -cn --arg c "blobs/sha256/$config" --arg l "blobs/sha256/$layer" --arg t "$name:$tag" \
    '[{Config: $c, RepoTags: [$t], Layers: [$l]}]' > "$oci/manifest.json"
  mkdir -p "$(dirname "$out")"
  tar "${tarflags[@]}" -C "$oci" -cf "$out.tmp" oci-layout index.json manifest.json blobs
  mv -f "$out.tmp" "$out"
  rm -rf "$work"
  log "$out: $ref ($(du -h "$out" | cut -f1))"
}

out=$repo/target/image
want=()
while [ $# -gt 0 ]; do
  case $1 in
    --pause-binary) pause_binary; exit 0 ;;
    --out) out=$2; shift 2 ;;
    pause|busybox) want+=("$1"); shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ "${#want[@]}" -gt 0 ] || want=(pause busybox)
for t in jq tar gzip sha256sum; do command -v "$t" >/dev/null || die "$t is needed"; done

for w in "${want[@]}"; do
  root=$(mktemp -d)
  case $w in
    pause)
      install -D -m 0755 "$(pause_binary)" "$root/pause"
      oci_archive "$root" "$PAUSE_REF" "$out/pause.tar" '["/pause"]'
      ;;
    busybox)
      bb=/bin/busybox
      [ -x "$bb" ] || die "no $bb (Debian package busybox-static)"
      file -L "$bb" 2>/dev/null | grep -q 'statically linked' ||
        ldd "$bb" 2>&1 | grep -q 'not a dynamic' || die "$bb is not static (install busybox-static)"
      mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root,var/run}
      chmod 1777 "$root/tmp"
      install -m 0755 "$bb" "$root/bin/busybox"
      install -m 0755 "$(dns_binary)" "$root/bin/ferrea-test-dns"
      for a in $("$bb" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
      done
      printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
      printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
      oci_archive "$root" "$BUSYBOX_REF" "$out/busybox.tar" '["/bin/sh"]'
      ;;
  esac
  rm -rf "$root"
done
