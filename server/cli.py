"""`rahf serve`: flags on top of `RAHF_*` environment settings, then uvicorn.

Knows the command line and how to start uvicorn (graceful shutdown on SIGTERM: stop accepting, let
in-flight requests finish within the shutdown timeout, run the app's shutdown, exit). Imports FastAPI
and the app only when the command runs, so `rahf --help` stays light.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

# flag -> settings field; flags left out keep the environment's value or the default
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--host", "host", {}),
    ("--port", "port", {"type": int}),
    ("--model", "model", {"help": "local model directory (default: embedded SmolLM2)"}),
    ("--served-model-name", "served_model_name", {"help": "model name clients use (default: the model's)"}),
    ("--profile-dir", "profile_dir", {"help": "directory of profile files (loaded at start, written by PUT)"}),
    ("--profile-rescan", "profile_rescan_s", {"type": float,
                                              "help": "seconds between rescans of the profile directory (default 5)"}),
    ("--backend", "backend", {"help": "the backend that runs the model (default transformers)"}),
    ("--dtype", "dtype", {"choices": ["auto", "float32", "bfloat16", "float16"],
                          "help": "default auto: bfloat16 on CUDA, float32 elsewhere"}),
    ("--device", "device", {}),
    ("--quantize", "quantize", {"choices": ["auto", "none", "int4", "int8"],
                                "help": "weight-only int4/int8 linears for CPU decoding (default auto)"}),
    ("--packed-max-rows", "packed_max_rows", {"type": int,
                                              "help": "rows above which the float weights are used"}),
    ("--root-path", "root_path", {"help": "path prefix when served behind a proxy"}),
    ("--cors-origins", "cors_origins", {"help": "comma-separated allowed origins (default: CORS off)"}),
    ("--keys-file", "keys_file", {"help": "file of API keys, one per line; 'admin:KEY' for admin keys"}),
    ("--max-body-bytes", "max_body_bytes", {"type": int}),
    ("--max-profile-bytes", "max_profile_bytes", {"type": int}),
    ("--max-model-len", "max_model_len", {"type": int, "help": "context window: prompt plus generated tokens "
                                          "(default: the model's, at most 2048)"}),
    ("--default-max-tokens", "default_max_tokens", {"type": int}),
    ("--default-repetition-penalty", "default_repetition_penalty", {
        "type": float, "help": "repetition_penalty of requests that set none and steer with no profile that "
                         "carries one (default 1: off)"}),
    ("--max-tokens-limit", "max_tokens_limit", {"type": int}),
    ("--max-batch-size", "max_batch_size", {"type": int, "help": "requests run together (concurrency)"}),
    ("--max-queue", "max_queue", {"type": int, "help": "requests waiting beyond the running ones"}),
    ("--strength-min", "strength_min", {"type": float}),
    ("--strength-max", "strength_max", {"type": float}),
    ("--shutdown-timeout", "shutdown_timeout_s", {"type": float}),
    ("--log-level", "log_level", {}),
    # the vllm backend (--backend vllm)
    ("--tensor-parallel-size", "vllm_tensor_parallel_size", {"type": int, "help": "vLLM: GPUs per model"}),
    ("--pipeline-parallel-size", "vllm_pipeline_parallel_size", {"type": int, "help": "vLLM: pipeline stages"}),
    ("--gpu-memory-utilization", "vllm_gpu_memory_utilization", {"type": float,
                                                                 "help": "vLLM: share of GPU memory (default 0.9)"}),
    ("--max-profiles", "vllm_max_profiles", {"type": int,
                                             "help": "vLLM: profile slots per worker (default 16)"}),
    ("--kv-cache-gib", "vllm_kv_cache_gib", {"type": float, "help": "vLLM on CPUs: KV cache GiB (default 2)"}),
    ("--vllm-engine-args", "vllm_engine_args", {"help": "vLLM: other engine arguments as a JSON object"}),
]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve a model with steering profiles over an OpenAI-compatible API",
        description="Settings come from RAHF_* environment variables; flags override them. API keys are "
        "read from RAHF_API_KEYS / RAHF_ADMIN_KEYS or --keys-file, never from flags.",
    )
    for flag, dest, kwargs in _FLAGS:
        parser.add_argument(flag, dest=dest, default=None, **kwargs)
    parser.add_argument("--no-digest-check", dest="check_digest", action="store_false", default=None,
                        help="accept profiles made for other weights of the same architecture")
    parser.add_argument("--read-only-profiles", dest="profile_uploads", action="store_false", default=None,
                        help="serve the profile directory without writing it (uploads and deletes: 403)")
    parser.add_argument("--no-profile-watch", dest="profile_watch", action="store_false", default=None,
                        help="no file events: rescan the profile directory on the timer only")
    parser.add_argument("--no-fast-decode", dest="fast_decode", action="store_false", default=None,
                        help="decode through the transformers forward instead of the lean Llama step")
    parser.add_argument("--plain-logs", dest="log_json", action="store_false", default=None,
                        help="human-readable logs instead of JSON lines")
    parser.set_defaults(handler=_serve)


def settings_from_args(args: argparse.Namespace) -> Any:
    from .config import Settings

    switches = ["check_digest", "fast_decode", "log_json", "profile_uploads", "profile_watch"]
    dests = [dest for _, dest, _ in _FLAGS] + switches
    overrides = {dest: getattr(args, dest) for dest in dests if getattr(args, dest, None) is not None}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from steering_vectors.core.models import check_device, check_model

    from . import logs
    from .app import create_app
    from .gateway import draining_server, keep_streams_open_on_shutdown

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise SystemExit(f"rahf serve: invalid settings:\n{exc}") from None
    check_model(settings.model)  # a missing model or device is a one-line error, not a failed start-up
    check_device(settings.device)
    if settings.backend == "vllm":
        from .backends.vllm import VllmMissingError, check_available

        try:
            check_available()
        except VllmMissingError as exc:
            raise SystemExit(f"rahf serve: {exc}") from None
    logs.configure(settings.log_level, json_lines=settings.log_json)
    keep_streams_open_on_shutdown()  # uvicorn's graceful shutdown, not sse-starlette, decides when streams end
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),  # 0 = cancel at once, never "forever"
        proxy_headers=True,
    )
    # SIGTERM: 503 for new requests while those in flight finish, then uvicorn's graceful shutdown
    draining_server(config, app, settings.shutdown_timeout_s).run()
    return 0
