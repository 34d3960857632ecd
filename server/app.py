"""The application: `create_app(settings)` wires settings, model, profiles, engine and routes.

Knows startup and shutdown order: (1) load the model, (2) load the profile directory, (3) start the
engine, (4) mark ready; on shutdown mark not ready, let the engine finish in-flight work within the
timeout, then stop. Knows nothing about generation or HTTP details beyond assembling the pieces.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware

from steering_vectors.models import LoadedModel, load_model

from . import errors
from .auth import KeyRing
from .config import Settings
from .engine.base import Engine
from .engine.packed import pack_model
from .metrics import Metrics
from .middleware import RequestMiddleware
from .registry import ProfileRegistry
from .routes import chat, completions, health, models, profiles
from .serving import Serving

log = logging.getLogger(__name__)

EngineFactory = Callable[[LoadedModel, Settings], Engine]


def make_engine(loaded: LoadedModel, settings: Settings) -> Engine:
    """The engine the settings ask for; the continuous one is imported only when chosen."""
    common: dict[str, Any] = {
        "max_batch_size": settings.max_batch_size,
        "max_queue": settings.max_queue,
        "retry_after": settings.retry_after_s,
    }
    if settings.engine == "continuous":
        module = importlib.import_module("server.engine.continuous")
        return module.ContinuousEngine(loaded.model, fast_decode=settings.fast_decode, **common)
    from .engine.simple import SimpleEngine

    pad = getattr(loaded.tokenizer, "pad_token_id", None)
    return SimpleEngine(loaded.model, pad_token_id=int(pad) if pad is not None else 0, **common)


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only; elsewhere nothing happens).

    Loading, dequantising and packing the weights free a few hundred MB that glibc otherwise keeps
    mapped: the resident size after start varied between ~1.03 and ~1.40 GB for the default model,
    and is ~1.06 GB every time after this.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    generation = getattr(loaded.model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return frozenset(ids)


def create_app(
    settings: Settings | None = None,
    *,
    model: LoadedModel | None = None,
    engine_factory: EngineFactory | None = None,
) -> FastAPI:
    """Build the app. `model` skips loading (tests, embedding); `engine_factory` swaps the engine.

    At start the model's linears are packed in place as `settings.quantize` says (a model passed in
    is changed too; `auto` leaves float models alone).
    """
    settings = settings or Settings()
    metrics = Metrics()
    api_keys, admin_keys = settings.keys()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model
        if loaded is None:
            log.info("loading model %s", settings.model or "(embedded default)")
            loaded = await run_in_threadpool(
                load_model, settings.model, dtype=settings.dtype, device=settings.device
            )
        packing = await run_in_threadpool(
            pack_model, loaded.model, settings.quantize, settings.packed_max_rows
        )
        log.info("weights: %s", packing.summary())
        app.state.packing = packing
        registry = ProfileRegistry(settings.profile_dir, loaded.fingerprint, check_digest=settings.check_digest)
        await run_in_threadpool(registry.load_directory)
        engine = (engine_factory or make_engine)(loaded, settings)
        _return_freed_memory()
        engine.start()
        app.state.serving = Serving(
            engine=engine,
            tokenizer=loaded.tokenizer,
            registry=registry,
            settings=settings,
            model_name=settings.served_model_name or loaded.name,
            stop_token_ids=stop_token_ids(loaded),
            metrics=metrics,
        )
        metrics.bind(engine.stats, lambda: len(registry.snapshot()))
        app.state.draining = False
        log.info("ready: model %s, %d profiles", app.state.serving.model_name, len(registry.names()))
        try:
            yield
        finally:
            app.state.draining = True
            log.info("shutting down: finishing in-flight requests (up to %.0fs)", settings.shutdown_timeout_s)
            await run_in_threadpool(engine.shutdown, settings.shutdown_timeout_s)
            log.info("stopped")

    app = FastAPI(
        title="RAHF steering server",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keys = KeyRing.from_lists(api_keys, admin_keys)
    app.state.serving = None
    app.state.packing = None
    app.state.draining = False
    errors.install(app)
    for module in (chat, completions, models, profiles, health):
        app.include_router(module.router)
    app.add_middleware(
        RequestMiddleware, metrics=metrics, max_body=settings.max_body_bytes, max_upload=settings.max_profile_bytes,
        root_path=settings.root_path,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Steering", "Retry-After"],
        )
    return app
