#!/usr/bin/env bash
# The test command: installs everything (model backends included), makes sure
# the local services run, starts an S3 server (moto) for the run, runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh --models
bash scripts/services.sh
# shellcheck disable=SC1091
. .venv/bin/activate

s3_pid=""
cleanup() { if [ -n "$s3_pid" ]; then kill "$s3_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
if [ -z "${TEST_S3_URL:-}" ]; then
  port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    python -m moto.server -H 127.0.0.1 -p "$port" >/tmp/audiocraft-moto.log 2>&1 &
  s3_pid=$!
  export TEST_S3_URL="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
fi

set +e
python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests" >&2
fi
exit "$code"
