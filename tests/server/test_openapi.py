"""`/openapi.json` describes the API the server really serves: statuses, constraints, media types, auth.

The bounded schemathesis run in CI (bench/fuzz.py) explores this at random; these tests pin it down:
exact statuses per operation, security per key setting, a table of request bodies on which the
description and the live server agree, real responses validated against their documented schemas, and
the `Allow` header.
"""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest

from server.app import create_app
from server.config import Settings
from server.openapi import UPLOAD_MIN_BYTES
from server.protocol import _UNSUPPORTED_AT_DEFAULT, ChatCompletionRequest, CompletionRequest

from .conftest import live_server, make_profile

ADMIN = {("put", "/v1/profiles/{name}"), ("delete", "/v1/profiles/{name}"), ("post", "/v1/profiles/-/reload"),
         ("post", "/v1/profiles/{name}/fit")}
STATUSES = {
    ("post", "/v1/chat/completions"): {200, 400, 401, 404, 413, 429, 503},
    ("post", "/v1/completions"): {200, 400, 401, 404, 413, 429, 503},
    ("get", "/v1/models"): {200, 401, 503},
    ("get", "/v1/models/{model_id}"): {200, 401, 404, 503},
    ("get", "/v1/profiles"): {200, 401, 503},
    ("get", "/v1/profiles/{name}"): {200, 400, 401, 404, 503},
    ("put", "/v1/profiles/{name}"): {200, 201, 400, 401, 403, 413, 422, 500, 503, 507},
    ("delete", "/v1/profiles/{name}"): {200, 400, 401, 403, 404, 500, 503},
    ("post", "/v1/profiles/-/reload"): {200, 401, 403, 500, 503},
    ("post", "/v1/profiles/{name}/fit"): {200, 201, 400, 401, 403, 413, 500, 503, 507},
    ("get", "/healthz"): {200},
    ("get", "/health"): {200},
    ("post", "/tokenize"): {200, 400, 401, 404, 413, 503},
    ("post", "/detokenize"): {200, 400, 401, 404, 413, 503},
    ("get", "/readyz"): {200, 503},
    ("get", "/metrics"): {200},
}


