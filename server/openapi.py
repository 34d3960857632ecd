"""The API description served at `/openapi.json`: what the server really answers and really accepts.

FastAPI generates the skeleton from the routes and the request models; this module makes it true:

- every operation lists the statuses it answers (the routes declare them with `responses(...)`), each
  error with the OpenAI envelope's schema, and never FastAPI's default 422 validation error (request
  validation errors are 400s here);
- request schemas carry what the server checks beyond the models' types: the settings' bounds (`n`,
  `max_tokens`, strengths, token ids, prompts per request), profile-name patterns, messages that need
  `content`, and the OpenAI parameters accepted only at their "nothing" value;
- the profile upload body (raw bytes or a multipart file part), server-sent-event streams and the
  Prometheus text of `/metrics` have their media types;
- `security` is declared on exactly the operations that need a key under the running settings.

Built per app from its settings (and, once the model is loaded, its vocabulary size); cached once the
server is ready. Knows nothing about how requests are served.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fastapi.openapi.utils import get_openapi

from .auth import require_admin_key, require_api_key
from .protocol import JSON_SCHEMA_NAME, POSITION_MODES, REPETITION_PENALTY, SEED_RANGE
from .routes import served_routes

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI
    from fastapi.routing import APIRoute

    from .config import Settings

# profile names: 1-64 letters, digits, `_ . -`, starting with a letter or digit, no `..` (written without
# look-ahead so that every regex engine, and schema-driven generators, read it the same way)
PROFILE_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_\-]|\.[A-Za-z0-9_\-])*\.?$"
PROFILE_NAME_MAX = 64

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_ERROR_SCHEMA = {
    "type": "object",
    "description": "The OpenAI error envelope.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"], "description": "the request field the error is about"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_HEADER_STRING = {"schema": {"type": "string"}}
_ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Invalid request: a parameter (named in `param`) is invalid or unsupported, the body is empty or not "
          "JSON, the prompt does not fit the context window (`code: context_length_exceeded`), or the upload "
          "is not a profile file", {}),
    401: ("Missing or invalid API key", {"WWW-Authenticate": {**_HEADER_STRING, "required": True}}),
    403: ("The key is valid but the operation needs an admin key, or this replica serves its profile directory "
          "read-only (`code: profile_store_read_only`)", {}),
    404: ("Unknown model, profile or resource", {}),
    413: ("The request body is larger than this server accepts", {}),
    422: ("The uploaded profile was made for another model (hidden size, layers or weights)", {}),
    429: ("The engine's queue is full; retry after `Retry-After` seconds",
          {"Retry-After": {**_HEADER_STRING, "required": True}}),
    500: ("The profile store could not be read or written (details in the server log)", {}),
    503: ("The server is starting or shutting down; retry after `Retry-After` seconds",
          {"Retry-After": {**_HEADER_STRING, "required": True}}),
    507: ("The profile store is out of space; the stored profile is unchanged", {}),
}


def responses(
    *statuses: int, ok: dict[int | str, dict[str, Any]] | None = None, why: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: its success responses (`ok`) and the error statuses it answers; `why`: the
    route's own description of a status (what makes its request invalid), instead of the general one."""
    documented: dict[int | str, dict[str, Any]] = dict(ok or {})
    for status in statuses:
        description, headers = _ERRORS[status]
        description = (why or {}).get(status, description)
        entry: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ERROR}}}
        if headers:
            entry["headers"] = copy.deepcopy(headers)
        documented[status] = entry
    return documented


def json_ok(schema: dict[str, Any], description: str = "OK", **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


# -- response bodies ---------------------------------------------------------------------------------

_NULLABLE_STR = {"type": ["string", "null"]}
_DIGEST = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$",
           "description": "sha256 of the profile's file: which version of the profile this is"}
