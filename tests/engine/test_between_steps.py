"""`run_between_steps`: work on the engine's model (a profile fit's forward passes) interleaved with the
steps of running requests, one piece per step, on the engine's own thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.backends.base import EngineShutdownError, GenerationRequest, SamplingParams
from server.backends.transformers.engine import ContinuousEngine


@pytest.fixture
def engine(tiny_model):
    engine = ContinuousEngine(tiny_model, max_batch_size=2, max_queue=2)
    engine.start()
    yield engine
    engine.shutdown(timeout=5)


def test_one_piece_of_work_runs_after_each_step_of_a_running_request(engine) -> None:
    seen: list[int] = []  # tokens the running request had when each piece ran

    def piece() -> str:
        seen.append(len(engine._running[0].output_ids) if engine._running else -1)
        return threading.current_thread().name

    async def scenario() -> list[str]:
        stream = engine.generate(GenerationRequest("long", [1, 17, 99, 23], SamplingParams(300, temperature=0.0)))
        await stream.__anext__()  # the request is running
        names = await asyncio.gather(*(engine.run_between_steps(piece) for _ in range(8)))
        await stream.aclose()
        return list(names)

    names = asyncio.run(scenario())
    assert names == ["rahf-engine"] * 8
    assert all(count > 0 for count in seen)
    # exactly one decode step (one token) between two pieces: the request never waits for more than one
    assert [b - a for a, b in zip(seen, seen[1:], strict=False)] == [1] * 7


def test_work_runs_on_an_idle_engine_and_errors_reach_the_caller(engine) -> None:
    async def scenario() -> None:
        assert await engine.run_between_steps(lambda: 41 + 1) == 42
        with pytest.raises(ZeroDivisionError):
            await engine.run_between_steps(lambda: 1 / 0)
        # the engine still serves requests
        events = [e async for e in engine.generate(GenerationRequest("a", [1, 5], SamplingParams(3, temperature=0.0)))]
        assert sum(len(e.token_ids) for e in events) == 3

    asyncio.run(scenario())


def test_no_work_is_taken_after_shutdown(tiny_model) -> None:
    engine = ContinuousEngine(tiny_model, max_batch_size=1)
    engine.start()
    engine.shutdown(timeout=5)

    async def scenario() -> None:
        with pytest.raises(EngineShutdownError):
            await engine.run_between_steps(lambda: 1)

    asyncio.run(scenario())
