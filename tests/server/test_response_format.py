"""`response_format` json_object / json_schema on /v1/chat/completions (llguidance, one grammar state per
row): replies that are instances of the schema and exactly the constrained greedy tokens of a full
recompute, constrained rows beside steered ones in one batch, n, streaming, logprobs, stop sequences,
max_tokens, and every bad response_format a 400 in the error envelope. The tiny model (a character
tokenizer that llguidance is given token by token) for most; the embedded default model (a real BPE
tokenizer read by llguidance itself) for the official client's json_object and json_schema."""

from __future__ import annotations

import concurrent.futures
import json
import math

import httpx
import jsonschema_rs
import numpy as np
import openai
import pytest
import torch

from server.backends.base import Backend
from server.backends.transformers import stop_token_ids
from server.config import Settings
from server.structured import Grammars, TokenizerUnsupportedError, build_tokenizer
from steering_vectors.core.hooks import Steerer, build_plan, combine_low_rank, combine_offsets

from .conftest import live_server
from .fakes import ScriptedEngine
from .reference import chat_ids, greedy, text_of
from .test_errors import assert_envelope

PROMPT = "Tell me a story"
# a schema whose instances are short, so that even the random tiny model completes one
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "mood": {"enum": ["calm", "odd"]},
    },
    "required": ["ok", "n", "mood"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
MAX = 48


class Format:
    """A parsed response_format, as server.structured reads it."""

    def __init__(self, kind: str, schema: dict | None = None, strict: bool = True) -> None:
        from server.protocol import parse_response_format

        body = {"type": kind}
        if schema is not None:
            body["json_schema"] = {"name": "x", "schema": schema, "strict": strict}
        self.parsed = parse_response_format(body)


@torch.inference_mode()
def constrained_greedy(loaded, prompt_ids: list[int], max_new: int, schema: dict = SCHEMA, steering=None):
    """Greedy by full recomputation, each step's logits masked by a fresh llguidance matcher for `schema`:
    (tokens, finish_reason)."""
    stops = stop_token_ids(loaded.tokenizer, loaded.model.generation_config)
    constraint = Grammars(loaded.tokenizer, stops).constraint(Format("json_schema", schema).parsed)
    steerer = Steerer.attach(loaded.model)
    plan = build_plan([combine_offsets(steering)], row_low_rank=[combine_low_rank(steering)]) if steering else None
    ids, out = list(prompt_ids), []
    with steerer.steering(plan):
        for _ in range(max_new):
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            mask = constraint.allowed()
            allowed[: mask.numel()] = mask
            token = int(torch.argmax(logits.masked_fill(~allowed, float("-inf"))))
            constraint.advance(token)
            out.append(token)
            ids.append(token)
            if token in stops or constraint.done:
                return out, "stop"
    return out, "length"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return httpx.get(server.v1 + "/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def expected(tiny_loaded) -> tuple[list[int], str]:
    return constrained_greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX)


def ask(client: openai.OpenAI, model: str, **kwargs):
    kwargs.setdefault("max_tokens", MAX)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], **kwargs)


def assert_instance(text: str, schema: dict = SCHEMA) -> dict:
    value = json.loads(text)
    jsonschema_rs.validator_for(schema).validate(value)
    return value


def test_mask_is_llguidance_s_own_bitmask(tiny_loaded) -> None:
    """The engine's bool mask unpacks llguidance's bitmask as llguidance's numpy helper applies it."""
    from llguidance.numpy import apply_token_bitmask_inplace

    constraint = Grammars(tiny_loaded.tokenizer, {2, 5}).constraint(Format("json_schema", SCHEMA).parsed)
    for token in tiny_loaded.tokenizer('{"ok":true,"n":', add_special_tokens=False)["input_ids"] + [None]:
        mask = constraint.allowed()
        raw = np.frombuffer(constraint._matcher.compute_bitmask(), dtype=np.int32).reshape(1, -1).copy()
        logits = np.zeros((1, mask.numel()), dtype=np.float32)
        apply_token_bitmask_inplace(logits, raw)
        assert mask.tolist() == np.isfinite(logits[0]).tolist()
        assert 0 < int(mask.sum()) < mask.numel()
        if token is not None:
            assert mask[token]
            constraint.advance(token)


def test_json_schema_reply_is_the_constrained_greedy_instance(client, model_name, tiny_loaded, expected) -> None:
    tokens, finish = expected
    assert finish == "stop"  # the reference completes an instance within MAX tokens
    reply = ask(client, model_name, response_format=FORMAT)
    choice = reply.choices[0]
    assert choice.message.content == text_of(tiny_loaded, tokens)
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens == len(tokens)
    value = assert_instance(choice.message.content)
    assert list(value) == ["ok", "n", "mood"]
    assert " " not in choice.message.content  # no whitespace between JSON tokens
    # the same request unconstrained is not JSON at all on this random model
    free = ask(client, model_name, max_tokens=len(tokens)).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


