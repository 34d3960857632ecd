"""`POST /v1/chat/completions`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..auth import require_api_key
from ..openapi import CHAT_CHUNK, CHAT_COMPLETION, generation_ok, responses
from ..protocol import ChatCompletionRequest
from .deps import ClientGone, ServingDep, client_gone_response, unless_client_leaves
from .sse import event_stream

router = APIRouter(prefix="/v1", tags=["generation"], dependencies=[Depends(require_api_key)])


@router.post(
    "/chat/completions",
    responses=responses(400, 401, 404, 413, 429, 503, ok={200: generation_ok(CHAT_COMPLETION, CHAT_CHUNK)}),
)
async def chat_completions(body: ChatCompletionRequest, serving: ServingDep, request: Request) -> Response:
    await serving.compile_response_format(body)  # off the event loop; prepare_chat finds it compiled
    prepared = serving.prepare_chat(body)
    headers = {"X-Steering": prepared.steering_header}
    if not body.stream:
        try:
            result = await unless_client_leaves(request, serving.chat_completion(body, prepared))
        except ClientGone:
            return client_gone_response()
        return JSONResponse(result, headers=headers)
    first, rest = await serving.started(prepared)
    return event_stream(serving.chat_stream(body, prepared, first, rest), headers)