_STEERING_APPLIED = {
    "type": ["object", "null"],
    "description": "the steering applied (null: none)",
    "required": ["profiles", "position"],
    "properties": {
        "profiles": {
            "type": "array",
            "items": {"type": "object", "required": ["profile", "strength", "digest"],
                      "properties": {"profile": {"type": "string"}, "strength": {"type": "number"},
                                     "digest": _DIGEST}},
        },
        "position": {"type": "string", "enum": list(POSITION_MODES)},
        "decoding": {
            "type": "object",
            "description": "sampling defaults the acting profiles carry and the request took, in the fields it "
                           "left unset (absent: none)",
            "properties": {"repetition_penalty": {"type": "number"}},
        },
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer", "minimum": 0}
                   for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_FINISH = {"type": "string", "enum": ["stop", "length"]}
_TOP_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"],
                "properties": {"token": {"type": "string"}, "logprob": {"type": "number"},
                               "bytes": {"type": "array", "items": {"type": "integer"}}}}
_CHAT_LOGPROBS = {
    "type": ["object", "null"],
    "required": ["content"],
    "properties": {"content": {"type": "array", "items": {
        **_TOP_LOGPROB, "required": ["token", "logprob", "bytes", "top_logprobs"],
        "properties": {**_TOP_LOGPROB["properties"], "top_logprobs": {"type": "array", "items": _TOP_LOGPROB}},
    }}},
}
CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage", "steering"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "message", "logprobs", "finish_reason"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "message": {"type": "object", "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
                "logprobs": _CHAT_LOGPROBS,
                "finish_reason": _FINISH,
            },
        }},
        "usage": _USAGE,
        "steering": _STEERING_APPLIED,
    },
}
_LEGACY_LOGPROBS = {
    "type": ["object", "null"],
    "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
        "top_logprobs": {"type": "array", "items": {"type": ["object", "null"],
                                                     "additionalProperties": {"type": "number"}}},
        "text_offset": {"type": "array", "items": {"type": "integer"}},
    },
}
COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage", "steering"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "text_completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "text", "logprobs", "finish_reason"],
            "properties": {"index": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
                           "logprobs": _LEGACY_LOGPROBS, "finish_reason": _FINISH},
        }},
        "usage": _USAGE,
        "steering": _STEERING_APPLIED,
    },
}
CHAT_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "delta", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "logprobs": _CHAT_LOGPROBS,
                           "delta": {"type": "object", "properties": {"role": {"const": "assistant"},
                                                                      "content": {"type": "string"}}},
                           "finish_reason": {"anyOf": [_FINISH, {"type": "null"}]}},
        }},
        "usage": {"anyOf": [_USAGE, {"type": "null"}]},
        "steering": _STEERING_APPLIED,
    },
}
COMPLETION_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": _LEGACY_LOGPROBS,
                           "finish_reason": {"anyOf": [_FINISH, {"type": "null"}]}},
        }},
        "usage": {"anyOf": [_USAGE, {"type": "null"}]},
        "steering": _STEERING_APPLIED,
    },
}


def event_stream(chunk: dict[str, Any]) -> dict[str, Any]:
    """A server-sent-event stream, described (as Open API 3.1 does for sequential media types) by the
    schema of one event: its `data` is a chunk's JSON, an error envelope if generation fails midway, or
    the final `[DONE]`."""
    return {"schema": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {"anyOf": [
                {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, ERROR]},
                 "description": "a chunk, or an error envelope when the generation fails midway"},
                {"const": "[DONE]", "description": "the last event"},
            ]},
        },
    }}


def generation_ok(schema: dict[str, Any], chunk: dict[str, Any]) -> dict[str, Any]:
    """The 200 of the generation routes: JSON, or server-sent events when `stream` is true."""
    return {
        "description": "the result, or its chunks as server-sent events when `stream` is true",
        "headers": {"X-Steering": {"schema": {"type": "string"}, "required": True,
                                   "description": "the steering applied: `name=strength,...;position=mode;"
                                                  "digest=sha256:...,...` (one digest per profile, in order) or "
                                                  "`none`"}},
        "content": {"application/json": {"schema": schema}, "text/event-stream": event_stream(chunk)},
    }


MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by", "root", "parent"],
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                   "owned_by": {"type": "string"}, "root": {"type": "string"}, "parent": _NULLABLE_STR,
                   "max_model_len": {"type": "integer", "minimum": 1,
                                     "description": "the context window: prompt plus generated tokens"},
                   "profile": {"type": "string"}, "digest": _DIGEST},
}
MODEL_LIST = {"type": "object", "required": ["object", "data"],
              "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL}}}
_SHARE = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_REPLY_RATES = {"loop_rate": _SHARE, "refusal_rate": _SHARE, "perplexity": {"type": ["number", "null"]}}
GENERATION = {  # steering_vectors/core/generation_record.py
    "type": "object",
    "description": "the profile's replies judged against the unsteered model's on a preference set's dev prompts "
                   "(docs/judge.md): every number of dev half B, the strength chosen on half A; null when the file "
                   "carries no generation result",
    "required": ["set", "judge", "replies", "prompts", "half_a", "half_b", "chosen_strength", "unsteered",
                 "strengths"],
    "properties": {
        "set": {"type": "string"}, "judge": {"type": "string"}, "judge_sha256": {"type": "string"},
        "replies": {"enum": ["engine", "library"]}, "max_new_tokens": {"type": "integer", "minimum": 1},
        "prompts": {"type": "integer"}, "half_a": {"type": "integer"}, "half_b": {"type": "integer"},
        "chosen_strength": {"type": "number", "description": "0: no strength met the loop and perplexity limits"},
        "unsteered": {"type": "object", "properties": _REPLY_RATES},
        "strengths": {"type": "array", "items": {"type": "object", "properties": {
            "strength": {"type": "number"}, "win_rate": _SHARE, "low": _SHARE, "high": _SHARE, **_REPLY_RATES,
            "perplexity_change": {"type": ["number", "null"], "description": "relative to unsteered: 0.05 is +5 %"},
        }}},
        "source": {"type": "string"},
        "decoding": {"type": "object", "additionalProperties": {"type": "number"},
                     "description": "the profile's decoding defaults its steered replies took (absent: none)"},
        "conditions": {"enum": ["ignored", "honoured"],
                       "description": "honoured: a conditional profile steered only the prompts it fired on "
                                      "(absent: ignored)"},
    },
}
PROFILE = {
    "type": "object",
    "required": ["id", "object", "digest", "name", "layers", "hidden_size", "default_strength", "position_mode",
                 "offset_norms", "low_rank"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "profile"},
        "digest": _DIGEST,
        "name": {"type": "string"},
        "description": {"type": ["string", "null"]},
        "layers": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "hidden_size": {"type": "integer"},
        "default_strength": {"type": "number"},
        "position_mode": {"enum": list(POSITION_MODES)},
        "offset_norms": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
        "low_rank": {"type": "object", "additionalProperties": {"type": "integer"},
                     "description": "the rank of the low-rank term at each layer that has one"},
        "lora": {"type": "object",
                 "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer"}},
                 "description": "the rank of the LoRA term of each attention projection, per layer that has one"},
        "decoding": {"type": "object", "properties": {"repetition_penalty": {"type": "number"}},
                     "description": "sampling defaults for the rows the profile steers, where a request sets none "
                                    "({}: none)"},
        "generation": {"anyOf": [GENERATION, {"type": "null"}]},
    },
}
PROFILE_LIST = {
    "type": "object",
    "required": ["object", "data", "skipped"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": PROFILE},
        "skipped": {"type": "array", "items": {"type": "object", "required": ["path", "reason"],
                                               "properties": {"path": {"type": "string"},
                                                              "reason": {"type": "string"}}}},
    },
}
PROFILE_DELETED = {"type": "object", "required": ["id", "object", "deleted"],
                   "properties": {"id": {"type": "string"}, "object": {"const": "profile"},
                                  "deleted": {"const": True}}}
RELOADED = {"type": "object", "required": ["object", "data", "skipped"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "string"}},
                           "skipped": {"type": "array", "items": {"type": "string"}}}}
