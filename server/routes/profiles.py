"""`/v1/profiles`: list, show, upload (PUT) and delete steering profiles at run time."""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from steering_vectors.core.errors import ProfileError
from steering_vectors.core.profile import Profile, validate_name

from ..auth import AdminKey, require_api_key
from ..errors import APIError, bad_request, not_found, to_api_error
from ..openapi import PROFILE, PROFILE_DELETED, PROFILE_LIST, RELOADED, UPLOAD_BODY, UPLOAD_INVALID, json_ok, responses
from ..registry import ProfileNotFoundError, content_digest
from .deps import RegistryDep

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/profiles", tags=["profiles"], dependencies=[Depends(require_api_key)])


def describe(profile: Profile, digest: str | None = None) -> dict[str, Any]:
    """A profile as the API shows it; `digest`: the sha256 of its file (which version this replica serves)."""
    if digest is None:  # not from the store: the digest its file will have once stored
        digest = content_digest(profile.to_bytes())
    return {"id": profile.name, "object": "profile", "digest": digest, **profile.summary()}


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def store_error(exc: OSError, doing: str) -> APIError:
    """An I/O failure of the profile store as an error that names no path (the log has the details)."""
    log.error("profile store: cannot %s: %s", doing, exc)
    if exc.errno in _NO_SPACE:
        return APIError(507, f"the profile store is out of space: cannot {doing}; the stored profiles are unchanged",
                        type="server_error", code="insufficient_storage")
    return APIError(500, f"the profile store failed: cannot {doing} (see the server log)", type="server_error",
                    code="profile_store_error")


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except ProfileError as exc:
        raise bad_request(str(exc), "name", code="invalid_profile_name") from None


@router.get("", responses=responses(401, 503, ok={200: json_ok(PROFILE_LIST)}))
async def list_profiles(registry: RegistryDep) -> dict[str, Any]:
    try:
        await run_in_threadpool(registry.rescan)  # the directory as it is now, whatever wrote it
    except OSError as exc:  # unreadable now: the last view (the reload route reports the failure)
        log.warning("profile store: cannot rescan the profile directory: %s", exc)
    state = registry.state()
    return {
        "object": "list",
        "data": [describe(entry.profile, entry.digest) for entry in state.entries.values()],
        "skipped": [{"path": s.path, "reason": s.reason} for s in state.skipped],
    }


@router.get("/{name}", responses=responses(400, 401, 404, 503, ok={200: json_ok(PROFILE)}))
async def get_profile(name: str, registry: RegistryDep) -> dict[str, Any]:
    try:
        entry = await run_in_threadpool(registry.entry, _name(name))
    except ProfileNotFoundError as exc:
        raise not_found(str(exc), "name", code="profile_not_found") from None
    return describe(entry.profile, entry.digest)


async def _upload_bytes(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            async with request.form(max_files=1, max_fields=16) as form:
                for value in form.values():
                    if hasattr(value, "read"):
                        return await value.read()
        except OSError as exc:  # the form's file part is spooled to a temporary file beyond 1 MiB
            raise store_error(exc, "receive the upload") from None
        raise bad_request("the form has no file part", "file", code="missing_required_parameter")
    return await request.body()


@router.put(
    "/{name}",
    responses=responses(400, 401, 403, 413, 422, 500, 503, 507, ok={
        200: json_ok(PROFILE, "replaced"), 201: json_ok(PROFILE, "created")}, why={400: UPLOAD_INVALID}),
    openapi_extra={"requestBody": UPLOAD_BODY},
)
async def put_profile(name: str, request: Request, registry: RegistryDep, _: AdminKey) -> JSONResponse:
    name = _name(name)
    data = await _upload_bytes(request)
    if not data:
        raise bad_request("the request body is empty: send a profile safetensors file or a GGUF control vector",
                          "body", code="missing_required_parameter")
    try:
        profile, created = await run_in_threadpool(registry.put, name, data)
    except ProfileError as exc:
        raise to_api_error(exc, param="body") from None
    except OSError as exc:
        raise store_error(exc, f"store profile {name!r}") from None
    return JSONResponse(describe(profile, registry.state().digest(name)), status_code=201 if created else 200)


@router.delete("/{name}", responses=responses(400, 401, 403, 404, 500, 503, ok={200: json_ok(PROFILE_DELETED)}))
async def delete_profile(name: str, registry: RegistryDep, _: AdminKey) -> dict[str, Any]:
    try:
        await run_in_threadpool(registry.delete, _name(name))
    except ProfileNotFoundError as exc:
        raise not_found(str(exc), "name", code="profile_not_found") from None
    except OSError as exc:
        raise store_error(exc, f"delete profile {name!r}") from None
    return {"id": name, "object": "profile", "deleted": True}


@router.post("/-/reload", responses=responses(401, 403, 500, 503, ok={200: json_ok(RELOADED)}))
async def reload_profiles(registry: RegistryDep, _: AdminKey) -> dict[str, Any]:
    """Re-read the profile directory (files changed by hand or by another process)."""
    try:
        skipped = await run_in_threadpool(registry.load_directory)
    except OSError as exc:
        raise store_error(exc, "read the profile directory") from None
    return {"object": "list", "data": registry.names(), "skipped": [s.path for s in skipped]}
