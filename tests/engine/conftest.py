"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from server.backends.transformers.engine import ContinuousEngine


@pytest.fixture
def make_engine(tiny_model):
    engines: list[ContinuousEngine] = []

    def make(**kwargs: object) -> ContinuousEngine:
        engine = ContinuousEngine(tiny_model, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(timeout=5)