TOKENIZED = {
    "type": "object",
    "required": ["count", "max_model_len", "tokens", "token_strs"],
    "properties": {"count": {"type": "integer", "minimum": 0},
                   "max_model_len": {"type": "integer", "minimum": 1},
                   "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                   "token_strs": {"type": ["array", "null"], "items": {"type": "string"}}},
}
DETOKENIZED = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}
HEALTHY = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
METRICS_OK = {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
READY = {
    "type": "object",
    "required": ["status", "model", "profiles", "skipped_profiles", "engine", "backend"],
    "properties": {"status": {"const": "ready"}, "model": {"type": "string"},
                   "profiles": {"type": "array", "items": {"type": "string"}},
                   "skipped_profiles": {"type": "array", "items": {"type": "string"}},
                   "engine": {"type": "object", "additionalProperties": {"type": "integer"}},
                   "backend": {"type": ["string", "null"]}},
}
# The smallest file of either format: safetensors is an 8-byte header length and a JSON header (at least
# `{}`); GGUF a 4-byte magic, a 4-byte version and two 8-byte counts. Shorter bodies are never profiles.
UPLOAD_MIN_BYTES = 10
_PROFILE_FILE = {
    "type": "string",
    "format": "binary",
    "minLength": UPLOAD_MIN_BYTES,
    "description": "the bytes of a profile file: a safetensors file in this project's profile format "
                   "(`rahf train`, `rahf profiles`, `Profile.save`), or a GGUF control vector (llama.cpp / "
                   "repeng: `direction.N` tensors, magic `GGUF`). Which bytes make such a file is beyond JSON "
                   "Schema; the server parses the file and answers 400 when it is not one, 422 when it was made "
                   "for another model",
}
UPLOAD_BODY = {
    "required": True,
    "description": "a profile file (`.safetensors`) or a GGUF control vector: the raw bytes (any content type "
                   "but a multipart form), or the one file part of a multipart form",
    "content": {
        "application/octet-stream": {"schema": _PROFILE_FILE},
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "additionalProperties": False,
                       "properties": {"file": _PROFILE_FILE}},
            "encoding": {"file": {"contentType": "application/octet-stream"}},
        },
    },
}
UPLOAD_INVALID = (
    "The upload is not a profile file: the body is empty or the form has no file part (`code: "
    "missing_required_parameter`); the bytes are neither a safetensors file (an 8-byte header length, a JSON "
    "header, the tensors it lists) nor a GGUF file (`code: invalid_profile`); the file is one of those formats "
    "but not a profile: no offsets, unknown tensors or metadata, a format version this server does not read, "
    "non-finite values (`invalid_profile`); "
    "or the profile name in the path is not a valid name (`code: invalid_profile_name`)"
)
PROFILE_NAME_PARAM = {
    "description": "1-64 letters, digits, `_`, `.` or `-`, starting with a letter or digit, no `..`",
}


# -- request bodies ----------------------------------------------------------------------------------

def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


# OpenAI parameters this server does not implement, accepted only at the value that asks for nothing
# (protocol._UNSUPPORTED_AT_DEFAULT); a test checks that the two lists agree
_AT_NOTHING: dict[str, dict[str, Any]] = {
    "tools": {"type": ["array", "null"], "maxItems": 0},
    "tool_choice": {"enum": ["none", None]},
    "functions": {"type": ["array", "null"], "maxItems": 0},
    "function_call": {"enum": ["none", None]},
    "parallel_tool_calls": {"type": "null"},
    "response_format": _nullable({"type": "object", "required": ["type"], "additionalProperties": False,
                                  "properties": {"type": {"const": "text"}}}),
    "logit_bias": {"type": ["object", "null"], "maxProperties": 0},
    "metadata": {"type": ["object", "null"], "maxProperties": 0},
    "store": {"enum": [False, None]},
}


def _steering_entry(settings: Settings) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "a profile and its strength; `position` overrides the profile's token-position mode",
        "required": ["profile"],
        "additionalProperties": False,
        "properties": {
            "profile": {"type": "string", "pattern": PROFILE_NAME_PATTERN, "maxLength": PROFILE_NAME_MAX},
            "strength": _nullable({"type": "number", "minimum": settings.strength_min,
                                   "maximum": settings.strength_max}),
            "position": {"enum": [*POSITION_MODES, None]},
        },
    }


def _message() -> dict[str, Any]:
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}}]}
    name = {"type": ["string", "null"]}
    return {
        "description": "system, developer and user messages need `content`; an assistant message may omit it",
        "oneOf": [
            {"type": "object", "required": ["role", "content"], "additionalProperties": False,
             "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": content, "name": name}},
            {"type": "object", "required": ["role"], "additionalProperties": False,
             "properties": {"role": {"const": "assistant"}, "content": {"anyOf": [*content["anyOf"], {"type": "null"}]},
                            "name": name}},
        ],
    }


