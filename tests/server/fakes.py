"""A scripted engine for error-path tests: no model, events and failures on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.backends.base import Engine, EngineEvent, GenerationRequest


class ScriptedEngine(Engine):
    """Yields one token per step from `tokens`, then raises `fail` (if given) or finishes."""

    def __init__(self, tokens: list[int], fail: BaseException | None = None, fail_at_start: bool = False) -> None:
        self.tokens = tokens
        self.fail = fail
        self.fail_at_start = fail_at_start
        self.requests: list[GenerationRequest] = []
        self.closed = 0

    def start(self) -> None:
        pass

    def shutdown(self, timeout: float = 30.0) -> None:
        pass

    @property
    def max_context(self) -> int:
        return 512

    def stats(self) -> dict[str, int]:
        return {"running": 0, "waiting": 0}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        self.requests.append(request)
        try:
            if self.fail_at_start and self.fail is not None:
                raise self.fail
            for token in self.tokens:
                yield EngineEvent(token_ids=[token])
            if self.fail is not None:
                raise self.fail
            yield EngineEvent(finish_reason="length")
        finally:
            self.closed += 1
