"""Dependencies shared by the routers: the serving layer and the profile registry of the running app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

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


ServingDep = Annotated[Serving, Depends(get_serving)]
RegistryDep = Annotated[ProfileRegistry, Depends(get_registry)]