def test_stream_gives_the_same_instance(client, model_name, tiny_loaded, expected) -> None:
    chunks = list(ask(client, model_name, response_format=FORMAT, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == text_of(tiny_loaded, expected[0])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_constrained_and_steered_rows_in_one_batch(client, model_name, tiny_loaded, tiny_profiles, expected) -> None:
    """Sent at once (the engine has 4 rows): the constrained replies are the constrained greedy instance,
    the steered and plain replies are exactly what they are alone."""
    steered = greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), 16, [(tiny_profiles["alpha"], 1.5)])
    plain = greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), 16)
    steered_json, _ = constrained_greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX,
                                         steering=[(tiny_profiles["alpha"], 1.5)])
    assert steered_json != expected[0]  # the steering acts on the constrained row too
    jobs = {
        "json": dict(response_format=FORMAT),
        "steered": dict(max_tokens=16, extra_body={"steering": {"profile": "alpha", "strength": 1.5}}),
        "plain": dict(max_tokens=16),
        "steered json": dict(response_format=FORMAT, extra_body={"steering": {"profile": "alpha", "strength": 1.5}}),
    }
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {name: pool.submit(ask, client, model_name, **kwargs) for name, kwargs in jobs.items()}
            got = {name: future.result().choices[0].message.content for name, future in futures.items()}
        assert got["json"] == text_of(tiny_loaded, expected[0])
        assert got["steered"] == text_of(tiny_loaded, steered)
        assert got["plain"] == text_of(tiny_loaded, plain)
        assert got["steered json"] == text_of(tiny_loaded, steered_json)
        assert_instance(got["steered json"])


def test_each_choice_has_its_own_grammar_state(client, model_name) -> None:
    """n = 3 sampled choices: each is an instance, and choice i is what n = 1 with seed + i gives."""
    many = ask(client, model_name, response_format=FORMAT, n=3, temperature=1.0, seed=11)
    texts = [c.message.content for c in many.choices]
    for text in texts:
        assert_instance(text)
    singles = [ask(client, model_name, response_format=FORMAT, temperature=1.0, seed=11 + i).choices[0].message.content
               for i in range(3)]
    assert texts == singles
    assert all(c.finish_reason == "stop" for c in many.choices)


def test_logprobs_are_those_of_the_constrained_distribution(client, model_name, tiny_loaded, expected) -> None:
    reply = ask(client, model_name, response_format=FORMAT, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert [entry.token for entry in content] == [tiny_loaded.tokenizer.decode([t]) for t in expected[0]]
    first = content[0]  # only "{" may open the reply
    assert (first.token, first.logprob) == ("{", 0.0)
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("{", 0.0)]
    after_ok = content[len('{"ok":')]  # true or false: two tokens ("t", "f") share the whole probability
    assert {t.token for t in after_ok.top_logprobs} == {"t", "f"}
    assert sum(np.exp([t.logprob for t in after_ok.top_logprobs])) == pytest.approx(1.0, abs=1e-5)


def test_stop_sequences_and_max_tokens_still_apply(client, model_name, tiny_loaded, expected) -> None:
    text = text_of(tiny_loaded, expected[0])
    cut = ask(client, model_name, response_format=FORMAT, stop=['"mood"']).choices[0]
    assert (cut.message.content, cut.finish_reason) == (text[: text.index('"mood"')], "stop")
    short = ask(client, model_name, response_format=FORMAT, max_tokens=5).choices[0]
    assert (short.message.content, short.finish_reason) == (text_of(tiny_loaded, expected[0][:5]), "length")


def test_json_object_and_lenient_schemas(client, model_name) -> None:
    """json_object opens an object (the random model does not finish one within a few tokens); a
    non-strict schema may carry keywords that cannot be enforced, a strict one may not."""
    opened = ask(client, model_name, response_format={"type": "json_object"}, max_tokens=3).choices[0]
    assert opened.message.content.startswith("{") and opened.finish_reason == "length"
    unique = {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "maxItems": 2}
    lenient = {"type": "json_schema", "json_schema": {"name": "flags", "schema": unique}}
    reply = ask(client, model_name, response_format=lenient).choices[0]
    assert isinstance(json.loads(reply.message.content), list) and reply.finish_reason == "stop"
    strict = {"type": "json_schema", "json_schema": {"name": "flags", "schema": unique, "strict": True}}
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, model_name, response_format=strict)
    assert refused.value.body["param"] == "response_format"
    assert "uniqueItems" in refused.value.body["message"]


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


BAD_FORMATS = [
    ({"type": "xml"}, "type must be one of 'text', 'json_object', 'json_schema', not 'xml'"),
    ({}, "type is required"),
    ("json_object", "valid dictionary"),
    ({"type": "json_object", "schema": {}}, "schema is not a field of response_format"),
    ({"type": "json_schema"}, "json_schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema is required"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name is required"),
    ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "Invalid type: objectx"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}, "Unsatisfiable schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}}, "does not exist"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}},
     "regex parse error"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}, "strict": True}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": nested(200)}}, "recursion limit"),
]


