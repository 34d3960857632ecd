"""Dependencies shared by the routers: the serving layer and the profile registry of the running app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.responses import Response

from ..errors import APIError
from ..registry import ProfileRegistry
from ..serving import Serving


def get_serving(request: Request) -> Serving:
    serving = getattr(request.app.state, "serving", None)
    if serving is None or getattr(request.app.state, "draining", False):
        raise APIError(503, "the server is starting or shutting down", type="service_unavailable",
                       code="not_ready", headers={"Retry-After": "5"})
    return serving


def get_registry(request: Request) -> ProfileRegistry:
    return get_serving(request).registry


T = TypeVar("T")

ServingDep = Annotated[Serving, Depends(get_serving)]
RegistryDep = Annotated[ProfileRegistry, Depends(get_registry)]


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (closing its engine streams frees their
    rows at the next step) and raise ClientGone. Streams need none of this: a closed stream cancels its
    own generator."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


def client_gone_response() -> Response:
    """What a request whose client left is logged and counted as (nginx's 499); nobody receives it."""
    return Response(status_code=499)
