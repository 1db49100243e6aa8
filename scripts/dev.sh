#!/usr/bin/env bash
# One command for a newcomer: install, then run the whole service in one process
# on embedded adapters (no RabbitMQ/Redis/Postgres/S3, no GPU, no weights).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/audiocraft-service dev "$@"
