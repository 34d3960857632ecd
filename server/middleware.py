"""ASGI middleware: request ids, body-size limits, per-request metrics and access logs.

Knows the raw ASGI messages; knows nothing about routes beyond the path used to label metrics. Pure
ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a client disconnect
reaches the route's generator.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs
from .errors import envelope
from .metrics import Metrics

log = logging.getLogger("server.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# metric labels take the methods HTTP defines; anything else a client sends counts as "other", so
# that made-up methods cannot grow the metrics without bound
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class InFlight:
    """HTTP requests being served, and of those the ones that arrived before draining began (what a
    graceful stop waits for; requests that arrive while draining are answered 503 at once)."""

    def __init__(self) -> None:
        self.total = 0
        self.before_drain = 0


class RequestMiddleware:
    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, max_body: int, max_upload: int, root_path: str = "",
        in_flight: InFlight | None = None,
    ) -> None:
        self.app = app
        self.root_path = root_path
        self.metrics = metrics
        self.max_body = max_body
        self.max_upload = max_upload
        self.in_flight = in_flight or InFlight()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.root_path and not scope.get("root_path"):
            # served under a prefix: routing strips it from paths that carry it
            scope = {**scope, "root_path": self.root_path}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        method = scope["method"]
        path = scope.get("path", "")
        limit = self.max_upload if method == "PUT" and "/v1/profiles/" in path else self.max_body
        started = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "sent": False}
        app_state = getattr(scope.get("app"), "state", None)
        counted = not getattr(app_state, "draining", False)
        self.in_flight.total += 1
        self.in_flight.before_drain += counted

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["sent"] = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"the request body exceeds {limit} bytes")
            return message

        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await _reject(send_with_id, 413, f"the request body exceeds {limit} bytes")
                return
            await self.app(scope, limited_receive, send_with_id)
        except HTTPException as exc:  # raised from the body reader outside any route's handler
            if state["sent"]:
                raise
            await _reject(send_with_id, exc.status_code, str(exc.detail))
        finally:
            self.in_flight.total -= 1
            self.in_flight.before_drain -= counted
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method_label = method if method in _METHODS else "other"
            self.metrics.requests.labels(route=label, method=method_label, status=str(state["status"])).inc()
            self.metrics.latency.labels(route=label).observe(elapsed)
            log.info("%s %s %s %.3fs", method, path, state["status"], elapsed,
                     extra={"method": method, "path": path, "status": state["status"],
                            "duration_s": round(elapsed, 4)})
            logs.request_id.reset(token)


async def _reject(send: Send, status: int, message: str) -> None:
    body = json.dumps(envelope(message, "invalid_request_error", None, "request_too_large")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
