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
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/engine tests/server "$@"
