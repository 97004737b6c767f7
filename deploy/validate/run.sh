#!/usr/bin/env bash
# Validate the deployment files with the validators deploy/validate/install.sh installed.
# Exits non-zero if any file is invalid (every check runs; failures are listed at the end).
#
#   bash deploy/validate/run.sh                 # everything in deploy/
#   bash deploy/validate/run.sh CHECK FILE...   # one check on given files (the tests feed it broken ones):
#       dockerfile FILE | compose FILE | k8s FILE_OR_KUSTOMIZE_DIR... | prom-config FILE |
#       prom-rules FILE | prom-rules-test FILE | dashboard FILE
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

CACHE="${INTERNEG_VALIDATORS_CACHE:-$HOME/.cache/interneg-validators}"
BIN="$CACHE/bin"
VENV="$CACHE/venv/bin"
K8S_VERSIONS="1.30.0 1.37.0"   # keep in step with install.sh

for tool in "$BIN/kubeconform" "$BIN/promtool" "$BIN/kustomize" "$BIN/composecheck" "$VENV/check-jsonschema" "$VENV/hadolint" \
            "$CACHE/schemas/compose-spec.json" "$CACHE/schemas/crd/keda.sh/scaledobject_v1alpha1.json"; do
    if [ ! -e "$tool" ]; then
        echo "run.sh: $tool is missing: run 'bash deploy/validate/install.sh' first" >&2
        exit 2
    fi
done

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# -- the checks: each returns non-zero when its input is invalid ------------------------------
check_dockerfile() { "$VENV/hadolint" --no-color --failure-threshold warning "$@"; }

check_compose() {
    local file
    for file in "$@"; do
        # The compose-spec JSON schema on the file as written, then compose-go (docker compose's
        # own loader: interpolation, schema, consistency) with the defaults and with overrides.
        # GRAFANA_ADMIN_PASSWORD has no default (compose refuses to start without it): give one.
        "$VENV/check-jsonschema" --schemafile "$CACHE/schemas/compose-spec.json" "$file" || return 1
        "$BIN/composecheck" "$file" GRAFANA_ADMIN_PASSWORD=validate-only >"$TMP/compose.out" || return 1
        "$BIN/composecheck" "$file" GRAFANA_ADMIN_PASSWORD=validate-only SCORE_WORKERS=4 INTERNEG_EXACTLY_ONCE=true \
            INTERNEG_IMAGE=registry.example/interneg:1 >"$TMP/compose-overrides.out" || return 1
        echo "compose: $file is valid (compose-spec schema, compose-go $(grep -o 'compose-go/v2 v[0-9.]*' deploy/validate/composecheck/go.mod | cut -d' ' -f2))"
    done
}

kubeconform() {
    local version
    for version in $K8S_VERSIONS; do
        "$BIN/kubeconform" -strict -summary -output text -kubernetes-version "$version" \
            -schema-location "$CACHE/schemas/k8s/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
            -schema-location "$CACHE/schemas/crd/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json" \
            "$@" || return 1
    done
}

check_k8s() {
    # A directory with a kustomization.yaml is rendered by kustomize and the result validated;
    # files are validated as they are. No -ignore-missing-schemas: an unknown kind fails.
    local arg
    for arg in "$@"; do
        if [ -d "$arg" ]; then
            "$BIN/kustomize" build "$arg" >"$TMP/rendered.yaml" || return 1
            echo "k8s: $arg (kustomize build):"
            kubeconform "$TMP/rendered.yaml" || return 1
        else
            kubeconform "$arg" || return 1
        fi
    done
}

check_prom_config() { "$BIN/promtool" check config "$@"; }
check_prom_rules() { "$BIN/promtool" check rules "$@"; }
check_prom_rules_test() { "$BIN/promtool" test rules "$@"; }

check_dashboard() {
    "$VENV/python" deploy/validate/dashboard_rules.py "$TMP/dashboard-rules.yml" "$@" || return 1
    "$BIN/promtool" check rules "$TMP/dashboard-rules.yml"
}

# -- one check on given files -----------------------------------------------------------------
if [ $# -gt 0 ]; then
    check=$1; shift
    case "$check" in
        dockerfile|compose|k8s|dashboard) "check_$check" "$@" ;;
        prom-config) check_prom_config "$@" ;;
        prom-rules) check_prom_rules "$@" ;;
        prom-rules-test) check_prom_rules_test "$@" ;;
        *) echo "run.sh: unknown check '$check'" >&2; exit 2 ;;
    esac
    exit $?
fi

# -- everything ------------------------------------------------------------------------------
failed=()
step() {
    local name=$1; shift
    echo "==> $name"
    if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; failed+=("$name"); fi
}

k8s_files=()
for f in deploy/k8s/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || k8s_files+=("$f")
done

step "Dockerfile (hadolint)" check_dockerfile deploy/image/Dockerfile
step "docker-compose.yml (compose-spec schema, compose-go)" check_compose deploy/compose/docker-compose.yml
step "Kubernetes manifests (kubeconform -strict, Kubernetes $K8S_VERSIONS)" check_k8s "${k8s_files[@]}"
step "Kubernetes kustomization (kustomize build | kubeconform -strict)" check_k8s deploy/k8s
step "Prometheus configs (promtool check config)" check_prom_config deploy/prometheus/prometheus.yml deploy/prometheus/prometheus-k8s.yml
step "Prometheus rules (promtool check rules)" check_prom_rules deploy/prometheus/rules.yml
step "Prometheus rule tests (promtool test rules)" check_prom_rules_test deploy/prometheus/rules_test.yml
step "Grafana dashboard PromQL (promtool check rules)" check_dashboard deploy/grafana/dashboards/*.json

if [ ${#failed[@]} -gt 0 ]; then
    echo "run.sh: ${#failed[@]} check(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "run.sh: all deployment files are valid"
