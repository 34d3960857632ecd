#!/usr/bin/env bash
# The server on a GPU host without network: greedy, seeded-sampled, steered and heterogeneous streams at
# concurrency 1/8/32/64 against plain `generate` at batch 1/8/32 on the same model (bench/gpu_check.py).
#
#   bash bench/gpu_check.sh prepare     # here, with a package registry: wheels + model config into .gpu/
#   bash bench/gpu_check.sh run [gpu_check.py flags]   # on the GPU host (default --device cuda)
#   bash bench/gpu_check.sh train [gpu_train.py flags] # on the GPU host: one profile's whole `rahf train`
#   bash bench/gpu_check.sh all --out DIR              # on the GPU host: run, then train, one call
#   bash bench/gpu_check.sh vllm --out DIR             # where vLLM is installed: bench/vllm_steering.py
#
# `prepare` puts into .gpu/ (ignored by git through .git/info/exclude, about 10 MB): Python 3.12 wheels of
# what the GPU hosts lack (fastapi, starlette, pydantic and pydantic-core, pydantic-settings,
# python-dotenv, typing-inspection, annotated-types, uvicorn, sse-starlette, gguf, python-multipart,
# opentelemetry-api, which fastapi needs; matplotlib and its dependencies, which `rahf train` needs), a copy
# of ../shared/data/hh_harmless (2 MB) for `train`, and
# the embedded model's config and tokenizer (the weights stay here: the model is built there from the
# config with random weights). Then run it there with the device tool, carrying .gpu, in one call
#   command: bash bench/gpu_check.sh all --out $OUT      carry: [".gpu"]      timeout_s: 590
# or, when less device time is left, in two (the machine stays warm 30 s between calls):
#   bash bench/gpu_check.sh train --out $OUT   (timeout_s 300), then   bash bench/gpu_check.sh run --out $OUT
# `run` installs the wheels into /tmp/site when the server's packages are missing, and needs torch and transformers
# already installed. A dry run on the CPU:
#   bash bench/gpu_check.sh run --device cpu --shape tiny --concurrency 1 8 --batches 1 8 --max-tokens 16
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
        annotated-types uvicorn sse-starlette gguf python-multipart opentelemetry-api
        matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil tzdata)

prepare() {
  local py=${PYTHON}
  [ -x .venv/bin/python ] && py=.venv/bin/python
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu/wheels && mkdir -p .gpu/wheels .gpu/model
  local specs=()
  for name in "${WHEELS[@]}"; do  # the versions this project's environment uses
    specs+=("$name==$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")")
  done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "${specs[@]}"
  rm -rf .gpu/data && mkdir -p .gpu/data && cp -r ../shared/data/hh_harmless .gpu/data/
  "$py" - <<'PY'
import shutil
from pathlib import Path

from steering_vectors.core.models import ensure_embedded_cache

source = ensure_embedded_cache()[0]
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja"):
    if (source / name).is_file():
        shutil.copy(source / name, Path(".gpu/model") / name)
PY
  du -sh .gpu; ls .gpu/wheels .gpu/model
}

setup() {
  if ! "$PYTHON" -c "import fastapi, pydantic_settings, uvicorn, sse_starlette, multipart, gguf, matplotlib" \
      2> /dev/null \
      && compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
}

run() {
  setup
  "$PYTHON" bench/gpu_check.py "$@"
}

train() {
  setup
  "$PYTHON" bench/gpu_train.py "$@"
}

# The vllm backend's benchmark (bench/vllm_steering.py) on a random-weight model built from .gpu/model's config,
# where vLLM is installed. It is not on the lent GPU hosts, and it cannot be carried there: a vLLM CUDA wheel is
# ~400 MB and pins its own torch build (another ~1 GB), while a device call carries 64 MiB and files survive
# between calls only while the machine stays warm (30 s). On a GPU host of one's own: pip install vllm, then
#   bash bench/gpu_check.sh vllm --out DIR
vllm_bench() {
  setup
  if ! "$PYTHON" -c "import vllm" 2> /dev/null; then
    echo "vllm: not installed on this host; the vLLM benchmark is skipped (see the comment above vllm_bench)"
    return 0
  fi
  local out=/tmp/rahf-vllm-bench
  if [ "${1:-}" = "--out" ]; then out=$2; shift 2; fi
  mkdir -p "$out"
  "$PYTHON" - "$out/model" <<'PY'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = Path(".gpu/model"), Path(sys.argv[1])
config = AutoConfig.from_pretrained(source)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(target)
for item in source.iterdir():
    if item.name != "config.json":
        shutil.copy(item, target / item.name)
PY
  "$PYTHON" bench/vllm_steering.py --model "$out/model" --device cuda --dtype bfloat16 --no-digest-check \
    --out "$out/bench-vllm.json" "$@"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  train) shift; train "$@" ;;
  vllm) shift; vllm_bench "$@" ;;
  all) shift; status=0; run "$@" || status=$?; train "$@" || status=$?; exit $status ;;
  *) echo "usage: bash bench/gpu_check.sh prepare | run [gpu_check.py flags] | train [gpu_train.py flags]" \
       "| vllm [--out DIR] [vllm_steering.py flags] | all --out DIR" >&2; exit 2 ;;
esac
