#!/usr/bin/env bash
# Builds ferrea's image, ferrea/agent:<version>, as an OCI image archive that
# `ctr -n k8s.io images import`, `podman load` and `docker load` read, with no registry and no
# network: the release binaries plus the programs the pod runs and their shared libraries,
# copied from this (Debian) machine. No base image: the one layer holds everything.
#
#   deploy/image/build.sh [--bin-dir DIR] [--out FILE] [--tag TAG] [--no-ovs]
#
#   --bin-dir DIR  where ferrea-agent and ferrea-cni are (default: target/release, built by
#                  `cargo build --release --bins`)
#   --out FILE     the archive (default: target/image/ferrea-agent-<version>.tar)
#   --tag TAG      the image's tag (default: the workspace version in Cargo.toml)
#   --no-ovs       leave Open vSwitch out (only the eBPF dataplane's DaemonSet then works)
#
# What is in the image, and why:
#   /usr/local/bin/ferrea-agent, ferrea-cni   the agent; the CNI binary the init container installs
#   /usr/sbin/nft                             the agent applies its nftables table with `nft -f -`
#   /usr/sbin/tc                              Egress bandwidth: the agent's HTB qdisc and classes
#   /bin/sh (dash), cp, mv, chmod, test, cat  the init container's install script and the probes
#   /opt/ferrea/cni/portmap, bandwidth        chained in the conflist; installed where a node has none
#   ovsdb-server, ovs-vswitchd, ovsdb-tool,   the OVS variant's containers (deploy/ovs/) and their
#   ovs-appctl, ovs-vsctl, ovs-ofctl and      probes; ovs-vsctl and ovs-ofctl for debugging
#   /usr/share/openvswitch/vswitch.ovsschema
# Every ELF file comes with the shared libraries `ldd` resolves for it, at the same paths.
#
# Tools used: bash, coreutils (sha256sum, stat), tar, gzip, jq, ldd (libc-bin). The archive is
# reproducible: files are sorted, owned by root and dated SOURCE_DATE_EPOCH (default: the last
# commit's time).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)
bin_dir=$repo/target/release
tag=$version
out=
ovs=1
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-ovs) ovs=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-$repo/target/image/ferrea-agent-$tag.tar}
name=ferrea/agent
for t in jq tar gzip sha256sum ldd; do
  command -v "$t" >/dev/null || { echo "build.sh: $t is needed" >&2; exit 1; }
done
for b in ferrea-agent ferrea-cni; do
  [ -x "$bin_dir/$b" ] || {
    echo "build.sh: $bin_dir/$b missing: run \`cargo build --release --bins\` (or pass --bin-dir)" >&2
    exit 1
  }
done
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}
case $(uname -m) in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,run,tmp,root,var/lib,usr/local/bin,usr/sbin,usr/bin,opt/ferrea/cni}
chmod 1777 "$root/tmp"
# As on Debian: /var/run is /run, so CNI_NETNS paths under /var/run/netns resolve to the
# /run/netns mount.
ln -s ../run "$root/var/run"

