#!/usr/bin/env bash
# Creates the e2e cluster and everything the e2e scenarios (e2e/test_rollout.py) and `quantrol demo --cluster` expect
# on it (e2e/README.md):
#   1. a kind cluster named quantrol-e2e (context kind-quantrol-e2e), marked as made here: a random token in the
#      ConfigMap kube-system/quantrol-e2e-owner and in e2e/.kind-context. The e2e guard (e2e/guard.py) runs nothing
#      unless the current context is the one in that file and the cluster holds the same token;
#   2. a CA and a TLS certificate for the in-cluster registry (e2e/.state/);
#   3. the images, built from this tree and loaded into the node (nothing is pushed anywhere): the operator
#      (operator/Dockerfile), the calibration worker (worker/Dockerfile, CPU torch) and the serving image (vLLM's CPU
#      build: e2e/images/serve-cpu.Dockerfile), the last two with the registry CA added (e2e/images/trust.Dockerfile);
#   4. the registry and Prometheus (e2e/cluster/infra.yaml), then the chart from charts/quantrol with these images.
# Run again on the cluster it made, it rebuilds and reloads the images, re-applies the CRDs and upgrades the release.
# Needs: docker (a running engine), kind (0.29 or newer), kubectl, helm 3, openssl. First run: about 20-30 minutes,
# most of it building images (torch, llm-compressor and vLLM's CPU build are downloaded) and loading them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CLUSTER=quantrol-e2e
CONTEXT="kind-$CLUSTER"
NODE_IMAGE="${QUANTROL_E2E_NODE_IMAGE:-kindest/node:v1.33.1@sha256:050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f}"
MARKER="$ROOT/e2e/.kind-context"
STATE="$ROOT/e2e/.state"
OWNER_CONFIGMAP=quantrol-e2e-owner
INFRA_NS=quantrol-infra
RELEASE=quantrol
RELEASE_NS=quantrol-system
REGISTRY_HOST="registry.$INFRA_NS.svc"
PROMETHEUS_URL="http://prometheus.$INFRA_NS.svc:9090"
TAG=e2e
OPERATOR_IMAGE="quantrol/operator:$TAG"
WORKER_IMAGE="quantrol/worker:$TAG"
SERVE_IMAGE="quantrol/serve:$TAG"

say() { echo "[kind-up +${SECONDS}s] $*"; }
die() {
    echo "[kind-up] !!!!!!!! $* !!!!!!!!" >&2
    exit 1
}
kc() { kubectl --context "$CONTEXT" "$@"; }

for tool in docker kind kubectl helm openssl; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH (e2e/README.md lists what to install)"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info'"

# --- 1. the cluster, marked as ours -------------------------------------------------------------------------------
marker_token() { sed -n 's/^token=//p' "$MARKER" 2>/dev/null || true; }
cluster_token() { kc -n kube-system get configmap "$OWNER_CONFIGMAP" -o 'jsonpath={.data.token}' 2>/dev/null || true; }

REUSED=0
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    REUSED=1
    mine="$(marker_token)"
    if [[ -z "$mine" || "$mine" != "$(cluster_token)" ]]; then
        die "a kind cluster named $CLUSTER exists but was not made by this script from this checkout (no matching" \
            "token in e2e/.kind-context, or no context $CONTEXT: kind export kubeconfig --name $CLUSTER); if it is yours" \
            "to delete: kind delete cluster --name $CLUSTER"
    fi
    say "reusing cluster $CLUSTER (made by this script): rebuilding images and upgrading the release"
else
    say "creating kind cluster $CLUSTER ($NODE_IMAGE)"
    rm -rf "$STATE" "$MARKER"
    kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --wait 180s
    token="$(openssl rand -hex 24)"
    kc -n kube-system create configmap "$OWNER_CONFIGMAP" --from-literal=token="$token" \
        --from-literal=created-by=e2e/kind-up.sh
    (
        umask 077
        printf '%s\n' "# Written by e2e/kind-up.sh: the e2e guard (e2e/guard.py) runs only against this context, and" \
            "# only while the cluster's ConfigMap kube-system/$OWNER_CONFIGMAP holds the same token." \
            "context=$CONTEXT" "token=$token" >"$MARKER"
    )
fi

