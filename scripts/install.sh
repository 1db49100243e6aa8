#!/usr/bin/env bash
# Creates .venv (if missing) and installs the service with its test tools.
#   scripts/install.sh            base install (synth backend, no torch)
#   scripts/install.sh --models   plus the CPU model backends (torch CPU, transformers, audiocraft)
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import core_base, fastapi, aio_pika, asyncpg, boto3, moto" # fail loudly if the install broke

if [ "${1:-}" = "--models" ]; then
  bash scripts/install_model_backends.sh
fi
