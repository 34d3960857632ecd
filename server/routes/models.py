"""`GET /v1/models`: the base model and one `<base>:<profile>` alias per loaded profile."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..auth import require_api_key
from ..errors import not_found
from ..openapi import MODEL, MODEL_LIST, json_ok, responses
from .deps import ServingDep

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


def _entries(serving: ServingDep) -> list[dict[str, Any]]:
    base = serving.model_name
    entries = [{"id": base, "object": "model", "created": 0, "owned_by": "rahf", "root": base, "parent": None}]
    for name in serving.registry.names():
        entries.append(
            {"id": f"{base}:{name}", "object": "model", "created": 0, "owned_by": "rahf", "root": base,
             "parent": base, "profile": name}
        )
    return entries


@router.get("/models", responses=responses(401, 503, ok={200: json_ok(MODEL_LIST)}))
async def list_models(serving: ServingDep) -> dict[str, Any]:
    return {"object": "list", "data": _entries(serving)}


@router.get("/models/{model_id:path}", responses=responses(401, 404, 503, ok={200: json_ok(MODEL)}))
async def get_model(model_id: str, serving: ServingDep) -> dict[str, Any]:
    for entry in _entries(serving):
        if entry["id"] == model_id:
            return entry
    raise not_found(f"model {model_id!r} is not served here", param="model", code="model_not_found")
