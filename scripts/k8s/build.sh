#!/usr/bin/env bash
# Builds Kubernetes' own binaries (and etcd) from their Go modules at ONE pinned release, with the
# local Go toolchain, into a cache, so tests can run a real kube-apiserver, kubelet, kube-proxy,
# controller-manager, scheduler and kubectl as peers. Idempotent: a binary already built for the
# pinned version is skipped, so a warm run does nothing and needs no network.
#
# Usage: scripts/k8s/build.sh [BINARY...]     build these (default: all of them)
#        scripts/k8s/build.sh --bin-dir       print the bin directory, build nothing
# Binaries: kube-apiserver kubectl kube-controller-manager kube-scheduler kube-proxy kubelet etcd etcdctl
# Prints the bin directory on stdout when done; progress and timings go to stderr.
# Environment: FERREA_CACHE (default ~/.cache/ferrea), GO (default /usr/local/go/bin/go).
# Layout: $FERREA_CACHE/k8s/$K8S_VERSION/{bin/,src/,etcd-$ETCD_VERSION-src/,versions}
# The Go module and build caches are Go's own (GOMODCACHE, GOCACHE), shared with other Go work.
# See docs/kubernetes-binaries.md.
set -euo pipefail

# --- Pinned versions --------------------------------------------------------------------------
# Kubernetes v1.37.2: the newest stable release on the module proxy (v1.38 is at beta). Its
# go.mod says `go 1.26.0` with no toolchain line, so the local Go 1.26 builds it with
# GOTOOLCHAIN=local. Its staging modules (k8s.io/api, client-go, ...) are the same release's
# v0.37.2.
K8S_VERSION=v1.37.2
# etcd v3.7.3: Kubernetes 1.37 is tested against etcd 3.7.0 (build/dependencies.yaml, kubeadm's
# DefaultEtcdVersion) and vendors the 3.7 client; 3.7.3 is that line's newest patch. Debian's
# etcd-server (3.4.23) is too old for kube-apiserver >= 1.31 (it needs 3.4.29+/3.5.11+), so etcd
# is built from go.etcd.io/etcd/server/v3, whose main package is the etcd binary (its go.mod also
# says `go 1.26.0`; its `toolchain` line only applies when it is the main module, which it is not).
ETCD_VERSION=v3.7.3
# Bump when the way the binaries are built changes, so cached ones are rebuilt.
RECIPE=1

ALL_BINARIES=(kube-apiserver kubectl kube-controller-manager kube-scheduler kube-proxy kubelet etcd etcdctl)

GO=${GO:-/usr/local/go/bin/go}
CACHE_ROOT=${FERREA_CACHE:-$HOME/.cache/ferrea}
K8S_DIR=$CACHE_ROOT/k8s/$K8S_VERSION
BIN_DIR=$K8S_DIR/bin
K8S_SRC=$K8S_DIR/src
ETCD_SRC=$K8S_DIR/etcd-$ETCD_VERSION-src

export GOTOOLCHAIN=local
export GOFLAGS=-buildvcs=false
# Static binaries, as upstream builds its server binaries; one setting for all of them also lets
# every binary reuse the packages compiled for the first one (cgo would change `net` and so
# nearly every package's build key). The kubelet runs fine without cgo.
export CGO_ENABLED=0
# Upstream's release tags (hack/lib/golang.sh): selinux, notest, and grpcnotrace for non-debug.
TAGS=selinux,notest,grpcnotrace

