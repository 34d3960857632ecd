#!/usr/bin/env bash
# The engine and server tests against the lowest transformers this project declares (the lower bound in
# pyproject.toml), in a second environment (.cache/venv-transformers-<version>, made on first use by
# scripts/setup-venv.sh with the same torch wheel as .venv). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOWEST=$(sed -n 's/^ *"transformers>=\([0-9][0-9.]*\).*/\1/p' pyproject.toml | head -n 1)
if [ -z "$LOWEST" ]; then
  echo "test-lowest.sh: no 'transformers>=VERSION' dependency in pyproject.toml" >&2
  exit 1
fi
VENV=.cache/venv-transformers-$LOWEST
bash scripts/setup-venv.sh "$VENV" "==$LOWEST"
# the fault, security and API-description tests exercise processes, signals, files and HTTP, not the
# transformers API; they run once, in the main pass
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/engine tests/server \
  --ignore tests/server/test_faults.py --ignore tests/server/test_security.py \
  --ignore tests/server/test_openapi.py "$@"
