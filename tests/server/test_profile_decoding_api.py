"""A profile's decoding defaults through the HTTP API (tiny model): a request that leaves repetition_penalty out
gets the acting profile's, exactly as if it had set it, and the response's `steering.decoding` says so (streaming
too); a request's own value wins and is not reported as the profile's; a conditional profile's penalty applies
only when its condition fires; the profile listing shows the defaults; a file with bad ones gets a 400 in the
error envelope and the stored profile stays as it was."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from server.config import Settings
from steering_vectors.core.profile import Condition, Profile

from .conftest import live_server

PROMPT = "Tell me about the sea and the sea and the sea"
MAX = 16
PENALTY = 1.8


def make(loaded, name: str, *, decoding: dict | None = None, threshold: float | None = None) -> Profile:
    g = torch.Generator().manual_seed(7)
    hidden = loaded.fingerprint.hidden_size
    offsets = {layer: torch.randn(hidden, generator=g) * 2 for layer in (1, 2)}  # the same for every name
    cond = None if threshold is None else Condition(layer=1, direction=torch.randn(hidden, generator=g),
                                                    threshold=threshold)
    return Profile(name=name, offsets=offsets, fingerprint=loaded.fingerprint, condition=cond,
                   decoding=decoding or {})


@pytest.fixture(scope="module")
def live(tiny_loaded, tmp_path_factory):
    directory = tmp_path_factory.mktemp("decoding-profiles")
    rp = {"repetition_penalty": PENALTY}
    make(tiny_loaded, "carrying", decoding=rp).save(directory / "carrying.safetensors")
    make(tiny_loaded, "bare").save(directory / "bare.safetensors")
    make(tiny_loaded, "fires", decoding=rp, threshold=-2.0).save(directory / "fires.safetensors")
    make(tiny_loaded, "quiet", decoding=rp, threshold=2.0).save(directory / "quiet.safetensors")
    with live_server(tiny_loaded, Settings(profile_dir=directory, default_max_tokens=MAX)) as server:
        server.base = httpx.get(server.v1 + "/models").json()["data"][0]["id"]
        yield server


def chat(live, steering=None, **extra) -> dict:
    body = {"model": live.base, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": MAX, **extra}
    if steering is not None:
        body["steering"] = steering
    response = httpx.post(live.v1 + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def text(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


def test_a_request_without_a_penalty_takes_the_profiles(live) -> None:
    taken = chat(live, {"profile": "carrying"})
    assert taken["steering"]["decoding"] == {"repetition_penalty": PENALTY}
    assert text(taken) == text(chat(live, {"profile": "bare"}, repetition_penalty=PENALTY))
    plain = chat(live, {"profile": "bare"})
    assert "decoding" not in plain["steering"] and text(plain) != text(taken)  # the penalty changes this reply
    own = chat(live, {"profile": "carrying"}, repetition_penalty=1.0)  # the request's own value wins
    assert text(own) == text(plain) and "decoding" not in own["steering"]
    idle = chat(live, [{"profile": "carrying", "strength": 0}, {"profile": "bare"}])  # strength 0 does not act
    assert text(idle) == text(plain) and "decoding" not in idle["steering"]


def test_a_conditional_profiles_penalty_waits_for_its_condition(live) -> None:
    fired = chat(live, {"profile": "fires"})
    assert fired["steering"]["profiles"][0]["condition"]["applied"] is True
    assert fired["steering"]["decoding"] == {"repetition_penalty": PENALTY}
    assert text(fired) == text(chat(live, {"profile": "carrying"}))
    quiet = chat(live, {"profile": "quiet"})
    assert quiet["steering"]["profiles"][0]["condition"]["applied"] is False
    assert "decoding" not in quiet["steering"] and text(quiet) == text(chat(live))


def test_streaming_reports_the_profiles_decoding(live) -> None:
    body = {"model": live.base, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": MAX, "stream": True, "steering": {"profile": "carrying"}}
    with httpx.stream("POST", live.v1 + "/chat/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    assert chunks[0]["steering"]["decoding"] == {"repetition_penalty": PENALTY}
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text(chat(live, {"profile": "carrying"}))


def test_the_listing_shows_decoding_and_bad_files_are_refused(live, tiny_loaded) -> None:
    shown = httpx.get(live.v1 + "/profiles/carrying").json()
    assert shown["decoding"] == {"repetition_penalty": PENALTY} and shown["format_version"] == 5
    assert httpx.get(live.v1 + "/profiles/bare").json()["decoding"] == {}
    good = make(tiny_loaded, "carrying", decoding={"repetition_penalty": PENALTY})
    tensors = {f"offset.{layer}": offset for layer, offset in good.offsets.items()}
    for decoding in ('{"repetition_penalty": 0.1}', '{"temperature": 1.8}', '[1.8]', "1.8"):  # range, field, kind
        bad = st_save(tensors, metadata={**good.metadata(), "decoding": decoding})
        refused = httpx.put(live.v1 + "/profiles/carrying", content=bad, timeout=60)
        assert refused.status_code == 400, refused.text
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert "decoding" in refused.json()["error"]["message"]
    assert httpx.get(live.v1 + "/profiles/carrying").json() == shown  # the stored profile is unchanged
