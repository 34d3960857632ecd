"""`/playground`: the steering playground, a static page shipped in the package (`server/playground/`).

Serves three files: the page (with the root path it is served under written into it, so that its asset
and API URLs work behind a gateway's prefix), its script and its style sheet. The page holds no data and
no key: it calls the API from the browser with the key typed into it, so the page itself is open, like
`/healthz`, and the API routes keep their own key checks (a fit needs an admin key). Not part of the API
description. `RAHF_PLAYGROUND=false` leaves the router out.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter(tags=["playground"], include_in_schema=False)

_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # the page loads nothing from elsewhere and talks only to this server
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


@cache
def _asset(name: str) -> str:
    return resources.files("server").joinpath("playground", name).read_text(encoding="utf-8")


def _file(name: str, media_type: str) -> Response:
    return Response(_asset(name), media_type=media_type, headers=_HEADERS)


@router.get("/playground")
@router.get("/playground/")
async def page(request: Request) -> Response:
    root = request.scope.get("root_path", "").rstrip("/")
    text = _asset("index.html").replace("__ROOT__", html.escape(root, quote=True))
    return Response(text, media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/playground/playground.js")
async def script() -> Response:
    return _file("playground.js", "text/javascript; charset=utf-8")


@router.get("/playground/playground.css")
async def style() -> Response:
    return _file("playground.css", "text/css; charset=utf-8")
