"""The vllm backend's settings, without vLLM: what its engine arguments are made of, what it refuses, the
environment it sets on CPU machines, and the one-line error of `rahf serve --backend vllm` where vLLM is not
installed (its engine and server tests are in tests/vllm/, run in the vLLM environment)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from server.backends.vllm import FIXED_ARGUMENTS, engine_arguments, prepare_environment
from server.config import Settings
from tests.server.procs import ROOT


def test_engine_arguments_follow_the_settings() -> None:
    settings = Settings(backend="vllm", max_batch_size=32, vllm_tensor_parallel_size=4, vllm_pipeline_parallel_size=2,
                        vllm_gpu_memory_utilization=0.8, dtype="bfloat16",
                        vllm_engine_args='{"block_size": 32, "enable_prefix_caching": false}')
    args = engine_arguments(settings, "/models/llama", 4096)
    assert args["model"] == args["tokenizer"] == "/models/llama"
    assert (args["max_num_seqs"], args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (32, 4, 2)
    assert (args["gpu_memory_utilization"], args["dtype"], args["max_model_len"]) == (0.8, "bfloat16", 4096)
    assert args["block_size"] == 32 and args["enable_prefix_caching"] is False  # the escape hatch
    assert {k: args[k] for k in FIXED_ARGUMENTS} == FIXED_ARGUMENTS


@pytest.mark.parametrize("extra", ['{"enforce_eager": false}', '{"compilation_config": {"level": 3}}',
                                   '{"worker_extension_cls": "x.Y"}'])
def test_arguments_steering_depends_on_are_refused(extra) -> None:
    with pytest.raises(ValueError, match="not supported"):
        engine_arguments(Settings(backend="vllm", vllm_engine_args=extra), "/m", 128)


def test_engine_args_must_be_a_json_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        Settings(backend="vllm", vllm_engine_args="[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Settings(backend="vllm", vllm_engine_args="{not json")


def test_cpu_environment_is_set_only_where_unset(monkeypatch) -> None:
    monkeypatch.setattr("server.backends.vllm._cuda_available", lambda: False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    chosen = prepare_environment(Settings(backend="vllm", vllm_kv_cache_gib=3))
    assert chosen == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                      "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))}
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"  # the operator's value stays


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_is_a_one_line_error() -> None:
    done = subprocess.run([sys.executable, "-m", "steering_vectors.cli", "serve", "--backend", "vllm"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("rahf serve: the vllm backend needs vLLM")
    assert "Traceback" not in done.stderr
