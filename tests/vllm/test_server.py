"""The server on the vLLM backend, end to end through the official `openai` client and plain HTTP (tiny
model): chat, streaming, completions with echo and logprobs, the `base:profile@strength` alias, profile
upload / replace / delete taking effect on the next request, n > 1 with seeds, stop strings, `response_format`
through vLLM's structured outputs, and bad requests refused with a 4xx that names the parameter."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from server.backends.base import GenerationRequest, SamplingParams
from server.backends.vllm.engine import profile_digest
from server.config import Settings
from steering_vectors.core.profile import Profile
from tests.server.conftest import live_server

PROMPT = "Tell me a story"
MAX = 12


def make(backend, name: str, seed: int, scale: float = 4.0) -> Profile:
    g = torch.Generator().manual_seed(seed)
    offsets = {layer: torch.randn(backend.fingerprint.hidden_size, generator=g) * scale for layer in (1, 2)}
    return Profile(name=name, offsets=offsets, fingerprint=backend.fingerprint)


@pytest.fixture(scope="module")
def server(vllm_backend):
    settings = Settings(backend="vllm", max_batch_size=8, max_queue=8, max_model_len=512)
    with live_server(None, settings, backend_factory=lambda _settings: vllm_backend) as live:
        live.base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def upload(server, profile: Profile) -> httpx.Response:
    return httpx.put(server.v1 + f"/profiles/{profile.name}", content=profile.to_bytes(), timeout=60)


def engine_greedy(backend, steering_entries=(), tokens: int = MAX) -> str:
    """The reply text the engine gives the chat prompt directly (the serving layer's reference)."""
    from steering_vectors.core.hooks import RowSteering

    ids = backend.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                tokenize=False)
    ids = backend.tokenizer(ids, add_special_tokens=False)["input_ids"]
    entries = list(steering_entries)
    steering = RowSteering.from_profiles(entries, model=backend.fingerprint) if entries else None
    request = GenerationRequest("ref", ids, SamplingParams(max_new_tokens=tokens, temperature=0.0,
                                                           stop_token_ids=backend.stop_token_ids), steering=steering)

    async def main():
        out = []
        async for event in backend.engine.generate(request):
            out += event.token_ids
        return out

    return backend.tokenizer.decode(asyncio.run(main()), skip_special_tokens=True)


def chat(client, model, **kwargs):
    kwargs.setdefault("max_tokens", MAX)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], **kwargs)


def test_readyz_names_the_backend(server) -> None:
    body = httpx.get(server.url + "/readyz").json()
    assert body["status"] == "ready"
    assert "vllm" in str(body)


def test_chat_unsteered_and_steered(server, client, vllm_backend) -> None:
    profile = make(vllm_backend, "warm", 1)
    assert upload(server, profile).status_code in (200, 201)
    plain = chat(client, server.base)
    assert plain.choices[0].message.content == engine_greedy(vllm_backend)
    assert plain.model_extra["steering"] is None
    steered = chat(client, server.base, extra_body={"steering": {"profile": "warm", "strength": 2.0}})
    assert steered.choices[0].message.content == engine_greedy(vllm_backend, [(profile, 2.0)])
    assert steered.choices[0].message.content != plain.choices[0].message.content
    (reported,) = steered.model_extra["steering"]["profiles"]
    # the digest the store serves the file under is the one its worker slot is keyed by
    assert reported == {"profile": "warm", "strength": 2.0, "digest": "sha256:" + profile_digest(profile)}
    alias = chat(client, f"{server.base}:warm@2")
    assert alias.choices[0].message.content == steered.choices[0].message.content


def test_streaming_gives_the_same_text(server, client, vllm_backend) -> None:
    upload(server, make(vllm_backend, "warm", 1))
    whole = chat(client, server.base, extra_body={"steering": {"profile": "warm", "strength": 1.5}})
    chunks = chat(client, server.base, stream=True, extra_body={"steering": {"profile": "warm", "strength": 1.5}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_completions_echo_with_logprobs(server, client) -> None:
    reply = client.completions.create(model=server.base, prompt="The sea", max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == "The sea"
    assert choice.logprobs.token_logprobs[0] is None and all(
        isinstance(v, float) and v < 0 for v in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.tokens == list("The sea")  # one token per character, no bos in this tokenizer
    scored = client.completions.create(model=server.base, prompt="The sea", max_tokens=4, echo=True, logprobs=1,
                                       temperature=0)
    assert scored.choices[0].text.startswith("The sea") and len(scored.choices[0].logprobs.tokens) == 7 + 4


def test_upload_replace_delete_take_effect_on_the_next_request(server, client, vllm_backend) -> None:
    first, second = make(vllm_backend, "swap", 11), make(vllm_backend, "swap", 12)
    assert upload(server, first).status_code in (200, 201)
    body = {"steering": {"profile": "swap", "strength": 1.0}}
    assert chat(client, server.base, extra_body=body).choices[0].message.content == engine_greedy(
        vllm_backend, [(first, 1.0)])
    assert upload(server, second).status_code == 200
    assert chat(client, server.base, extra_body=body).choices[0].message.content == engine_greedy(
        vllm_backend, [(second, 1.0)])
    assert httpx.delete(server.v1 + "/profiles/swap").status_code == 200
    with pytest.raises(openai.NotFoundError) as gone:
        chat(client, server.base, extra_body=body)
    assert "swap" in str(gone.value) and gone.value.body["code"] == "profile_not_found"


def test_n_choices_with_a_seed_and_stop_strings(server, client) -> None:
    reply = chat(client, server.base, n=3, temperature=1.0, seed=5, max_tokens=16)
    again = chat(client, server.base, n=3, temperature=1.0, seed=5, max_tokens=16)
    texts = [c.message.content for c in reply.choices]
    assert texts == [c.message.content for c in again.choices] and len(texts) == 3
    plain = chat(client, server.base, max_tokens=16).choices[0].message.content
    stop = plain[3:5]
    cut = chat(client, server.base, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == plain[: plain.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.mark.parametrize("steered", [False, True])
def test_response_format_through_vllms_structured_outputs(server, client, vllm_backend, steered) -> None:
    import json

    upload(server, make(vllm_backend, "warm", 1))
    extra = {"steering": {"profile": "warm", "strength": 1.0}} if steered else {}
    reply = chat(client, server.base, max_tokens=200, extra_body=extra, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and isinstance(value["n"], int)
    assert reply.choices[0].finish_reason == "stop"
    assert " " not in reply.choices[0].message.content  # no whitespace between JSON tokens, as on transformers
    # (json_object on this random model writes one endless key; the default model's test checks it whole)


def test_a_schema_that_cannot_compile_is_a_400_naming_response_format(server) -> None:
    response = httpx.post(server.v1 + "/chat/completions", json={
        "model": server.base, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
        timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"


def test_unknown_profile_is_a_404_and_a_bad_strength_a_400(server, vllm_backend) -> None:
    upload(server, make(vllm_backend, "warm", 1))
    for steering, status in (({"profile": "nope"}, 404), ({"profile": "warm", "strength": 1e9}, 400)):
        response = httpx.post(server.v1 + "/chat/completions", json={
            "model": server.base, "messages": [{"role": "user", "content": "hi"}], "steering": steering}, timeout=60)
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"].startswith("steering")


def test_ignore_eos_gives_replies_of_max_tokens(server, client) -> None:
    reply = client.completions.create(model=server.base, prompt="The sea", max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"