# --- 2. the registry's CA and certificate (kept with the cluster: the images and the Secret must agree) -----------
mkdir -p "$STATE/trust"
if [[ ! -s "$STATE/registry.crt" ]]; then
    say "making the registry CA and certificate for $REGISTRY_HOST"
    cat >"$STATE/ca.cnf" <<EOF
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = quantrol-e2e registry CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    cat >"$STATE/registry.ext" <<EOF
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:$REGISTRY_HOST, DNS:$REGISTRY_HOST.cluster.local, DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
    openssl req -x509 -new -nodes -newkey rsa:2048 -days 365 -config "$STATE/ca.cnf" \
        -keyout "$STATE/ca.key" -out "$STATE/trust/registry-ca.crt" 2>/dev/null
    openssl req -new -nodes -newkey rsa:2048 -subj "/CN=$REGISTRY_HOST" \
        -keyout "$STATE/registry.key" -out "$STATE/registry.csr" 2>/dev/null
    openssl x509 -req -sha256 -days 365 -in "$STATE/registry.csr" -CA "$STATE/trust/registry-ca.crt" \
        -CAkey "$STATE/ca.key" -CAserial "$STATE/ca.srl" -CAcreateserial -extfile "$STATE/registry.ext" \
        -out "$STATE/registry.crt" 2>/dev/null
fi

# --- 3. images, loaded into the node -------------------------------------------------------------------------------
say "building $OPERATOR_IMAGE"
docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
say "building the calibration worker (CPU torch)"
docker build -f worker/Dockerfile -t "quantrol/worker-cpu:$TAG" \
    --build-arg TORCH_SPEC=torch==2.13.0+cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
say "building the serving image (vLLM's CPU build)"
docker build -f e2e/images/serve-cpu.Dockerfile -t "quantrol/serve-cpu:$TAG" .
say "adding the registry CA: $WORKER_IMAGE, $SERVE_IMAGE"
docker build -f e2e/images/trust.Dockerfile --build-arg "BASE=quantrol/worker-cpu:$TAG" -t "$WORKER_IMAGE" "$STATE/trust"
docker build -f e2e/images/trust.Dockerfile --build-arg "BASE=quantrol/serve-cpu:$TAG" -t "$SERVE_IMAGE" "$STATE/trust"
say "loading the images into the node (the serving image is several GB: minutes)"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$WORKER_IMAGE" "$SERVE_IMAGE"

# --- 4. registry, Prometheus, the chart ----------------------------------------------------------------------------
say "registry (TLS) and Prometheus in namespace $INFRA_NS"
kc create namespace "$INFRA_NS" --dry-run=client -o yaml | kc apply -f -
kc -n "$INFRA_NS" create secret tls registry-tls --cert="$STATE/registry.crt" --key="$STATE/registry.key" \
    --dry-run=client -o yaml | kc apply -f -
kc apply -f e2e/cluster/infra.yaml
kc -n "$INFRA_NS" rollout status deployment/registry --timeout=300s
kc -n "$INFRA_NS" rollout status deployment/prometheus --timeout=300s

say "installing the chart (release $RELEASE in $RELEASE_NS)"
# Helm installs crds/ only on first install and never upgrades them (charts/README.md): apply them first.
kc apply --server-side --force-conflicts -f charts/quantrol/crds/
helm --kube-context "$CONTEXT" upgrade --install "$RELEASE" charts/quantrol \
    --namespace "$RELEASE_NS" --create-namespace \
    --set image.repository=quantrol/operator --set image.tag="$TAG" \
    --set workerImages.calibrate="$WORKER_IMAGE" \
    --set workerImages.serving="$SERVE_IMAGE" \
    --set workerImages.router="$SERVE_IMAGE" \
    --set workerImages.tools="$SERVE_IMAGE" \
    --set analysis.prometheusUrl="$PROMETHEUS_URL" \
    --set watch.allNamespaces=true \
    --wait --timeout 5m
if [[ "$REUSED" -eq 1 ]]; then
    # Same tag, new bytes: restart the operator so that it runs the image just loaded.
    kc -n "$RELEASE_NS" rollout restart deployment/"$RELEASE"
    kc -n "$RELEASE_NS" rollout status deployment/"$RELEASE" --timeout=300s
fi

say "ready: context $CONTEXT (the current one). Next:"
say "  .venvs/dev/bin/python -m pytest e2e          # the scenarios, about 15-25 minutes"
say "  .venvs/dev/bin/quantrol demo --cluster       # the demo story on this cluster"
say "  bash e2e/kind-down.sh                        # delete the cluster"
