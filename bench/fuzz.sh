#!/usr/bin/env bash
# The long schemathesis run: the server's API against its own /openapi.json with every check, for
# SECONDS (default 1800) instead of CI's 180 (bench/fuzz.py does the work; it exits non-zero on any
# finding, any server error logged or an unclean stop). Extra arguments go to bench/fuzz.py.
#   bash bench/fuzz.sh [SECONDS] [--seed N] [--report-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET=${1:-1800}
shift || true
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/fuzz.py --max-time "$SECONDS_BUDGET" --nice 5 "$@"
