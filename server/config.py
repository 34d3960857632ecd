"""Server settings: one validated class, read from `RAHF_*` environment variables and CLI flags.

Knows every knob of the service and its defaults; knows nothing about how they are used. The app
receives a `Settings` instance; nothing reads the environment behind its back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .protocol import REPETITION_PENALTY


def _split_list(value: object) -> object:
    """Accept a comma-separated string (from the environment) or a JSON-ish list."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the server can be configured with; env vars are the field names prefixed `RAHF_`."""

    model_config = SettingsConfigDict(env_prefix="RAHF_", extra="ignore", protected_namespaces=())

    # model and profiles
    model: str | None = Field(None, description="local model directory; None = the embedded default")
    served_model_name: str | None = Field(None, description="name clients use; default: the model's name")
    profile_dir: Path | None = Field(None, description="profile store; None = in-memory only")
    check_digest: bool = Field(True, description="refuse profiles made for other weights or tokenizers")
    profile_uploads: bool = Field(
        True, description="accept profile uploads and deletes; off on replicas that only read a shared directory"
    )
    profile_watch: bool = Field(True, description="watch the profile directory for file events")
    profile_rescan_s: float = Field(
        5.0, gt=0, le=3600, description="rescan the profile directory this often (the fallback without events)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 elsewhere"
    )
    device: str = "cpu"
    backend: str = Field("transformers", description="the backend package in server/backends/ that runs the model")
    quantize: Literal["auto", "none", "int4", "int8"] = Field(
        "auto", description="weight-only packed linears for CPU decoding (auto: int4 when lossless; off elsewhere)"
    )
    packed_max_rows: int = Field(
        16, ge=0, description="calls with more rows than this (prefill, big batches) use the float weights"
    )
    fast_decode: bool = Field(
        True, description="lean decode step for Llama-family models (checked against transformers at start)"
    )

    # the vllm backend (--backend vllm; docs/engine.md, "The vLLM backend"); max_model_len, max_batch_size (vLLM's
    # max_num_seqs) and dtype above apply to it too
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs one model is split over (tensor parallel)")
    vllm_pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: pipeline stages (layers split over GPUs)")
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM: share of each GPU's memory for weights, activations and KV cache"
    )
    vllm_max_profiles: int = Field(
        16, ge=1, le=256, description="vLLM: profile slots on every worker (profiles used at once by running requests)"
    )
    vllm_kv_cache_gib: float = Field(2.0, gt=0, description="vLLM on CPUs: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    vllm_engine_args: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="vLLM: other engine arguments, a JSON object (EngineArgs field names)"
    )

    # network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    root_path: str = Field("", description="path prefix when served behind a proxy, e.g. /rahf")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    playground: bool = Field(True, description="serve the steering playground page at /playground")

    # auth
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    keys_file: Path | None = Field(None, description="lines 'KEY' (API key) or 'admin:KEY'; '#' comments")

    # limits
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest JSON request body")
    max_profile_bytes: int = Field(64 * 1_048_576, ge=1024, description="largest profile upload")
    max_model_len: int | None = Field(
        None, ge=2, description="context window: prompt plus generated tokens (default: the model's, at most 2048)"
    )
    default_max_tokens: int = Field(256, ge=1)
    default_repetition_penalty: float = Field(
        1.0, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1],
        description="repetition_penalty of requests that set none (1: off), where no profile acting on the request "
        "carries one (a profile's decoding defaults come first); 1.15 stops the loops of the default model's greedy "
        "replies (docs/bench-repetition.md)",
    )  # fmt: skip
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(8, ge=1, description="largest n (choices per prompt)")
    max_batch_size: int = Field(16, ge=1, description="rows one engine step runs together (concurrency)")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond the running ones; then 429")
    retry_after_s: float = Field(1.0, gt=0)
    strength_min: float = -20.0
    strength_max: float = 20.0
    shutdown_timeout_s: float = Field(30.0, ge=0)

    log_level: str = "info"
    log_json: bool = True

    @field_validator("cors_origins", "api_keys", "admin_keys", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("vllm_engine_args", mode="before")
    @classmethod
    def _engine_args(cls, value: object) -> object:
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"vllm_engine_args is not a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("vllm_engine_args must be a JSON object of vLLM engine arguments")
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        from .backends import available  # lists the folders; imports no backend

        if value not in available():
            raise ValueError(f"unknown backend {value!r}; available: {', '.join(available())}")
        return value

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith("/"):
            value = "/" + value
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Settings:
        if not (math.isfinite(self.strength_min) and math.isfinite(self.strength_max)):
            raise ValueError("strength bounds must be finite")
        if self.strength_min > self.strength_max:
            raise ValueError("strength_min must not exceed strength_max")
        return self

    def keys(self) -> tuple[list[str], list[str]]:
        """(API keys, admin keys) from the settings and the keys file. Admin keys also act as API keys."""
        api = [k.get_secret_value() for k in self.api_keys if k.get_secret_value()]
        admin = [k.get_secret_value() for k in self.admin_keys if k.get_secret_value()]
        if self.keys_file is not None:
            for raw in Path(self.keys_file).read_text(encoding="utf-8").splitlines():
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("admin:"):
                    admin.append(line[len("admin:") :].strip())
                elif line.startswith("api:"):
                    api.append(line[len("api:") :].strip())
                else:
                    api.append(line)
        return api, admin