# copy <host file> <path in the image>, plus the shared libraries it needs.
copy() {
  install -D -m "$(stat -L -c %a "$1")" "$1" "$root$2"
  libs "$1"
}
libs() {
  local lib
  # "libx.so => /path (0x...)" and the loader's "/lib64/ld-linux-x86-64.so.2 (0x...)";
  # `ldd` fails on static binaries, which need nothing.
  for lib in $(ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    [ -e "$root$lib" ] || install -D -m 0755 "$lib" "$root$lib"
  done
}
need() { # the host path of a program the image must have
  local p
  p=$(type -P "$1" || true)
  [ -n "$p" ] || { echo "build.sh: $1 is not installed on this machine (Debian package: $2)" >&2; exit 1; }
  readlink -f "$p"
}

copy "$bin_dir/ferrea-agent" /usr/local/bin/ferrea-agent
copy "$bin_dir/ferrea-cni" /usr/local/bin/ferrea-cni
copy "$(need nft nftables)" /usr/sbin/nft
copy "$(need tc iproute2)" /usr/sbin/tc
copy "$(need dash dash)" /bin/sh
for c in cp mv chmod test cat; do copy "$(need $c coreutils)" "/bin/$c"; done
for p in portmap bandwidth; do
  for d in /usr/lib/cni /opt/cni/bin; do
    if [ -x "$d/$p" ]; then copy "$d/$p" "/opt/ferrea/cni/$p"; break; fi
  done
  [ -e "$root/opt/ferrea/cni/$p" ] ||
    echo "build.sh: no $p plugin here (containernetworking-plugins): nodes must have their own" >&2
done
if [ "$ovs" = 1 ]; then
  copy "$(need ovsdb-server openvswitch-switch)" /usr/sbin/ovsdb-server
  copy "$(need ovs-vswitchd openvswitch-switch)" /usr/sbin/ovs-vswitchd
  for c in ovsdb-tool ovs-appctl ovs-vsctl ovs-ofctl; do
    copy "$(need $c openvswitch-common)" "/usr/bin/$c"
  done
  install -D -m 0644 /usr/share/openvswitch/vswitch.ovsschema \
    "$root/usr/share/openvswitch/vswitch.ovsschema"
fi
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
for f in /etc/protocols /etc/services; do [ -e "$f" ] && install -m 0644 "$f" "$root$f"; done

# The OCI layout: oci-layout, index.json, blobs/sha256/{layer, config, manifest}, plus the
# manifest.json of `docker save` pointing at the same blobs.
oci=$work/oci
blobs=$oci/blobs/sha256
mkdir -p "$blobs"
tarflags=(--sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=posix
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)
(cd "$root" && tar "${tarflags[@]}" -cf "$work/layer.tar" -- *)
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 < "$work/layer.tar" > "$work/layer.tar.gz"
layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$blobs/$layer"

created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
blob() { # <file>: stores it as a blob, prints its digest
  local d
  d=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$blobs/$d"
  echo "$d"
}
jq -cn --arg arch "$arch" --arg created "$created" --arg diff "sha256:$diff_id" --arg v "$tag" '{
  architecture: $arch, os: "linux", created: $created,
  config: {
    Env: ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    Entrypoint: ["/usr/local/bin/ferrea-agent"],
    Cmd: ["--config", "/etc/ferrea/agent.yaml"],
    Labels: {"org.opencontainers.image.title": "ferrea-agent", "org.opencontainers.image.version": $v}
  },
  rootfs: {type: "layers", diff_ids: [$diff]},
  history: [{created: $created, created_by: "deploy/image/build.sh"}]
}' > "$work/config.json"
config_size=$(stat -c %s "$work/config.json")
config=$(blob "$work/config.json")
jq -cn --arg c "sha256:$config" --argjson cs "$config_size" --arg l "sha256:$layer" \
  --argjson ls "$layer_size" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
  layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $l, size: $ls}]
}' > "$work/manifest.json"
manifest_size=$(stat -c %s "$work/manifest.json")
manifest=$(blob "$work/manifest.json")
jq -cn --arg m "sha256:$manifest" --argjson ms "$manifest_size" --arg arch "$arch" \
  --arg ref "docker.io/$name:$tag" --arg tag "$tag" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
    platform: {architecture: $arch, os: "linux"},
    annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": $tag}}]
}' > "$oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
jq -cn --arg c "blobs/sha256/$config" --arg l "blobs/sha256/$layer" --arg t "$name:$tag" \
  '[{Config: $c, RepoTags: [$t], Layers: [$l]}]' > "$oci/manifest.json"

# Every blob is named by its digest, and every JSON document parses.
for f in "$blobs"/*; do
  [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$(basename "$f")" ] || { echo "build.sh: bad digest $f" >&2; exit 1; }
done
for f in "$oci/index.json" "$oci/manifest.json" "$oci/oci-layout" "$blobs/$manifest" "$blobs/$config"; do
  jq -e . "$f" >/dev/null
done

mkdir -p "$(dirname "$out")"
tar "${tarflags[@]}" -C "$oci" -cf "$out.tmp" oci-layout index.json manifest.json blobs
mv -f "$out.tmp" "$out"
echo "$out: $name:$tag ($arch, $(du -h "$out" | cut -f1), manifest sha256:$manifest)"
echo "import: ctr -n k8s.io images import $out   (or: podman load -i $out; docker load -i $out)"
