#!/usr/bin/env bash
# What the tests need beyond the runtime that deploy/setup.sh installs:
# - Debian's chromium: the review page is tested in a real headless browser (playwright drives
#   this binary; no browser is downloaded);
# - PostgreSQL: the review store's server backend is tested against a real server, which the
#   test starts itself in a temporary folder;
# - the validators of deploy/ (deploy/validate/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-deps: installing ${missing[*]} from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
bash deploy/validate/install.sh
