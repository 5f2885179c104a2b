#!/usr/bin/env bash
# Deletes the e2e cluster that e2e/kind-up.sh made, and its local state (e2e/.kind-context, e2e/.state/).
# Refuses a cluster of the same name that this checkout did not make (its token is not the one in e2e/.kind-context).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER=quantrol-e2e
CONTEXT="kind-$CLUSTER"
MARKER="$ROOT/e2e/.kind-context"
STATE="$ROOT/e2e/.state"
OWNER_CONFIGMAP=quantrol-e2e-owner

die() {
    echo "[kind-down] !!!!!!!! $* !!!!!!!!" >&2
    exit 1
}
command -v kind >/dev/null 2>&1 || die "kind not found on PATH"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    mine="$(sed -n 's/^token=//p' "$MARKER" 2>/dev/null || true)"
    theirs="$(kubectl --context "$CONTEXT" -n kube-system get configmap "$OWNER_CONFIGMAP" \
        -o 'jsonpath={.data.token}' 2>/dev/null || true)"
    if [[ -z "$mine" || "$mine" != "$theirs" ]]; then
        die "kind cluster $CLUSTER was not made by e2e/kind-up.sh from this checkout (no matching token);" \
            "delete it yourself if it is yours: kind delete cluster --name $CLUSTER"
    fi
    kind delete cluster --name "$CLUSTER"
else
    echo "[kind-down] no kind cluster named $CLUSTER"
fi
rm -rf "$STATE" "$MARKER"
echo "[kind-down] removed e2e/.kind-context and e2e/.state/"
