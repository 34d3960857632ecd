"""`/v1/profiles`: list, show, upload (PUT) and delete steering profiles at run time."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from steering_vectors.errors import ProfileError
from steering_vectors.profile import Profile, validate_name

from ..auth import AdminKey, require_api_key
from ..errors import APIError, bad_request, not_found, to_api_error
from ..registry import ProfileNotFoundError
from .deps import RegistryDep

router = APIRouter(prefix="/v1/profiles", tags=["profiles"], dependencies=[Depends(require_api_key)])


def describe(profile: Profile) -> dict[str, Any]:
    return {"id": profile.name, "object": "profile", **profile.summary()}


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except ProfileError as exc:
        raise bad_request(str(exc), "name", code="invalid_profile_name") from None


@router.get("")
async def list_profiles(registry: RegistryDep) -> dict[str, Any]:
    profiles = registry.snapshot()
    return {
        "object": "list",
        "data": [describe(profiles[name]) for name in sorted(profiles)],
        "skipped": [{"path": s.path, "reason": s.reason} for s in registry.skipped],
    }


@router.get("/{name}")
async def get_profile(name: str, registry: RegistryDep) -> dict[str, Any]:
    try:
        return describe(registry.get(_name(name)))
    except ProfileNotFoundError as exc:
        raise not_found(str(exc), "name", code="profile_not_found") from None


async def _upload_bytes(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        for value in form.values():
            if hasattr(value, "read"):
                return await value.read()
        raise bad_request("the form has no file part", "file", code="missing_required_parameter")
    return await request.body()


@router.put("/{name}")
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
    return JSONResponse(describe(profile), status_code=201 if created else 200)


@router.delete("/{name}")
async def delete_profile(name: str, registry: RegistryDep, _: AdminKey) -> dict[str, Any]:
    try:
        await run_in_threadpool(registry.delete, _name(name))
    except ProfileNotFoundError as exc:
        raise not_found(str(exc), "name", code="profile_not_found") from None
    return {"id": name, "object": "profile", "deleted": True}


@router.post("/-/reload", include_in_schema=True)
async def reload_profiles(registry: RegistryDep, _: AdminKey) -> dict[str, Any]:
    """Re-read the profile directory (files changed by hand or by another process)."""
    try:
        skipped = await run_in_threadpool(registry.load_directory)
    except OSError as exc:
        raise APIError(500, f"cannot read the profile directory: {exc}", type="server_error") from None
    return {"object": "list", "data": registry.names(), "skipped": [s.path for s in skipped]}