@pytest.mark.parametrize(("response_format", "message"), BAD_FORMATS)
def test_bad_response_formats_are_400(server, model_name, response_format, message) -> None:
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": response_format}
    for stream in (False, True):
        response = httpx.post(server.v1 + "/chat/completions", json={**body, "stream": stream}, timeout=60)
        error = assert_envelope(response, 400, "response_format")
        assert message in error["message"], error


def test_schemas_nested_beyond_python_s_recursion_limit_are_refused(tiny_loaded) -> None:
    from server.structured import ResponseFormatError

    grammars = Grammars(tiny_loaded.tokenizer, {2, 5})
    with pytest.raises(ResponseFormatError, match="nested too deeply"):
        grammars.compile(Format("json_schema", nested(5000)).parsed)


def test_integers_beyond_64_bits_in_a_schema_are_json_numbers(client, model_name) -> None:
    """A schema is JSON, whose numbers have no size: an integer beyond 64 bits (here a bound no reply reaches) is
    read as a JSON parser reads it (a double), not refused as Python's conversion to llguidance would."""
    huge = -1116377387411423539959573103247360
    schema = {"type": "array", "items": {"type": "boolean"}, "maxItems": 2, "x-bound": huge}
    reply = ask(client, model_name, response_format={"type": "json_schema", "json_schema": {
        "name": "flags", "schema": schema}}).choices[0]
    assert isinstance(json.loads(reply.message.content), list) and reply.finish_reason == "stop"
    pinned = ask(client, model_name, max_tokens=32, response_format={"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"const": 2**70}}}).choices[0]
    # 2**70 read as a double, which llguidance prints as an integer within one unit in the last place
    assert math.isclose(json.loads(pinned.message.content), 2**70, rel_tol=1e-15) and pinned.finish_reason == "stop"


def test_completions_take_no_response_format(server, model_name) -> None:
    body = {"model": model_name, "prompt": "x", "max_tokens": 2, "response_format": {"type": "json_object"}}
    response = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert_envelope(response, 400, "response_format", code="unsupported_parameter")
    text = httpx.post(server.v1 + "/completions", json={**body, "response_format": {"type": "text"}}, timeout=60)
    assert text.status_code == 200, text.text


def test_a_backend_without_constraints_refuses_response_format(tiny_loaded) -> None:
    engine = ScriptedEngine([tiny_loaded.tokenizer.convert_tokens_to_ids("{")])

    def backend(settings: Settings) -> Backend:
        return Backend("scripted", engine, tiny_loaded.tokenizer, tiny_loaded.fingerprint, tiny_loaded.name)

    with live_server(tiny_loaded, Settings(), backend_factory=backend) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        body = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        response = httpx.post(live.v1 + "/chat/completions", json={**body, "response_format": {"type": "json_object"}})
        error = assert_envelope(response, 400, "response_format", code="unsupported_parameter")
        assert "backend" in error["message"]
        assert engine.requests == []
        assert httpx.post(live.v1 + "/chat/completions", json=body).status_code == 200


def test_a_tokenizer_llguidance_cannot_be_given_is_refused(tiny_loaded) -> None:
    class Spaceless:
        """A tokenizer whose tokens decoded alone lose their spaces (as SentencePiece's do)."""

        def __init__(self, inner) -> None:
            self.inner = inner
            self.all_special_ids = inner.all_special_ids
            self.bos_token_id = inner.bos_token_id
            self.eos_token_id = inner.eos_token_id

        def __len__(self) -> int:
            return len(self.inner)

        def __call__(self, text, **kwargs):
            return self.inner(text, **kwargs)

        def convert_ids_to_tokens(self, i):
            return self.inner.convert_ids_to_tokens(i)

        def decode(self, ids, **kwargs) -> str:
            return self.inner.decode(ids, **kwargs).replace(" ", "")

    with pytest.raises(TokenizerUnsupportedError, match="do not spell the text"):
        build_tokenizer(Spaceless(tiny_loaded.tokenizer), {5})
    assert build_tokenizer(tiny_loaded.tokenizer, {2, 5}).vocab_size == 512


# -- the embedded default model: a real BPE tokenizer, the official client -----------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def default_client(default_model):
    with live_server(default_model, Settings(profile_dir=None, max_batch_size=4)) as live:
        yield openai.OpenAI(base_url=live.v1, api_key="x", max_retries=0)


@pytest.mark.slow
def test_default_model_json_object_through_the_openai_client(default_client) -> None:
    reply = default_client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Describe a cat with its name and age as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict), choice.message.content


@pytest.mark.slow
def test_default_model_json_schema_through_the_openai_client(default_client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Invent a programmer: name, age and the languages they use."}]
    reply = default_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, response_format=fmt, temperature=0, max_tokens=96, n=2,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        assert_instance(choice.message.content, PERSON)
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy: two equal rows
    streamed = default_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, response_format=fmt, temperature=0, max_tokens=96,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
