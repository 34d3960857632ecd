"""`POST /v1/completions` (the legacy endpoint: echo and prompt logprobs for scoring)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ..auth import require_api_key
from ..openapi import COMPLETION, COMPLETION_CHUNK, generation_ok, responses
from ..protocol import CompletionRequest
from .deps import ServingDep
from .sse import event_stream

router = APIRouter(prefix="/v1", tags=["generation"], dependencies=[Depends(require_api_key)])


@router.post(
    "/completions",
    responses=responses(400, 401, 404, 413, 429, 503, ok={200: generation_ok(COMPLETION, COMPLETION_CHUNK)}),
)
async def completions(body: CompletionRequest, serving: ServingDep) -> Response:
    prepared = serving.prepare_completion(body)
    headers = {"X-Steering": prepared.steering_header}
    if not body.stream:
        return JSONResponse(await serving.completion(body, prepared), headers=headers)
    first, rest = await serving.started(prepared)
    return event_stream(serving.completion_stream(body, prepared, first, rest), headers)
