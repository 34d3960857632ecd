"""Backends: each one owns a model and the engine that runs it.

A backend is a package `server/backends/<name>/` whose `create(settings, *, model=None)` loads (or takes)
its model and returns a `base.Backend`: the engine, the tokenizer, the model's fingerprint and what
`/readyz` reports. The app picks one by `settings.backend` (`--backend`, `RAHF_BACKEND`); the HTTP side
talks to `base.Engine` only. `transformers` (continuous batching over a transformers model, with the
lean decode step and packed CPU weights) is the one shipped. docs/architecture.md says how to add one.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .base import Backend

DEFAULT_BACKEND = "transformers"


def available() -> list[str]:
    """Names of the backend packages beside this file (nothing is imported)."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)


def create_backend(settings: Any, *, model: Any | None = None) -> Backend:
    """The backend `settings.backend` names, created from the settings. `model`: an already loaded model
    for backends that can take one (`steering_vectors.core.models.LoadedModel` for `transformers`)."""
    name = settings.backend
    if name not in available():
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.create(settings, model=model)
