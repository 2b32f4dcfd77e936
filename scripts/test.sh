#!/usr/bin/env bash
# The test command (README, .ci/run): on a fresh machine it installs redis-server if
# missing (apt, as root), makes .venv, installs the package with its test extras and
# runs pytest against real redis-server processes the tests start themselves.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k backpressure`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing redis-server (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: install it (sudo apt-get install -y redis-server)" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "== installing dataflow-redis[test,plot] into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,plot]'

echo "== running the tests"
exec .venv/bin/python -m pytest "$@"
