#!/usr/bin/env bash
# Static checks: lint, formatting, types (the settings are in pyproject.toml).
# Run after scripts/install.sh; CI runs it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .
mypy .