def _common(props: dict[str, Any], settings: Settings) -> None:
    """The constraints `protocol._GenerationRequest` and the serving layer enforce on both routes."""
    nullable_bool = {"type": ["boolean", "null"]}
    props["model"] = {"type": "string", "description": "the base model's id, or `<base>:<profile>[@<strength>]`"}
    props["n"] = {"type": ["integer", "null"], "minimum": 1, "maximum": settings.max_n}
    props["stream"] = nullable_bool
    props["seed"] = {"type": ["integer", "null"], "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]}
    for key in ("presence_penalty", "frequency_penalty"):
        props[key] = {"type": ["number", "null"], "minimum": -2.0, "maximum": 2.0}
    props["temperature"] = {"type": ["number", "null"], "minimum": 0.0, "maximum": 2.0}
    props["top_p"] = {"type": ["number", "null"], "exclusiveMinimum": 0.0, "maximum": 1.0}
    props["top_k"] = {"type": ["integer", "null"], "minimum": -1,
                      "description": "sample from the k most likely tokens; -1 or 0: all (vLLM's extension)"}
    props["min_p"] = {"type": ["number", "null"], "minimum": 0.0, "maximum": 1.0,
                      "description": "drop tokens less likely than min_p times the most likely (vLLM's extension)"}
    props["repetition_penalty"] = {
        "type": ["number", "null"], "minimum": REPETITION_PENALTY[0], "maximum": REPETITION_PENALTY[1],
        "description": "over prompt and generated tokens: positive logits divided by it, negative ones "
                       "multiplied; 1: off; absent or null: the largest that a steering profile acting on "
                       "the request carries (its decoding defaults), else the server's default "
                       f"({settings.default_repetition_penalty:g}) (vLLM's extension)"}
    props["stop"] = {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}},
        {"type": "null"},
    ]}
    entry = {"$ref": "#/components/schemas/SteeringEntry"}
    props["steering"] = {
        "description": "the steering extension: one entry or a list (their offsets add up); null: unsteered",
        "anyOf": [entry, {"type": "array", "items": entry}, {"type": "null"}],
    }
    props.update(copy.deepcopy(_AT_NOTHING))


def _response_format() -> dict[str, Any]:
    """Chat's `response_format` (protocol.parse_response_format; compiled by server/structured.py)."""
    json_schema = {
        "type": "object",
        "required": ["name", "schema"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": JSON_SCHEMA_NAME},
            "description": {"type": ["string", "null"]},
            "schema": {"type": "object", "description": "a JSON Schema the reply is an instance of; one that "
                       "llguidance cannot compile is a 400"},
            "strict": {"type": ["boolean", "null"], "description": "true: keywords that cannot be enforced "
                       "(uniqueItems, not, ...) are a 400; otherwise they are ignored"},
        },
    }
    return {
        "description": "text (the default), any JSON object, or an instance of a JSON Schema; JSON formats "
                       "constrain every token of every choice (llguidance), finish_reason `stop` when the JSON "
                       "is complete",
        "anyOf": [
            {"type": "object", "required": ["type"], "additionalProperties": False,
             "properties": {"type": {"enum": ["text", "json_object"]}}},
            {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
             "properties": {"type": {"const": "json_schema"}, "json_schema": json_schema}},
            {"type": "null"},
        ],
    }


