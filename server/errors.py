"""The one place where errors become HTTP: the OpenAI error envelope and its status codes.

Knows the library's and the engine's typed errors, request validation errors and the envelope
`{"error": {"message", "type", "param", "code"}}`. Routes and the serving layer raise; this module
decides the status. Knows nothing about models or generation.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from steering_vectors.core.errors import (
    ModelNotFoundError,
    PlanError,
    ProfileError,
    ProfileFormatError,
    ProfileLayerError,
    ProfileMismatchError,
    ProfileShapeError,
    ProfileValueError,
    SteeringError,
)

from .backends.base import EngineError, EngineOverloadedError, EngineShutdownError
from .registry import ProfileStoreReadOnlyError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and envelope fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.param, self.code)


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, type="not_found_error", param=param, code=code)


def to_api_error(exc: BaseException, *, param: str | None = None) -> APIError:
    """Map any exception to an APIError; unknown exceptions become a 500 without internals."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ProfileStoreReadOnlyError):
        return APIError(403, str(exc), type="permission_error", code="profile_store_read_only")
    if isinstance(exc, EngineOverloadedError):
        retry = max(1, math.ceil(exc.retry_after))
        return APIError(
            429, str(exc), type="rate_limit_error", code="overloaded", headers={"Retry-After": str(retry)}
        )
    if isinstance(exc, EngineShutdownError):
        return APIError(
            503, str(exc) or "the server is shutting down", type="service_unavailable",
            code="shutting_down", headers={"Retry-After": "5"},
        )
    if isinstance(exc, (ProfileShapeError, ProfileLayerError, ProfileMismatchError)):
        return APIError(422, str(exc), param=param, code="profile_mismatch")
    if isinstance(exc, (ProfileFormatError, ProfileValueError)):
        return APIError(400, str(exc), param=param, code="invalid_profile")
    if isinstance(exc, ProfileError):
        return APIError(400, str(exc), param=param, code="invalid_profile")
    if isinstance(exc, ModelNotFoundError):
        return APIError(503, str(exc), type="service_unavailable", code="model_not_loaded",
                        headers={"Retry-After": "5"})
    if isinstance(exc, PlanError):
        return APIError(400, str(exc), param=param or "steering", code="invalid_steering")
    if isinstance(exc, SteeringError):
        return APIError(400, str(exc), param=param)
    log.exception("internal error", exc_info=exc)
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


_UNION_TAG = re.compile(r"^([A-Z]\w*|\w+\[.*\]|str|int|float|bool|none|function-.*)$")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # drop pydantic's union-branch tags ("str", "list[...]", "SteeringEntry") and validator markers;
    # the API's own field names are snake_case
    clean = [p for p in parts if not _UNION_TAG.match(p)]
    if not clean:
        return None
    text = clean[0]
    for part in clean[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    param = _loc_to_param(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported parameter: {param}", param=param, code="unsupported_parameter")
    if kind == "missing" and param is None:  # no body at all
        return APIError(400, "the request body is empty: send a JSON object", code="missing_required_parameter")
    if kind == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{message}", param=param, code="invalid_value")


_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def allowed_methods(request: Request) -> list[str]:
    """The methods some route answers at this request's path (every route, not only the first that matched
    the path, which is all Starlette's own 405 names), plus OPTIONS."""
    methods: set[str] = set()
    from .routes import served_routes

    for route in served_routes(request.app):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m)) + ["OPTIONS"]


def install(app: FastAPI) -> None:
    """Register handlers so every error leaves the app as an envelope."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allow = ", ".join(allowed_methods(request))
            if request.method == "OPTIONS":  # what this resource supports, not an error
                return Response(status_code=204, headers={"Allow": allow})
            headers["Allow"] = allow
        kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed here; allowed: {headers['Allow']}"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        code = "request_too_large" if exc.status_code == 413 else None  # as the middleware's own 413
        return JSONResponse(envelope(message, kind, None, code), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(SteeringError)
    async def _library(request: Request, exc: SteeringError) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))
