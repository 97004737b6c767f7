#!/usr/bin/env bash
# Set up the project's virtual environment at .venv from scratch, or bring it up to date.
# uv keeps a package cache (~/.cache/uv) and links from it, so the multi-GB torch install
# is downloaded once per machine and a fresh clone sets up in seconds afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    python3 -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
if [ ! -x .venv/bin/python ]; then
    uv venv --quiet --python "$(command -v python3)" .venv
fi
# The lock pins every transitive version (made by: uv pip compile pyproject.toml --extra dev -o deploy/requirements.lock).
uv pip sync --quiet --python .venv/bin/python deploy/requirements.lock
uv pip install --quiet --python .venv/bin/python --no-deps -e .
# The Kafka broker (tests, local-run) runs from Maven Central jars with Java 17+.
if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq maven openjdk-17-jre-headless >/dev/null
fi
if ! command -v openssl >/dev/null 2>&1; then  # the test broker's SSL listener makes its certificates with it
    apt-get update -qq && apt-get install -y -qq openssl >/dev/null
fi
bash deploy/kafka/broker.sh fetch >/dev/null
# Not the validators of deploy/ (Go builds, minutes when cold): only the tests need them, and the
# README's test command installs them (bash deploy/validate/install.sh).
.venv/bin/python -c "import torch, torchvision, open_clip, faiss, kafka, crc32c" \
    || { echo "setup: the environment in .venv does not import; remove .venv and run again" >&2; exit 1; }