log() { echo "k8s/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --bin-dir) echo "$BIN_DIR"; exit 0 ;;
esac

wanted=()
if [ "$#" -eq 0 ]; then
  wanted=("${ALL_BINARIES[@]}")
else
  for b in "$@"; do
    ok=
    for a in "${ALL_BINARIES[@]}"; do [ "$a" = "$b" ] && ok=1; done
    [ -n "$ok" ] || { usage; die "unknown binary '$b' (known: ${ALL_BINARIES[*]})"; }
    wanted+=("$b")
  done
fi

[ -x "$GO" ] || die "no Go toolchain at $GO (set GO=...)"
go_version=$("$GO" env GOVERSION)

version_of() { case "$1" in etcd|etcdctl) echo "$ETCD_VERSION" ;; *) echo "$K8S_VERSION" ;; esac; }
# What a cached binary must have been built as to be reused.
stamp_key() { echo "$1 $(version_of "$1") recipe=$RECIPE tags=$TAGS cgo=$CGO_ENABLED"; }
stamp_file() { echo "$BIN_DIR/.stamp-$1"; }
is_cached() {
  [ -x "$BIN_DIR/$1" ] && [ -f "$(stamp_file "$1")" ] &&
    [ "$(head -n1 "$(stamp_file "$1")")" = "$(stamp_key "$1")" ]
}

mkdir -p "$BIN_DIR"
# One build at a time per version: a second caller waits, then finds the binaries cached.
exec 9>"$K8S_DIR/.lock"
flock 9

todo=()
for b in "${wanted[@]}"; do
  if is_cached "$b"; then log "$b $(version_of "$b"): cached"; else todo+=("$b"); fi
done

write_versions() {
  {
    echo "# written by scripts/k8s/build.sh"
    echo "K8S_VERSION=$K8S_VERSION"
    echo "ETCD_VERSION=$ETCD_VERSION"
    echo "RECIPE=$RECIPE"
    echo "GO_VERSION=$go_version"
    for a in "${ALL_BINARIES[@]}"; do
      if is_cached "$a"; then echo "BUILT_${a//-/_}=$(sed -n 2p "$(stamp_file "$a")")"; fi
    done
  } > "$K8S_DIR/versions.tmp"
  mv "$K8S_DIR/versions.tmp" "$K8S_DIR/versions"
}

if [ "${#todo[@]}" -eq 0 ]; then
  write_versions
  echo "$BIN_DIR"
  exit 0
fi

# Writes $1/go.mod from stdin unless it is already what was generated last time (and tidied).
# $2... are the tool packages that `go mod tidy` must resolve.
setup_module() {
  local dir=$1 gen
  gen=$(cat)
  mkdir -p "$dir"
  if [ -f "$dir/go.mod.gen" ] && [ -f "$dir/go.sum" ] && [ "$(cat "$dir/go.mod.gen")" = "$gen" ]; then
    return 0
  fi
  log "generating the wrapper module in $dir"
  printf '%s\n' "$gen" > "$dir/go.mod"
  # `go mod tidy` resolves the `tool` packages and writes every go.sum line they need.
  if ! (cd "$dir" && nice -n 19 "$GO" mod tidy) > "$dir/tidy.log" 2>&1; then
    tail -n 30 "$dir/tidy.log" >&2
    die "go mod tidy failed in $dir (log: $dir/tidy.log)"
  fi
  log "go mod tidy: $(grep -c '^go: downloading' "$dir/tidy.log" || true) modules downloaded (log: $dir/tidy.log)"
  printf '%s\n' "$gen" > "$dir/go.mod.gen"
}

# Reads one field of `go mod download -json` output.
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

need_k8s='' need_etcd=''
for b in "${todo[@]}"; do
  case "$b" in etcd|etcdctl) need_etcd=1 ;; *) need_k8s=1 ;; esac
done

