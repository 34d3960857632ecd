"""Bearer-token authentication: API keys for the API, admin keys for profile changes.

Knows the keys (from `Settings.keys()`), compares them in constant time and never logs them. With no
API keys the API is open; with no keys at all profile changes are open too; with API keys but no
admin keys, profile changes are refused to everyone. Admin keys also work as API keys.
Knows nothing about routes beyond the two FastAPI dependencies it offers.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .errors import APIError


@dataclass(frozen=True)
class KeyRing:
    api: tuple[bytes, ...]
    admin: tuple[bytes, ...]

    @classmethod
    def from_lists(cls, api: list[str], admin: list[str]) -> KeyRing:
        return cls(tuple(k.encode() for k in api), tuple(k.encode() for k in admin))

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def __repr__(self) -> str:  # never show keys
        return f"KeyRing(api={len(self.api)}, admin={len(self.admin)})"


def _matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:  # no early exit: the time taken does not tell which key came close
        found |= hmac.compare_digest(token, key)
    return found


def _bearer(request: Request) -> bytes | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request) -> None:
    keys: KeyRing = request.app.state.keys
    if not keys.api:
        return
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not _matches(token, keys.api + keys.admin):
        raise _unauthorized("invalid API key")


def require_admin_key(request: Request) -> None:
    keys: KeyRing = request.app.state.keys
    if not keys.enabled:
        return
    token = _bearer(request)
    if token is not None and _matches(token, keys.admin):
        return
    if token is None or not _matches(token, keys.api):
        raise _unauthorized("changing profiles needs an admin key: send 'Authorization: Bearer <admin key>'")
    raise APIError(403, "changing profiles needs an admin key", type="permission_error", code="admin_key_required")


ApiKey = Annotated[None, Depends(require_api_key)]
AdminKey = Annotated[None, Depends(require_admin_key)]
