#!/usr/bin/env bash
# Smoke test of the Kubernetes binaries that scripts/k8s/build.sh builds: runs a real etcd and
# kube-apiserver inside a network namespace of its own (only its loopback is up, so nothing is
# reachable from or changed in the root namespace), with certificates made here by openssl
# (a CA, a serving cert, a service-account key pair, an admin client cert in system:masters),
# waits for /readyz, then checks kubectl version, kubectl get ns and RBAC via kubectl auth can-i.
# Everything it started or made (processes, by PID; the namespace; the temp dir) is removed on
# exit, also on failure or Ctrl-C. Needs root (ip netns). Exits non-zero on any failure.
# Usage: scripts/k8s/smoke.sh          (builds kube-apiserver, kubectl and etcd first if needed)
# Environment: FERREA_CACHE, GO (as for build.sh); SMOKE_READY_TIMEOUT (seconds, default 60);
#              SMOKE_KEEP_LOGS=1 copies the logs to ./k8s-smoke-logs/ before cleaning up.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-60}
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1 # the first address of SERVICE_CIDR: the `kubernetes` service
PORT=6443

log() { echo "k8s/smoke.sh: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root to create a network namespace"
for tool in ip openssl curl; do command -v "$tool" >/dev/null || fail "needs $tool"; done

log "building (or finding cached) kube-apiserver, kubectl, etcd"
BIN=$("$HERE/build.sh" kube-apiserver kubectl etcd | tail -n1)
[ -x "$BIN/kube-apiserver" ] || fail "no kube-apiserver in $BIN"

NS=ferrea-k8s-smoke-$$
TMP=$(mktemp -d /tmp/ferrea-k8s-smoke.XXXXXX)
ETCD_PID='' APISERVER_PID='' NS_MADE=''

stop_pid() { # name pid: TERM, up to 10 s, then KILL; only the PID this script started
  local name=$1 pid=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) did not stop on TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
  log "stopped $name (pid $pid)"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" != 0 ]; then
    for f in apiserver etcd; do
      [ -s "$TMP/$f.log" ] && { log "last lines of $f.log:"; tail -n 25 "$TMP/$f.log" >&2; }
    done
  fi
  if [ "${SMOKE_KEEP_LOGS:-}" = 1 ]; then
    mkdir -p k8s-smoke-logs
    cp "$TMP"/*.log k8s-smoke-logs/ 2>/dev/null || true
  fi
  stop_pid kube-apiserver "$APISERVER_PID"
  stop_pid etcd "$ETCD_PID"
  if [ -n "$NS_MADE" ]; then ip netns delete "$NS" && log "deleted netns $NS"; fi
  rm -rf "$TMP" && log "removed $TMP"
  if [ "$rc" = 0 ]; then log "PASS"; else log "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_ns() { ip netns exec "$NS" "$@"; }

ip netns add "$NS"
NS_MADE=1
in_ns ip link set lo up
log "created netns $NS (lo up), temp dir $TMP"

# --- Certificates ------------------------------------------------------------------------------
P=$TMP/pki
mkdir -p "$P"
ossl() { openssl "$@" 2>>"$TMP/openssl.log" || fail "openssl $1 failed (see openssl.log)"; }
ossl req -x509 -newkey rsa:2048 -nodes -keyout "$P/ca.key" -out "$P/ca.crt" -days 1 \
  -subj "/CN=ferrea-smoke-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"
sign() { # name subject extensions
  ossl req -newkey rsa:2048 -nodes -keyout "$P/$1.key" -out "$P/$1.csr" -subj "$2"
  printf '%s\n' "$3" > "$P/$1.ext"
  ossl x509 -req -in "$P/$1.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial \
    -out "$P/$1.crt" -days 1 -extfile "$P/$1.ext"
}
sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
sign admin "/O=system:masters/CN=ferrea-smoke-admin" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$P/sa.key"
ossl pkey -in "$P/sa.key" -pubout -out "$P/sa.pub"
log "made a CA, a serving cert (127.0.0.1, localhost, kubernetes.default.svc, $SERVICE_IP), a service-account key pair, an admin client cert (O=system:masters)"

KUBECONFIG_FILE=$TMP/admin.kubeconfig
cat > "$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: smoke
  cluster:
    server: https://127.0.0.1:$PORT
    certificate-authority: $P/ca.crt
users:
- name: admin
  user:
    client-certificate: $P/admin.crt
    client-key: $P/admin.key
contexts:
- name: smoke
  context: {cluster: smoke, user: admin}
current-context: smoke
EOF
kubectl() { in_ns "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }

# --- etcd --------------------------------------------------------------------------------------
# `ip netns exec` execs the command, so $! is etcd's own PID (not through in_ns: a function run
# in the background is a subshell, whose PID is not the daemon's).
ip netns exec "$NS" "$BIN/etcd" --name smoke --data-dir "$TMP/etcd-data" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster smoke=http://127.0.0.1:2380 \
  > "$TMP/etcd.log" 2>&1 &
ETCD_PID=$!
is_our() { # pid binary: the PID is that binary, run by this script
  sleep 0.2
  [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$BIN/$2" ] || fail "pid $1 is not $2"
}
is_our "$ETCD_PID" etcd
log "started etcd $("$BIN/etcd" --version | head -n1 | awk '{print $3}') (pid $ETCD_PID) in $NS on 127.0.0.1:2379"
deadline=$((SECONDS + 30))
until in_ns curl -fsS --max-time 2 http://127.0.0.1:2379/health 2>/dev/null | grep -q '"health":"true"'; do
  kill -0 "$ETCD_PID" 2>/dev/null || fail "etcd exited"
  [ "$SECONDS" -lt "$deadline" ] || fail "etcd not healthy within 30 s"
  sleep 0.5
done
log "etcd healthy"

# --- kube-apiserver ----------------------------------------------------------------------------
# Only loopback exists in the namespace, so the advertise address is 127.0.0.1; the endpoint
# reconciler refuses a loopback address for the `kubernetes` Service's endpoints, so it is off
# (a test that needs that Service gives the apiserver a non-loopback address in its namespace).
ip netns exec "$NS" "$BIN/kube-apiserver" \
  --etcd-servers=http://127.0.0.1:2379 \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=$PORT \
  --endpoint-reconciler-type=none \
  --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
  --client-ca-file="$P/ca.crt" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --service-cluster-ip-range=$SERVICE_CIDR \
  --authorization-mode=Node,RBAC \
  --allow-privileged=true \
  --cert-dir="$TMP/apiserver-certs" \
  --profiling=false \
  > "$TMP/apiserver.log" 2>&1 &
APISERVER_PID=$!
is_our "$APISERVER_PID" kube-apiserver
log "started kube-apiserver (pid $APISERVER_PID) in $NS on https://127.0.0.1:$PORT"

start=$SECONDS
deadline=$((SECONDS + READY_TIMEOUT))
until out=$(kubectl get --raw /readyz 2>&1) && [ "$out" = ok ]; do
  kill -0 "$APISERVER_PID" 2>/dev/null || fail "kube-apiserver exited"
  [ "$SECONDS" -lt "$deadline" ] || { kubectl get --raw '/readyz?verbose' >&2 || true; fail "/readyz not ok within ${READY_TIMEOUT} s"; }
  sleep 1
done
log "/readyz ok after $((SECONDS - start)) s"

# --- Checks ------------------------------------------------------------------------------------
want=$("$BIN/kube-apiserver" --version | awk '{print $2}')
version_out=$(kubectl version) || fail "kubectl version failed"
printf '%s\n' "$version_out" | sed 's/^/  /' >&2
printf '%s\n' "$version_out" | grep -q "^Server Version: $want\$" || fail "server version is not $want"
printf '%s\n' "$version_out" | grep -q "^Client Version: $want\$" || fail "client version is not $want"

ns_out=$(kubectl get ns) || fail "kubectl get ns failed"
printf '%s\n' "$ns_out" | sed 's/^/  /' >&2
for n in default kube-system kube-public kube-node-lease; do
  printf '%s\n' "$ns_out" | grep -q "^$n " || fail "namespace $n missing"
done

can=$(kubectl auth can-i '*' '*' --all-namespaces || true)
[ "$can" = yes ] || fail "admin (system:masters) cannot do everything: '$can'"
log "kubectl auth can-i '*' '*' --all-namespaces (admin): $can"
sa=system:serviceaccount:default:default
cannot=$(kubectl auth can-i create pods -n kube-system --as="$sa" || true)
[ "$cannot" = no ] || fail "RBAC let $sa create pods in kube-system: '$cannot'"
log "kubectl auth can-i create pods -n kube-system --as=$sa: $cannot (RBAC enforced)"
