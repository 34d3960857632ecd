"""`GET /v1/models`: the base model and one `<base>:<profile>` alias per loaded profile."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ..auth import require_api_key
from ..errors import not_found
from ..openapi import MODEL, MODEL_LIST, json_ok, responses
from .deps import ServingDep

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


async def _entries(serving: ServingDep) -> list[dict[str, Any]]:
    base = serving.model_name
    entries = [{"id": base, "object": "model", "created": 0, "owned_by": "rahf", "root": base, "parent": None,
                "max_model_len": serving.engine.max_context}]
    with contextlib.suppress(OSError):  # an unreadable store: the last view (the profile routes report it)
        await run_in_threadpool(serving.registry.rescan)  # the profile directory as it is now
    for name, profile in serving.registry.state().entries.items():
        entries.append(
            {"id": f"{base}:{name}", "object": "model", "created": 0, "owned_by": "rahf", "root": base,
             "parent": base, "max_model_len": serving.engine.max_context, "profile": name,
             "digest": profile.digest}
        )
    return entries


@router.get("/models", responses=responses(401, 503, ok={200: json_ok(MODEL_LIST)}))
async def list_models(serving: ServingDep) -> dict[str, Any]:
    return {"object": "list", "data": await _entries(serving)}


@router.get("/models/{model_id:path}", responses=responses(401, 404, 503, ok={200: json_ok(MODEL)}))
async def get_model(model_id: str, serving: ServingDep) -> dict[str, Any]:
    for entry in await _entries(serving):
        if entry["id"] == model_id:
            return entry
    raise not_found(f"model {model_id!r} is not served here", param="model", code="model_not_found")
