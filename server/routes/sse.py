"""Server-sent-event framing of a chunk stream: JSON chunks, an error envelope on failure, `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from sse_starlette import EventSourceResponse

from ..errors import to_api_error


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
    # A client that disconnects cancels this generator; closing `chunks` closes the engine stream.
    try:
        async with aclosing(chunks) as stream:  # type: ignore[type-var]
            async for chunk in stream:
                yield {"data": json.dumps(chunk, ensure_ascii=False)}
    except Exception as exc:
        yield {"data": json.dumps(to_api_error(exc).body())}
    yield {"data": "[DONE]"}


def event_stream(chunks: AsyncIterator[dict[str, Any]], headers: dict[str, str]) -> EventSourceResponse:
    return EventSourceResponse(_events(chunks), headers=headers, ping=15)
