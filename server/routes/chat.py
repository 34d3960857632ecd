"""`POST /v1/chat/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ..auth import require_api_key
from ..protocol import ChatCompletionRequest
from .deps import ServingDep
from .sse import event_stream

router = APIRouter(prefix="/v1", tags=["generation"], dependencies=[Depends(require_api_key)])


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, serving: ServingDep) -> Response:
    prepared = serving.prepare_chat(body)
    headers = {"X-Steering": prepared.steering_header}
    if not body.stream:
        return JSONResponse(await serving.chat_completion(body, prepared), headers=headers)
    first, rest = await serving.started(prepared)
    return event_stream(serving.chat_stream(body, prepared, first, rest), headers)
