"""End to end with the embedded default model (SmolLM2-135M-Instruct) through the openai client."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import torch

from server.config import Settings
from steering_vectors.core.profile import Profile

from .conftest import live_server

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def default_live(default_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("default-profiles")
    generator = torch.Generator().manual_seed(0)
    hidden = default_model.fingerprint.hidden_size
    offsets = {layer: torch.randn(hidden, generator=generator) * 8.0 for layer in range(8, 14)}
    Profile("loud", offsets, fingerprint=default_model.fingerprint).save(directory / "loud.safetensors")
    with live_server(default_model, Settings(profile_dir=directory, default_max_tokens=16)) as live:
        yield live


def test_default_model_chat_stream_steering_and_scoring(default_live) -> None:
    client = openai.OpenAI(base_url=default_live.v1, api_key="x", max_retries=0)
    base = client.models.list().data[0].id
    assert base == "SmolLM2-135M-Instruct"
    ready = httpx.get(default_live.url + "/readyz").json()
    assert ready["quantize"] == "int4"  # Q4_1 weights: packed losslessly
    assert ready["fast_decode"] is True

    plain = client.chat.completions.create(model=base, messages=QUESTION, temperature=0, max_tokens=8)
    assert "Paris" in plain.choices[0].message.content

    chunks = list(
        client.chat.completions.create(model=base, messages=QUESTION, temperature=0, max_tokens=8, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)

    zero = client.chat.completions.create(model=f"{base}:loud@0", messages=QUESTION, temperature=0, max_tokens=8)
    assert zero.choices[0].message.content == plain.choices[0].message.content
    steered = client.chat.completions.create(
        model=base,
        messages=QUESTION,
        temperature=0,
        max_tokens=8,
        extra_body={"steering": {"profile": "loud", "strength": 1.0}},
    )
    assert steered.choices[0].message.content != plain.choices[0].message.content
    (entry,) = steered.model_extra["steering"]["profiles"]
    digest = entry.pop("digest")  # the served file's content digest (which version of the profile served it)
    assert entry == {"profile": "loud", "strength": 1.0}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)

    text = "The capital of France is Paris."
    scored = client.completions.create(model=base, prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == text and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    wrong = client.completions.create(
        model=base, prompt="The capital of France is Berlin.", max_tokens=0, echo=True, logprobs=0
    )
    assert sum(lp.token_logprobs[1:]) > sum(wrong.choices[0].logprobs.token_logprobs[1:])