if [ -n "$need_k8s" ]; then
  t=$(now)
  # The staging modules come from k8s.io/kubernetes' own go.mod: every k8s.io/* module it requires
  # at v0.0.0 (or replaces with ./staging/src/...), each replaced by the release's v0.Y.Z.
  k8s_json=$(cd /tmp && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION") ||
    die "cannot download k8s.io/kubernetes@$K8S_VERSION"
  k8s_gomod=$(json_field GoMod <<<"$k8s_json")
  k8s_time=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["Time"])' \
    "$(json_field Info <<<"$k8s_json")")
  staging_version=v0.${K8S_VERSION#v1.}
  mapfile -t staging < <(awk '
      { sub(/\/\/.*/, "") }
      /^\)/ { block = ""; next }
      /^(require|replace)[ \t]*\(/ { block = $1; next }
      { kind = block }
      block == "" && ($1 == "require" || $1 == "replace") { kind = $1; $1 = ""; $0 = $0 }
      kind == "require" && $1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }
      kind == "replace" && $1 ~ /^k8s\.io\// && $2 == "=>" && $3 ~ /^\.\/staging\/src\// { print $1 }
    ' "$k8s_gomod" | sort -u)
  [ "${#staging[@]}" -ge 20 ] || die "found only ${#staging[@]} staging modules in $k8s_gomod"
  log "k8s.io/kubernetes@$K8S_VERSION: ${#staging[@]} staging modules at $staging_version"
  {
    echo "// Generated by ferrea's scripts/k8s/build.sh: builds k8s.io/kubernetes $K8S_VERSION."
    echo "module ferrea.invalid/k8s-binaries"
    echo
    grep -E '^(go|godebug) ' "$k8s_gomod"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    for b in "${ALL_BINARIES[@]}"; do
      case "$b" in etcd|etcdctl) ;; *) echo "tool k8s.io/kubernetes/cmd/$b" ;; esac
    done
    echo
    echo "replace ("
    for m in "${staging[@]}"; do echo "	$m => $m $staging_version"; done
    echo ")"
  } | setup_module "$K8S_SRC"
  # The version stamps that hack/lib/version.sh sets for a release build.
  k8s_minor=${K8S_VERSION#v1.}; k8s_minor=${k8s_minor%%.*}
  k8s_ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
    k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$k8s_time"
  done
  log "k8s module set up in $(elapsed "$t")s"
fi

if [ -n "$need_etcd" ]; then
  t=$(now)
  {
    echo "// Generated by ferrea's scripts/k8s/build.sh: builds etcd $ETCD_VERSION."
    echo "module ferrea.invalid/etcd-binaries"
    echo
    echo "go 1.26.0"
    echo
    echo "require ("
    echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    echo "	go.etcd.io/etcd/etcdctl/v3 $ETCD_VERSION"
    echo ")"
    echo
    echo "tool ("
    echo "	go.etcd.io/etcd/server/v3"
    echo "	go.etcd.io/etcd/etcdctl/v3"
    echo ")"
  } | setup_module "$ETCD_SRC"
  log "etcd module set up in $(elapsed "$t")s"
fi

total=$(now)
for b in "${todo[@]}"; do
  case "$b" in
    etcd) dir=$ETCD_SRC pkg=go.etcd.io/etcd/server/v3 ldflags="-s -w" tags= ;;
    etcdctl) dir=$ETCD_SRC pkg=go.etcd.io/etcd/etcdctl/v3 ldflags="-s -w" tags= ;;
    *) dir=$K8S_SRC pkg=k8s.io/kubernetes/cmd/$b ldflags=$k8s_ldflags tags=$TAGS ;;
  esac
  log "building $b $(version_of "$b") ($pkg)"
  t=$(now)
  tmp=$BIN_DIR/.$b.tmp.$$
  rm -f "$tmp"
  (cd "$dir" && nice -n 19 "$GO" build -trimpath ${tags:+-tags "$tags"} -ldflags "$ldflags" \
    -o "$tmp" "$pkg") || { rm -f "$tmp"; die "building $b failed"; }
  mv -f "$tmp" "$BIN_DIR/$b"
  secs=$(elapsed "$t")
  printf '%s\nbuilt %s with %s in %ss, %s bytes\n' "$(stamp_key "$b")" "$(date -u +%FT%TZ)" \
    "$go_version" "$secs" "$(stat -c %s "$BIN_DIR/$b")" > "$(stamp_file "$b")"
  log "built $b in ${secs}s ($(du -h "$BIN_DIR/$b" | cut -f1))"
done
log "built ${#todo[@]} binaries in $(elapsed "$total")s; bin dir $(du -sh "$BIN_DIR" | cut -f1)"
write_versions
echo "$BIN_DIR"
