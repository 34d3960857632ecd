"""The application: `create_app(settings)` wires settings, backend, profiles and routes.

Knows startup and shutdown order: (1) create the backend the settings name (it loads its model and
builds its engine), (2) load the profile directory against the model's fingerprint, (3) start the
engine, (4) mark ready; on shutdown mark not ready, let the engine finish in-flight work within the
timeout, then stop. Knows nothing about models, generation or HTTP details beyond assembling the pieces.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware

from steering_vectors.core.models import LoadedModel

from . import errors
from .auth import KeyRing
from .backends import create_backend
from .backends.base import Backend
from .config import Settings
from .metrics import Metrics
from .middleware import InFlight, RequestMiddleware
from .openapi import build_openapi
from .profile_watch import ProfileWatcher
from .registry import ProfileRegistry
from .routes import chat, completions, docs, fit, health, models, playground, profiles, tokenize
from .serving import Serving

log = logging.getLogger(__name__)

BackendFactory = Callable[[Settings], Backend]


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


def create_app(
    settings: Settings | None = None,
    *,
    model: LoadedModel | None = None,
    backend_factory: BackendFactory | None = None,
) -> FastAPI:
    """Build the app. `model`: an already loaded model for the backend (tests, embedding; the
    `transformers` backend packs its linears in place as `settings.quantize` says). `backend_factory`
    replaces `create_backend` (tests)."""
    settings = settings or Settings()
    metrics = Metrics(settings.served_model_name or "")
    api_keys, admin_keys = settings.keys()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        factory = backend_factory or partial(create_backend, model=model)
        log.info("starting backend %s", settings.backend)
        backend = await run_in_threadpool(factory, settings)
        app.state.backend = backend
        registry = ProfileRegistry(settings.profile_dir, backend.fingerprint, check_digest=settings.check_digest,
                                   writable=settings.profile_uploads)
        await run_in_threadpool(registry.load_directory)
        watcher = None
        if registry.directory is not None:
            watcher = ProfileWatcher(registry, rescan_s=settings.profile_rescan_s, events=settings.profile_watch)
            watcher.start()
        engine = backend.engine
        _return_freed_memory()
        engine.start()
        app.state.serving = Serving(
            engine=engine,
            tokenizer=backend.tokenizer,
            registry=registry,
            settings=settings,
            model_name=settings.served_model_name or backend.model_name,
            stop_token_ids=backend.stop_token_ids,
            metrics=metrics,
        )
        metrics.model_name = app.state.serving.model_name
        metrics.bind(engine.stats, lambda: len(registry.snapshot()))
        app.state.draining = False
        log.info("ready: model %s, %d profiles", app.state.serving.model_name, len(registry.names()))
        try:
            yield
        finally:
            app.state.draining = True
            log.info("shutting down: finishing in-flight requests (up to %.0fs)", settings.shutdown_timeout_s)
            await run_in_threadpool(engine.shutdown, settings.shutdown_timeout_s)
            if watcher is not None:
                await run_in_threadpool(watcher.stop)
            log.info("stopped")

    app = FastAPI(
        title="RAHF steering server",
        version="0.1.0",
        description="OpenAI-compatible chat and completions with per-request steering profiles.",
        lifespan=lifespan,
        # served by routes/docs.py behind the API key, from build_openapi
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        serving = app.state.serving
        vocab = len(serving.tokenizer) if serving is not None else None
        schema = build_openapi(app, settings, vocab=vocab)
        fit.document(schema, settings, app.state.backend.fingerprint.num_layers if serving is not None else None,
                     serving.tokenizer if serving is not None else None)
        if serving is not None:  # complete once the model is loaded: keep it
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keys = KeyRing.from_lists(api_keys, admin_keys)
    app.state.serving = None
    app.state.backend = None
    app.state.draining = False
    app.state.in_flight = InFlight()
    errors.install(app)
    for module in (chat, completions, models, profiles, fit, tokenize, health, docs):
        app.include_router(module.router)
    if settings.playground:
        app.include_router(playground.router)
    app.add_middleware(
        RequestMiddleware, metrics=metrics, max_body=settings.max_body_bytes, max_upload=settings.max_profile_bytes,
        root_path=settings.root_path, in_flight=app.state.in_flight,
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