def spec_for(settings: Settings) -> dict:
    return create_app(settings).openapi()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def test_every_operation_documents_the_statuses_it_answers_with_the_error_envelope() -> None:
    spec = spec_for(Settings(api_keys="user", admin_keys="admin"))
    documented = {(m, p): {int(s) for s in op["responses"]} for m, p, op in operations(spec)}
    assert documented == STATUSES
    assert "HTTPValidationError" not in json.dumps(spec) and "ValidationError" not in spec["components"]["schemas"]
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"] == {"application/json": {"schema": {
                    "$ref": "#/components/schemas/ErrorResponse"}}}, (method, path, status)
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}
    chat_ok = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert chat_ok["content"].keys() == {"application/json", "text/event-stream"}
    assert chat_ok["headers"]["X-Steering"]["required"] is True
    for status in ("429", "503"):
        assert spec["paths"]["/v1/completions"]["post"]["responses"][status]["headers"]["Retry-After"]["required"]
    upload = spec["paths"]["/v1/profiles/{name}"]["put"]["requestBody"]
    assert upload["required"] is True
    assert upload["content"].keys() == {"application/octet-stream", "multipart/form-data"}
    assert upload["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert upload["content"]["multipart/form-data"]["schema"]["properties"]["file"]["minLength"] == UPLOAD_MIN_BYTES
    put_invalid = spec["paths"]["/v1/profiles/{name}"]["put"]["responses"]["400"]["description"]
    fit_invalid = spec["paths"]["/v1/profiles/{name}/fit"]["post"]["responses"]["400"]["description"]
    assert "not a profile file" in put_invalid and "mixes the two shapes" in fit_invalid


def test_uploads_shorter_than_the_smallest_profile_file_are_refused(agreeing, tiny_profiles) -> None:
    schema = agreeing.spec["paths"]["/v1/profiles/{name}"]["put"]["requestBody"]["content"]
    assert schema["application/octet-stream"]["schema"]["minLength"] == UPLOAD_MIN_BYTES
    for data in (b"\x00", b"GGUF\x03\x00\x00\x00\x00", b"\x02" + b"\x00" * 7 + b"{}"[:1]):
        assert len(data) < UPLOAD_MIN_BYTES
        response = httpx.put(agreeing.v1 + "/profiles/short", content=data, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "body", response.text
    assert len(tiny_profiles["alpha"].to_bytes()) >= UPLOAD_MIN_BYTES


def test_security_and_auth_statuses_follow_the_key_settings() -> None:
    open_spec = spec_for(Settings())
    assert "securitySchemes" not in open_spec["components"]
    for _, _, operation in operations(open_spec):
        assert "security" not in operation and not {"401", "403"} & operation["responses"].keys()

    admin_only = spec_for(Settings(admin_keys="admin"))
    for method, path, operation in operations(admin_only):
        guarded = (method, path) in ADMIN
        assert ("security" in operation) == guarded and ("401" in operation["responses"]) == guarded
        assert "403" not in operation["responses"]  # no API keys: a wrong key is a 401

    both = spec_for(Settings(api_keys="user", admin_keys="admin"))
    assert both["components"]["securitySchemes"] == {"bearer": {
        "type": "http", "scheme": "bearer", "description": "an API key; profile changes need an admin key"}}
    for method, path, operation in operations(both):
        keyed = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")  # vLLM's paths, outside /v1
        assert ("security" in operation) == keyed, (method, path)
        assert ("403" in operation["responses"]) == ((method, path) in ADMIN)


def test_every_request_field_is_described() -> None:
    schemas = spec_for(Settings())["components"]["schemas"]
    for model, name in ((ChatCompletionRequest, "ChatCompletionRequest"), (CompletionRequest, "CompletionRequest")):
        described = set(schemas[name]["properties"])
        assert described == set(model.model_fields) | set(_UNSUPPORTED_AT_DEFAULT), name
        assert schemas[name]["additionalProperties"] is False


def test_settings_bounds_are_in_the_description() -> None:
    settings = Settings(max_n=3, max_tokens_limit=50, strength_min=-2, strength_max=3, max_batch_size=2,
                        max_queue=4)
    schemas = spec_for(settings)["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert (chat["n"]["minimum"], chat["n"]["maximum"]) == (1, 3)
    assert chat["max_tokens"]["maximum"] == 50 and chat["max_completion_tokens"]["maximum"] == 50
    assert chat["seed"]["maximum"] == 2**63 - 1 and isinstance(chat["seed"]["maximum"], int)
    strength = schemas["SteeringEntry"]["properties"]["strength"]["anyOf"][0]
    assert (strength["minimum"], strength["maximum"]) == (-2, 3)
    completion = schemas["CompletionRequest"]
    assert completion["properties"]["max_tokens"]["maximum"] == 50
    # prompts x n <= rows + queue (6): n = 2 allows 3 prompts, n = 3 allows 2
    bounds = {rule["if"]["properties"]["n"]["minimum"]: rule["then"]["properties"]["prompt"]["anyOf"][2]["maxItems"]
              for rule in completion["allOf"]}
    assert bounds == {2: 3, 3: 2}


# -- the description and the live server agree on a table of request bodies ---------------------------


def _validator(spec: dict, name: str) -> jsonschema_rs.Validator:
    schema = {**spec["components"]["schemas"][name], "components": spec["components"]}
    return jsonschema_rs.validator_for(schema)


CHAT_CASES = [  # (fields over a valid base request, valid per the description)
    ({}, True),
    ({"messages": [{"role": "user"}]}, False),
    ({"messages": [{"role": "system", "content": None}]}, False),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, True),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, True),
    ({"messages": [{"role": "tool", "content": "hi"}]}, False),
    ({"messages": []}, False),
    ({"n": 2.0}, True),
    ({"n": 1.5}, False),
    ({"n": "2"}, False),
    ({"n": None}, True),
    ({"n": 9}, False),
    ({"stop": ""}, False),
    ({"stop": ["a", "b", "c", "d", "e"]}, False),
    ({"stop": []}, True),
    ({"stop": ["\n", "x"]}, True),
    ({"tools": []}, True),
    ({"tools": [{"type": "function"}]}, False),
    ({"tool_choice": "none"}, True),
    ({"tool_choice": "auto"}, False),
    ({"response_format": {"type": "text"}}, True),
    ({"response_format": {"type": "json_object"}}, True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "boolean"}}}}, True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, False),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, False),
    ({"response_format": {"type": "xml"}}, False),
    ({"store": False}, True),
    ({"store": True}, False),
    ({"logit_bias": {}}, True),
    ({"logit_bias": {"1": 2}}, False),
    ({"parallel_tool_calls": None}, True),
    ({"parallel_tool_calls": True}, False),
    ({"seed": 2**63 - 1}, True),
    ({"seed": 2**63}, False),
    ({"seed": -(2**63)}, True),
    ({"temperature": 2.5}, False),
    ({"temperature": 2.225073858507203e-309}, True),  # a denormal: once a 500 (found by the fuzzer)
    ({"top_p": 0}, False),
    ({"max_tokens": 16}, True),
    ({"max_tokens": 17}, False),
    ({"max_tokens": 0}, False),
    ({"top_logprobs": 21}, False),
    ({"logprobs": True, "top_logprobs": 3}, True),
    ({"steering": {"profile": "alpha", "strength": 10}}, True),
    ({"steering": {"profile": "alpha", "strength": 10.5}}, False),
    ({"steering": [{"profile": "alpha"}, {"profile": "beta", "position": "all"}]}, True),
    ({"steering": {"profile": "alpha", "position": "prompt"}}, True),
    ({"steering": {"profile": "alpha", "position": "middle"}}, False),
    ({"steering": {"profile": "alpha", "extra": 1}}, False),
    ({"surprise": 1}, False),
    ({"stream_options": {"include_usage": True}}, True),
]