def _chat_request(schema: dict[str, Any], settings: Settings) -> None:
    props = schema["properties"]
    _common(props, settings)
    props["response_format"] = _response_format()  # chat serves it; /v1/completions takes it only as text
    limit = settings.max_tokens_limit
    props["messages"] = {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/ChatMessage"}}
    for key in ("max_tokens", "max_completion_tokens"):
        props[key] = {"type": ["integer", "null"], "minimum": 1, "maximum": limit,
                      "description": "with the prompt, at most the model's context window"}
    props["logprobs"] = {"type": ["boolean", "null"]}
    props["top_logprobs"] = {"type": ["integer", "null"], "minimum": 0, "maximum": 20}


def _completion_request(schema: dict[str, Any], settings: Settings, vocab: int | None) -> None:
    props = schema["properties"]
    _common(props, settings)
    token = {"type": "integer", "minimum": 0}
    if vocab is not None:
        token["maximum"] = vocab - 1
    ids = {"type": "array", "minItems": 1, "items": token}
    batch = settings.max_batch_size + settings.max_queue
    texts = {"type": "array", "minItems": 1, "maxItems": batch, "items": {"type": "string", "minLength": 1}}
    batches = {"type": "array", "minItems": 1, "maxItems": batch, "items": ids}
    props["prompt"] = {
        "description": "a text, texts, token ids or lists of token ids; prompts x `n` at most "
                       f"{batch} (the engine's rows plus queue)",
        "anyOf": [{"type": "string", "minLength": 1}, texts, ids, batches],
    }
    props["max_tokens"] = {"type": ["integer", "null"], "minimum": 0, "maximum": settings.max_tokens_limit,
                           "description": "default min(16, the server's limit); with the prompt, at most the "
                                          "model's context window"}
    props["logprobs"] = {"type": ["integer", "null"], "minimum": 0, "maximum": 20}
    props["echo"] = {"type": ["boolean", "null"]}
    props["best_of"] = {"type": ["integer", "null"], "minimum": 1, "maximum": 1}
    props["suffix"] = {"type": "null"}
    # prompts x n must fit the engine: for each n, the number of prompts in a batch is bounded
    rules = []
    for n in range(2, settings.max_n + 1):
        most = batch // n
        if most >= batch:
            continue
        rules.append({
            "if": {"required": ["n"], "properties": {"n": {"type": "integer", "minimum": n}}},
            "then": {"properties": {"prompt": {"anyOf": [
                {"type": "string"}, ids,
                {"type": "array", "maxItems": most, "items": {"type": ["string", "array"]}},
            ]}}},
        })
    if rules:
        schema["allOf"] = rules


def _tokenize_requests(schemas: dict[str, Any], vocab: int | None) -> None:
    """`/tokenize`: exactly one of `prompt` and `messages`; `/detokenize`: ids within the vocabulary."""
    tokenize = schemas.get("TokenizeRequest")
    if tokenize is not None:
        props = tokenize["properties"]
        props["messages"] = {"anyOf": [{"type": "array", "minItems": 1,
                                        "items": {"$ref": "#/components/schemas/ChatMessage"}}, {"type": "null"}]}
        tokenize["oneOf"] = [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
        ]
        tokenize["description"] = "a `prompt`, or chat `messages` formatted with the chat template (vLLM's shape)"
    detokenize = schemas.get("DetokenizeRequest")
    if detokenize is not None:
        token: dict[str, Any] = {"type": "integer", "minimum": 0}
        if vocab is not None:
            token["maximum"] = vocab - 1
        detokenize["properties"]["tokens"] = {"type": "array", "items": token}


# -- assembling --------------------------------------------------------------------------------------

def _calls(route: APIRoute) -> set[Any]:
    found: set[Any] = set()
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if dependant.call is not None:
            found.add(dependant.call)
        stack.extend(dependant.dependencies)
    return found


def key_requirement(route: APIRoute) -> str | None:
    """"admin", "api" or None: the key a route's dependencies ask for."""
    calls = _calls(route)
    if require_admin_key in calls:
        return "admin"
    if require_api_key in calls:
        return "api"
    return None


def build_openapi(app: FastAPI, settings: Settings, *, vocab: int | None = None) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    api_keys, admin_keys = settings.keys()
    needs = {"api": bool(api_keys), "admin": bool(api_keys or admin_keys)}
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorResponse"] = copy.deepcopy(_ERROR_SCHEMA)
    schemas["SteeringEntry"] = _steering_entry(settings)
    schemas["ChatMessage"] = _message()
    _chat_request(schemas["ChatCompletionRequest"], settings)
    _completion_request(schemas["CompletionRequest"], settings, vocab)
    _tokenize_requests(schemas, vocab)
    if needs["admin"]:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                    "description": "an API key; profile changes need an admin key"}}
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            documented = operation.get("responses", {})
            if "422" in documented and not _declares(app, path, method, 422):
                documented.pop("422")  # FastAPI's validation error: this server answers 400 instead
            route = _route_for(app, path, method)
            kind = key_requirement(route) if route is not None else None
            if kind is not None and needs[kind]:
                operation["security"] = [{"bearer": []}]
            else:
                documented.pop("401", None)
            read_only = not settings.profile_uploads and method in ("put", "delete") and path.startswith(
                "/v1/profiles/")  # uploads off: every profile change is a 403 (profile_store_read_only)
            if (kind != "admin" or not api_keys) and not read_only:  # 403: a valid API key, not an admin key
                documented.pop("403", None)
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter["schema"] = {"type": "string", "pattern": PROFILE_NAME_PATTERN,
                                           "maxLength": PROFILE_NAME_MAX, "title": "Name"}
                    parameter.update(PROFILE_NAME_PARAM)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return schema


def _route_for(app: FastAPI, path: str, method: str) -> APIRoute | None:
    for route in served_routes(app):
        methods: Iterable[str] = getattr(route, "methods", None) or ()
        if getattr(route, "path_format", None) == path and method.upper() in methods:
            return route  # type: ignore[return-value]
    return None


def _declares(app: FastAPI, path: str, method: str, status: int) -> bool:
    route = _route_for(app, path, method)
    return route is not None and status in (getattr(route, "responses", None) or {})
