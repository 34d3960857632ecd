"""Thin FastAPI routers: parse, call the serving layer or the registry, wrap the result.

Knows paths, methods and response framing (JSON or server-sent events); everything else lives in
`serving`, `registry`, `auth` and `errors`.
"""

from __future__ import annotations

from typing import Any


def served_routes(app: Any) -> list[Any]:
    """Every route `app` serves, as one flat list of the routes themselves (APIRoute and Starlette routes).

    Recent FastAPI releases keep included routers as lazy wrappers in `app.routes`; `iter_route_contexts`
    flattens them. Older releases copy the routes into `app.routes` directly.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return [context.original_route for context in iter_route_contexts(app.routes)]