def _agree(live, validator, path: str, body: dict, valid: bool) -> None:
    assert validator.is_valid(body) is valid, body
    response = httpx.post(live.v1 + path, json=body, timeout=60)
    if valid:
        assert response.status_code == 200, (body, response.text)
    else:
        assert response.status_code == 400, (body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def agreeing(tiny_loaded, tiny_profiles, tmp_path_factory):
    directory = tmp_path_factory.mktemp("agree")
    for name in ("alpha", "beta"):
        tiny_profiles[name].save(directory / f"{name}.safetensors")
    settings = Settings(profile_dir=directory, max_tokens_limit=16, strength_min=-10, strength_max=10,
                        max_batch_size=4, max_queue=12)
    with live_server(tiny_loaded, settings) as live:
        live.spec = httpx.get(live.url + "/openapi.json").json()
        live.base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        yield live


@pytest.mark.parametrize(("fields", "valid"), CHAT_CASES)
def test_chat_description_and_server_agree(agreeing, fields, valid) -> None:
    body = {"model": agreeing.base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "temperature": 0, **fields}
    _agree(agreeing, _validator(agreeing.spec, "ChatCompletionRequest"), "/chat/completions", body, valid)


def test_completion_description_and_server_agree(agreeing, tiny_loaded) -> None:
    vocab = len(tiny_loaded.tokenizer)
    validator = _validator(agreeing.spec, "CompletionRequest")
    cases = [
        ({"prompt": "hi"}, True),
        ({"prompt": ""}, False),
        ({"prompt": []}, False),
        ({"prompt": [[]]}, False),
        ({"prompt": ["a", ""]}, False),
        ({"prompt": [vocab - 1, 5]}, True),
        ({"prompt": [vocab]}, False),
        ({"prompt": [-1]}, False),
        ({"prompt": [1.0, 2.0]}, True),
        ({"prompt": [[3, 4], [5]]}, True),
        ({"prompt": ["a"] * 16}, True),  # 16 prompts x n 1 <= 4 rows + 12 queued
        ({"prompt": ["a"] * 17}, False),
        ({"prompt": ["a"] * 8, "n": 2}, True),
        ({"prompt": ["a"] * 9, "n": 2}, False),
        ({"prompt": [[1]] * 6, "n": 3}, False),
        ({"prompt": "x", "n": 8}, True),
        ({"prompt": "x", "best_of": 2}, False),
        ({"prompt": "x", "suffix": "y"}, False),
        ({"prompt": "x", "echo": None, "logprobs": 0}, True),
        ({"prompt": "x", "logprobs": 21}, False),
        ({"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1}, True),
        ({"prompt": "x", "response_format": {"type": "text"}}, True),
        ({"prompt": "x", "response_format": {"type": "json_object"}}, False),  # chat's only
    ]
    for fields, valid in cases:
        body = {"model": agreeing.base, "max_tokens": 1, "temperature": 0, **fields}
        _agree(agreeing, validator, "/completions", body, valid)


PAIR = {"positive": "a good day", "negative": "a bad day"}
INSTRUCTED = {"instructions": {"positive": "be kind", "negative": "be rude"}, "prompts": ["hi", "and you?"]}
FIT_CASES = [  # (a fit body, valid per the description): its shapes exclude each other
    ({"examples": [PAIR]}, True),
    ({"examples": [{"prompt": "q", **PAIR}]}, True),
    (INSTRUCTED, True),
    ({"examples": [PAIR], "instructions": None, "prompts": None}, True),
    ({"examples": None, **INSTRUCTED}, True),
    ({"examples": [PAIR], **INSTRUCTED}, False),
    ({"examples": [PAIR], "prompts": ["0"]}, False),
    ({"examples": [PAIR], "instructions": INSTRUCTED["instructions"]}, False),
    ({"instructions": INSTRUCTED["instructions"]}, False),
    ({"prompts": ["hi"]}, False),
    ({}, False),
    ({"examples": [PAIR, {"prompt": "q", **PAIR}]}, False),
    ({"examples": [PAIR], "method": "pca"}, False),
    ({"examples": [PAIR, PAIR], "method": "pca"}, True),
    ({**INSTRUCTED, "prompts": ["hi"], "method": "pca"}, False),
    ({"examples": [PAIR], "layers": [1, 1, 1, 1, 1]}, True),
    ({"examples": [PAIR], "layers": [2.0, 3]}, True),
    ({"examples": [PAIR], "layers": [1.5]}, False),
    ({"examples": [PAIR], "layers": [4]}, False),  # the tiny model has 4 layers
    ({"examples": [PAIR], "default_strength": 10.5}, False),
    # texts are bounded in characters; a side over its tokens is truncated, not refused
    ({"examples": [{"positive": "x" * 8192, "negative": "y"}]}, True),
    ({"examples": [{"positive": "x" * 8193, "negative": "y"}]}, False),
    ({"examples": [{"prompt": "q" * 8192, "positive": "p" * 8192, "negative": "n" * 8192}]}, True),
    ({"instructions": {"positive": "i" * 8192, "negative": "j"}, "prompts": ["u" * 8192, "v"]}, True),
    ({"examples": [{"positive": "x" * 600, "negative": "y" * 600}] * 64}, True),  # once refused: 76800 tokens
    ({"examples": [{"positive": "\x16", "negative": "\u200b"}]}, True),  # the tiny tokenizer reads both
]


@pytest.mark.parametrize(("body", "valid"), FIT_CASES)
def test_fit_description_and_server_agree(agreeing, body, valid) -> None:
    assert _validator(agreeing.spec, "FitRequest").is_valid(body) is valid, body
    response = httpx.post(agreeing.v1 + "/profiles/agreed/fit", json=body, timeout=60)
    assert response.status_code in ((200, 201) if valid else (400,)), (body, response.text)


@pytest.mark.slow
def test_the_characters_the_default_tokenizer_drops_are_in_the_fit_description() -> None:
    from server.routes import fit
    from steering_vectors.core.models import load_tokenizer, model_directory

    spec = spec_for(Settings())
    fit.document(spec, Settings(), 30, load_tokenizer(model_directory()[0]))
    validator = _validator(spec, "FitRequest")
    pattern = spec["components"]["schemas"]["PairExample"]["properties"]["positive"]["pattern"]
    assert pattern == "[^\\u0004\\u0006\\u0013\\u0014\\u0016\\u001d]"
    # a text that is read needs a character the tokenizer encodes (the server refuses the others: 400,
    # tests/pipeline/test_quickfit_truncation.py); prompts and instructions are wrapped in the template
    for body, valid in [({"examples": [{"positive": "\x16\x04", "negative": "b"}]}, False),
                        ({"examples": [{"positive": "\x16a", "negative": "b"}]}, True),
                        ({"examples": [{"prompt": "q", "positive": "a", "negative": "\x1d"}]}, False),
                        ({"examples": [{"prompt": "\x1d", "positive": "a", "negative": "b"}]}, True),
                        ({"instructions": {"positive": "\x16", "negative": "\x04"}, "prompts": ["\x06"]}, True)]:
        assert validator.is_valid(body) is valid, body


def test_profile_name_pattern_matches_the_server(agreeing) -> None:
    parameter = agreeing.spec["paths"]["/v1/profiles/{name}"]["get"]["parameters"][0]
    validator = jsonschema_rs.validator_for(parameter["schema"])
    for name in ["a", "A-1", "x.y", "x.", "0" * 64, "a_b.c-d", "a..b", ".a", "-a", "_a", "0" * 65, "a b", "é",
                 "a.-", "a.."]:
        response = httpx.get(agreeing.v1 + f"/profiles/{name}")
        assert response.status_code == (404 if validator.is_valid(name) else 400), (name, response.text)


# -- real responses against their documented schemas -------------------------------------------------


def _response_validator(spec: dict, path: str, method: str, status: int, media: str = "application/json"):
    schema = spec["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]
    return jsonschema_rs.validator_for({**schema, "components": spec["components"]})


def _valid(spec, path, method, response: httpx.Response, media: str = "application/json") -> None:
    validator = _response_validator(spec, path, method, response.status_code, media)
    errors = [str(e) for e in validator.iter_errors(response.json())]
    assert not errors, (path, response.status_code, errors[:3], response.text[:500])


def test_responses_match_their_documented_schemas(agreeing, tiny_loaded) -> None:
    spec, base, v1 = agreeing.spec, agreeing.base, agreeing.v1
    chat = {"model": f"{base}:alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "logprobs": True, "top_logprobs": 2, "n": 2, "steering": {"profile": "beta", "strength": 1}}
    _valid(spec, "/v1/chat/completions", "post", httpx.post(v1 + "/chat/completions", json=chat, timeout=60))
    completion = {"model": base, "prompt": ["hi", "yo"], "max_tokens": 3, "echo": True, "logprobs": 2}
    _valid(spec, "/v1/completions", "post", httpx.post(v1 + "/completions", json=completion, timeout=60))
    _valid(spec, "/v1/models", "get", httpx.get(v1 + "/models"))
    _valid(spec, "/v1/models/{model_id}", "get", httpx.get(v1 + f"/models/{base}:alpha"))
    _valid(spec, "/v1/models/{model_id}", "get", httpx.get(v1 + "/models/nope"))
    _valid(spec, "/v1/profiles", "get", httpx.get(v1 + "/profiles"))
    _valid(spec, "/v1/profiles/{name}", "get", httpx.get(v1 + "/profiles/alpha"))
    _valid(spec, "/v1/profiles/{name}", "get", httpx.get(v1 + "/profiles/..x"))
    data = make_profile(tiny_loaded, "schema", seed=5).to_bytes()
    created = httpx.put(v1 + "/profiles/schema-check", content=data)
    assert created.status_code == 201
    _valid(spec, "/v1/profiles/{name}", "put", created)
    _valid(spec, "/v1/profiles/{name}", "put", httpx.put(v1 + "/profiles/schema-check", content=b"nope"))
    _valid(spec, "/v1/profiles/{name}", "delete", httpx.delete(v1 + "/profiles/schema-check"))
    _valid(spec, "/v1/profiles/-/reload", "post", httpx.post(v1 + "/profiles/-/reload"))
    fitted = httpx.post(v1 + "/profiles/schema-fit/fit", json={"examples": [{"positive": "x" * 600, "negative": "y"}]},
                        timeout=60)
    assert fitted.status_code in (200, 201) and len(fitted.json()["truncated"]) == 1
    _valid(spec, "/v1/profiles/{name}/fit", "post", fitted)
    _valid(spec, "/readyz", "get", httpx.get(agreeing.url + "/readyz"))
    _valid(spec, "/healthz", "get", httpx.get(agreeing.url + "/healthz"))
    assert httpx.get(agreeing.url + "/metrics").headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_stream_events_match_the_documented_event_schema(agreeing, path) -> None:
    spec = agreeing.spec
    body = {"model": agreeing.base, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True},
            "logprobs": True if path == "/chat/completions" else 1, "n": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == "/chat/completions" else {"prompt": "hi"}
    event_schema = spec["paths"]["/v1" + path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    event = jsonschema_rs.validator_for({**event_schema, "components": spec["components"]})
    chunk_schema = event_schema["properties"]["data"]["anyOf"][0]["contentSchema"]
    chunk = jsonschema_rs.validator_for({**chunk_schema, "components": spec["components"]})
    with httpx.stream("POST", agreeing.v1 + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) > 3
    for item in data:
        assert event.is_valid({"event": "message", "data": item}), item
    for item in data[:-1]:
        assert not list(chunk.iter_errors(json.loads(item))), item


def test_token_ids_are_bounded_by_the_vocabulary(agreeing, tiny_loaded) -> None:
    prompt = agreeing.spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[2]["items"] == {"type": "integer", "minimum": 0, "maximum": len(tiny_loaded.tokenizer) - 1}


# -- methods ------------------------------------------------------------------------------------------


def test_allow_lists_every_method_of_the_path(agreeing) -> None:
    options = httpx.options(agreeing.v1 + "/profiles/alpha")
    assert options.status_code == 204 and options.headers["allow"] == "GET, PUT, DELETE, OPTIONS"
    assert options.content == b""
    patch = httpx.patch(agreeing.v1 + "/profiles/alpha")
    assert patch.status_code == 405 and patch.headers["allow"] == "GET, PUT, DELETE, OPTIONS"
    assert patch.json()["error"]["message"] == "method PATCH is not allowed here; allowed: GET, PUT, DELETE, OPTIONS"
    assert httpx.post(agreeing.v1 + "/models").headers["allow"] == "GET, OPTIONS"
    assert httpx.get(agreeing.v1 + "/chat/completions").headers["allow"] == "POST, OPTIONS"
    assert httpx.options(agreeing.v1 + "/profiles/-/reload").headers["allow"] == "POST, OPTIONS"
    assert httpx.options(agreeing.url + "/nothing").status_code == 404


def test_other_methods_share_one_metrics_label(agreeing) -> None:
    for method in ("PROPFIND", "MKCOL", "SEARCH"):  # methods HTTP parsers pass on; the server serves none
        assert httpx.request(method, agreeing.v1 + "/models").status_code == 405
    text = httpx.get(agreeing.url + "/metrics").text
    assert 'method="other"' in text
    assert not any(m in text for m in ("PROPFIND", "MKCOL", "SEARCH"))


def test_an_absent_completion_max_tokens_stays_within_the_limit(tiny_loaded) -> None:
    with live_server(tiny_loaded, Settings(max_tokens_limit=8)) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        reply = httpx.post(live.v1 + "/completions", json={"model": base, "prompt": "hi", "temperature": 0},
                           timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 8
        too_many = httpx.post(live.v1 + "/completions", json={"model": base, "prompt": "hi", "max_tokens": 9})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
