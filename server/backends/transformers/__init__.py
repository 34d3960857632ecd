"""The `transformers` backend: a transformers causal LM on any torch device, run by the
continuous-batching engine (`engine.py`) over a slot KV cache (`cache.py`), with the lean decode step
for Llama-family models (`fastdecode.py`) and weight-only int4/int8 linears on the CPU (`packed.py`).
What differs between transformers versions is in `compat.py`.

`create(settings, model=None)` is the factory the app calls: it loads the model (unless given one), picks
the dtype for the device (`auto`: bfloat16 on CUDA, float32 elsewhere), packs the weights where the
kernels exist (CPU only; elsewhere packing is switched off with a log line), builds the engine and
returns a `Backend`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..base import Backend, check_max_model_len

log = logging.getLogger(__name__)

NAME = "transformers"


def default_dtype(device: str | torch.device) -> str:
    """The dtype `auto` means on `device`: bfloat16 on CUDA (tensor cores, half the memory traffic),
    float32 elsewhere (bfloat16 is slower than float32 on CPUs without avx512-bf16/AMX)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def stop_token_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (None: none)."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return frozenset(ids)


def create(settings: Any, *, model: Any | None = None) -> Backend:
    """Load (or take) the model, pack it as the settings say, and build the engine."""
    from steering_vectors.core.models import load_model

    from .engine import ContinuousEngine
    from .packed import pack_model

    loaded = model
    if loaded is None:
        dtype = settings.dtype if settings.dtype != "auto" else default_dtype(settings.device)
        log.info("loading model %s on %s as %s", settings.model or "(embedded default)", settings.device, dtype)
        loaded = load_model(settings.model, dtype=dtype, device=settings.device)
    wanted = getattr(settings, "max_model_len", None)
    check_max_model_len(wanted, int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0))
    packing = pack_model(loaded.model, settings.quantize, settings.packed_max_rows)
    log.info("weights: %s", packing.summary())
    engine = ContinuousEngine(
        loaded.model,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        retry_after=settings.retry_after_s,
        fast_decode=settings.fast_decode,
        max_seq_len=wanted,
    )
    if settings.fast_decode and engine.fast_decode is None:
        log.info("lean decode step off: decoding through the transformers forward")
    return Backend(
        name=NAME,
        engine=engine,
        tokenizer=loaded.tokenizer,
        fingerprint=loaded.fingerprint,
        model_name=loaded.name,
        stop_token_ids=stop_token_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None)),
        model=loaded.model,
        info={
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "quantize": packing.mode,
            "fast_decode": engine.fast_decode is not None,
        },
    )
