"""Every error leaves the server as `{"error": {message, type, param, code}}` with the right status."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from server.app import create_app
from server.backends.base import Backend, EngineOverloadedError, EngineShutdownError
from server.config import Settings

from .conftest import live_server
from .fakes import ScriptedEngine


def assert_envelope(response: httpx.Response, status: int, param: str | None = None, *, code: str | None = None,
                    type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if type is not None:
        assert error["type"] == type
    return error


@pytest.fixture(scope="module")
def base(server) -> str:
    return httpx.get(server.v1 + "/models").json()["data"][0]["id"]


def chat(server, base: str, **fields) -> httpx.Response:
    body = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not ...}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)


def test_unknown_profile_is_404_naming_the_entry(server, base) -> None:
    assert_envelope(chat(server, base, steering={"profile": "nope"}), 404, "steering.profile",
                    code="profile_not_found", type="not_found_error")
    entries = [{"profile": "alpha"}, {"profile": "nope"}]
    assert_envelope(chat(server, base, steering=entries), 404, "steering[1].profile")
    assert_envelope(chat(server, f"{base}:nope"), 404, "model", code="profile_not_found")


def test_unknown_model_is_404(server, base) -> None:
    assert_envelope(chat(server, "gpt-4o"), 404, "model", code="model_not_found")
    assert_envelope(chat(server, f"{base}:"), 404, "model")
    error = assert_envelope(chat(server, f"{base}:@2"), 400, "model", code="invalid_value")
    assert "names no profile" in error["message"]


@pytest.mark.parametrize("strength", [10.5, -11, 1e308])
def test_strength_out_of_bounds_is_400(server, base, strength) -> None:
    assert_envelope(chat(server, base, steering={"profile": "alpha", "strength": strength}), 400,
                    "steering.strength")


def test_strength_not_finite_is_400(server, base) -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = json.dumps({"model": base, "messages": [{"role": "user", "content": "hi"}],
                          "steering": [{"profile": "alpha", "strength": "@"}]}).replace('"@"', literal)
        response = httpx.post(server.v1 + "/chat/completions", content=raw,
                              headers={"content-type": "application/json"})
        assert_envelope(response, 400, "steering[0].strength")
    assert_envelope(chat(server, f"{base}:alpha@nan"), 400, "model")
    assert_envelope(chat(server, f"{base}:alpha@strong"), 400, "model")
    assert_envelope(chat(server, f"{base}:alpha@99"), 400, "model")


def test_conflicting_positions_are_400(server, base) -> None:
    entries = [{"profile": "alpha", "position": "all"}, {"profile": "beta", "position": "generated"}]
    assert_envelope(chat(server, base, steering=entries), 400, "steering")
    assert_envelope(chat(server, base, steering=[{"profile": "alpha"}, {"profile": "late"}]), 400, "steering")
    assert_envelope(chat(server, base, steering={"profile": "alpha", "position": "middle"}), 400,
                    "steering.position")
    mixed = [{"profile": "alpha", "position": "prompt"}, {"profile": "beta", "position": "generated"}]
    assert_envelope(chat(server, base, steering=mixed), 400, "steering")


def test_context_window_is_enforced(server, base) -> None:
    error = assert_envelope(chat(server, base, max_tokens=500), 400, "max_tokens", code="context_length_exceeded")
    assert "512" in error["message"]
    assert_envelope(chat(server, base, max_tokens=..., max_completion_tokens=500), 400, "max_completion_tokens")
    long = {"role": "user", "content": "x" * 600}
    assert_envelope(chat(server, base, messages=[long]), 400, "messages", code="context_length_exceeded")
    response = httpx.post(server.v1 + "/completions", json={"model": base, "prompt": "y" * 600})
    assert_envelope(response, 400, "prompt", code="context_length_exceeded")


@pytest.mark.parametrize(
    "fields, param, code",
    [
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
        ({"temperature": "hot"}, "temperature", "invalid_value"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"presence_penalty": 5}, "presence_penalty", "invalid_value"),
        ({"n": 9}, "n", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": ...}, "messages", "missing_required_parameter"),
        ({"model": ...}, "model", "missing_required_parameter"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None, None),
        ({"steering": {"profile": "alpha", "weight": 2}}, "steering.weight", "unsupported_parameter"),
        ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage", "invalid_value"),
        ({"stream": "yes"}, "stream", "invalid_value"),  # strict types: no guessing at strings
        ({"n": "2"}, "n", "invalid_value"),
        ({"seed": 2**63}, "seed", "invalid_value"),  # beyond a signed 64-bit integer
        ({"seed": -(2**63) - 1}, "seed", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0]", "invalid_value"),
        ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}]}, "messages[0]",
         "invalid_value"),
    ],
)
def test_bad_parameters_are_400_naming_them(server, base, fields, param, code) -> None:
    response = chat(server, base, **fields)
    if param is None:  # a mismatch deep inside a union: the param points into the message content
        assert response.status_code == 400
        assert response.json()["error"]["param"].startswith("messages[0].content")
        return
    assert_envelope(response, 400, param, code=code)


def test_unpaired_surrogates_are_400_naming_the_field(server, base) -> None:
    # JSON may spell a lone UTF-16 surrogate (json.dumps writes these as \\udXXX escapes); it is not text a
    # tokeniser can encode
    for route, body, where in (
        ("/chat/completions", {"model": base, "messages": [{"role": "user", "content": "a\ud800b"}]},
         "messages[0].content"),
        ("/chat/completions", {"model": base, "messages": [{"role": "user", "content": "x"}], "stop": ["\udfff"]},
         "stop[0]"),
        ("/completions", {"model": base, "prompt": ["fine", "\ud83d"]}, "prompt[1]"),
    ):
        raw = json.dumps(body).encode()
        assert b"\\ud" in raw
        response = httpx.post(server.v1 + route, content=raw, headers={"content-type": "application/json"})
        error = assert_envelope(response, 400, None, code="invalid_value")
        assert where in error["message"] and "surrogate" in error["message"]
    assert chat(server, base).status_code == 200  # and the server carries on


def test_largest_seed_with_several_choices(server, base) -> None:
    # seed + choice index passes 2**63 - 1 for the second choice; both choices are reproducible
    first = chat(server, base, seed=2**63 - 1, n=2, temperature=1.0)
    second = chat(server, base, seed=2**63 - 1, n=2, temperature=1.0)
    assert first.status_code == 200, first.text
    texts = [c["message"]["content"] for c in first.json()["choices"]]
    assert len(texts) == 2
    assert texts == [c["message"]["content"] for c in second.json()["choices"]]


def test_null_means_the_default_where_the_openai_api_allows_null(server, base) -> None:
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None, "logprobs": None,
             "seed": None, "stop": None, "top_p": None, "user": None, "stream_options": None}
    plain, nulled = chat(server, base), chat(server, base, **nulls)
    assert nulled.status_code == 200, nulled.text
    assert len(nulled.json()["choices"]) == 1 and nulled.json()["choices"][0]["logprobs"] is None
    assert nulled.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]  # greedy, same reply
    body = {"model": base, "prompt": "x", "max_tokens": 2, "n": None, "echo": None, "stream": None}
    completion = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert completion.status_code == 200 and not completion.json()["choices"][0]["text"].startswith("x")
    assert_envelope(chat(server, base, model=None), 400, "model")  # required fields stay required


def test_unsupported_parameters_at_their_do_nothing_value_are_ignored(server, base) -> None:
    idle = {"tools": None, "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {},
            "parallel_tool_calls": None, "store": False, "functions": [], "metadata": None}
    response = chat(server, base, **idle)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"] == chat(server, base).json()["choices"][0]["message"]
    for name, value in (("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
                        ("logit_bias", {"1": 5}), ("store", True)):  # response_format: test_response_format.py
        assert_envelope(chat(server, base, **{name: value}), 400, name, code="unsupported_parameter")


def test_assistant_message_may_omit_content(server, base) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "b"},
    ]
    assert chat(server, base, messages=messages).status_code == 200


def test_completion_specific_errors(server, base) -> None:
    def post(**fields) -> httpx.Response:
        return httpx.post(server.v1 + "/completions", json={"model": base, **fields})

    assert_envelope(post(prompt=[1, 2, 100000]), 400, "prompt")
    assert_envelope(post(prompt=[]), 400, "prompt")
    assert_envelope(post(prompt="x", suffix="y"), 400, "suffix")
    assert_envelope(post(prompt="x", best_of=2), 400, "best_of")
    assert_envelope(post(prompt="x", logprobs=21), 400, "logprobs")
    assert_envelope(post(prompt="x", max_tokens=-1), 400, "max_tokens")


def test_a_batch_larger_than_the_engine_can_hold_is_400_and_admits_nothing(server, base) -> None:
    settings = server.app.state.serving.settings
    limit = settings.max_batch_size + settings.max_queue
    engine = server.app.state.serving.engine

    def post(prompts: int, n: int) -> httpx.Response:
        body = {"model": base, "prompt": ["x"] * prompts, "n": n, "max_tokens": 1}
        return httpx.post(server.v1 + "/completions", json=body, timeout=60)

    for prompts, n in ((limit + 1, 1), (limit // 2 + 1, 2)):
        error = assert_envelope(post(prompts, n), 400, "prompt", code="invalid_value")
        assert f"asks for {prompts * n} completions" in error["message"] and f"at most {limit}" in error["message"]
        assert (engine.stats()["running"], engine.stats()["waiting"]) == (0, 0)  # no part of it was admitted
    accepted = post(3, 2)
    assert accepted.status_code == 200 and len(accepted.json()["choices"]) == 6


def test_invalid_json_and_unknown_routes(server) -> None:
    response = httpx.post(server.v1 + "/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert_envelope(response, 400, None, code="invalid_json")
    empty = httpx.post(server.v1 + "/chat/completions", content=b"", headers={"content-type": "application/json"})
    assert assert_envelope(empty, 400, None, code="missing_required_parameter")["message"] == (
        "the request body is empty: send a JSON object"
    )
    assert_envelope(httpx.get(server.v1 + "/nothing-here"), 404, None, type="not_found_error")
    assert_envelope(httpx.get(server.v1 + "/chat/completions"), 405, None)


def test_body_too_large_is_413(tiny_loaded) -> None:
    settings = Settings(max_body_bytes=2048, max_profile_bytes=4096)
    with live_server(tiny_loaded, settings) as live:
        big = {"model": "x", "messages": [{"role": "user", "content": "y" * 5000}]}
        assert_envelope(httpx.post(live.v1 + "/chat/completions", json=big), 413, None, code="request_too_large")

        def chunked():  # no Content-Length: the limit applies while reading
            yield json.dumps(big).encode()

        response = httpx.post(live.v1 + "/chat/completions", content=chunked(),
                              headers={"content-type": "application/json"})
        assert_envelope(response, 413, None)
        assert_envelope(httpx.put(live.v1 + "/profiles/big", content=b"z" * 5000), 413, None)
        assert_envelope(httpx.put(live.v1 + "/profiles/big", content=chunked()), 413, None)


def test_max_tokens_limit_setting(tiny_loaded) -> None:
    with live_server(tiny_loaded, Settings(max_tokens_limit=8, max_n=2)) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        assert_envelope(chat(live, base, max_tokens=9), 400, "max_tokens")
        assert_envelope(chat(live, base, n=3), 400, "n")
        assert chat(live, base, max_tokens=8).status_code == 200


def _tokens_generated(live) -> float:
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith("rahf_tokens_total{") and 'kind="completion"' in line:
            return float(line.split()[-1])
    return 0.0


def test_over_capacity_is_429_and_disconnect_frees_the_slot(tiny_loaded) -> None:
    with live_server(tiny_loaded, Settings(max_batch_size=1, max_queue=0, retry_after_s=2)) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        engine = live.app.state.serving.engine
        long = {"model": base, "messages": [{"role": "user", "content": "go"}], "max_tokens": 480,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", live.v1 + "/chat/completions", json=long, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            assert (engine.stats()["running"], engine.stats()["waiting"]) == (1, 0)
            busy = chat(live, base)
            assert_envelope(busy, 429, None, code="overloaded", type="rate_limit_error")
            assert busy.headers["retry-after"] == "2"
            streamed = chat(live, base, stream=True)  # refused before the stream starts: a plain 429
            assert streamed.status_code == 429 and streamed.headers["content-type"] == "application/json"
        deadline = time.monotonic() + 30
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (engine.stats()["running"], engine.stats()["waiting"]) == (0, 0)
        assert _tokens_generated(live) < 480  # the closed stream was cancelled, not run to the end
        assert chat(live, base).status_code == 200


def _fake_server(tiny_loaded, engine: ScriptedEngine):
    def backend(settings: Settings) -> Backend:
        return Backend("scripted", engine, tiny_loaded.tokenizer, tiny_loaded.fingerprint, tiny_loaded.name)

    return live_server(tiny_loaded, Settings(), backend_factory=backend)


def test_engine_errors_map_to_statuses(tiny_loaded) -> None:
    with _fake_server(tiny_loaded, ScriptedEngine([], EngineOverloadedError("full", 3.2), fail_at_start=True)) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        response = chat(live, base)
        assert_envelope(response, 429, None, code="overloaded")
        assert response.headers["retry-after"] == "4"
    with _fake_server(tiny_loaded, ScriptedEngine([], EngineShutdownError("stopping"), fail_at_start=True)) as live:
        response = chat(live, base, stream=True)
        assert_envelope(response, 503, None, code="shutting_down", type="service_unavailable")
        assert response.headers["retry-after"]


def test_failure_inside_a_stream_is_an_enveloped_event(tiny_loaded) -> None:
    h = tiny_loaded.tokenizer.convert_tokens_to_ids("h")
    engine = ScriptedEngine([h, h], RuntimeError("kaboom: secret internals"))
    with _fake_server(tiny_loaded, engine) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        with httpx.stream("POST", live.v1 + "/chat/completions", timeout=60,
                          json={"model": base, "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            assert r.status_code == 200
            data = [line[6:] for line in r.iter_lines() if line.startswith("data:")]
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2])["error"]
        assert error["type"] == "server_error" and "kaboom" not in error["message"]
        assert "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-2]) == "hh"
        # without streaming the same failure is a 500 envelope that hides the internals
        failed = chat(live, base)
        assert_envelope(failed, 500, None, type="server_error")
        assert "kaboom" not in failed.text
        assert engine.closed == 2


def test_not_ready_is_503() -> None:
    app = create_app(Settings())  # lifespan not run: no model yet

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/chat/completions", json={"model": "x", "messages": [
                {"role": "user", "content": "hi"}]})
            assert_envelope(response, 503, None, code="not_ready")
            assert response.headers["retry-after"] == "5"
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).json() == {"status": "ok"}

    asyncio.run(run())
