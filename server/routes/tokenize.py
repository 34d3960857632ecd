"""`POST /tokenize` and `POST /detokenize`, in vLLM's request and response shapes.

`/tokenize` takes a `prompt` (special tokens added by default, as for completions) or chat `messages`
(formatted with the chat template, as for chat completions) and answers the token ids, their count and
the context window; `/detokenize` turns token ids back into text.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ..auth import require_api_key
from ..errors import bad_request
from ..openapi import DETOKENIZED, TOKENIZED, json_ok, responses
from ..protocol import DetokenizeRequest, TokenizeRequest
from ..serving import parse_model_alias
from .deps import ServingDep

router = APIRouter(tags=["tokenizer"], dependencies=[Depends(require_api_key)])


@router.post("/tokenize", responses=responses(400, 401, 404, 413, 503, ok={200: json_ok(TOKENIZED)}))
async def tokenize(body: TokenizeRequest, serving: ServingDep) -> dict[str, Any]:
    if body.model is not None:
        parse_model_alias(body.model, serving.model_name)  # 404 for a model not served here
    tokens = await run_in_threadpool(serving.tokenize, body)
    strings = [serving.tokenizer.convert_ids_to_tokens(t) for t in tokens] if body.return_token_strs else None
    return {"count": len(tokens), "max_model_len": serving.engine.max_context, "tokens": tokens,
            "token_strs": strings}


@router.post("/detokenize", responses=responses(400, 401, 404, 413, 503, ok={200: json_ok(DETOKENIZED)}))
async def detokenize(body: DetokenizeRequest, serving: ServingDep) -> dict[str, Any]:
    if body.model is not None:
        parse_model_alias(body.model, serving.model_name)
    vocab = len(serving.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens")
    return {"prompt": serving.tokenizer.decode(body.tokens)}
