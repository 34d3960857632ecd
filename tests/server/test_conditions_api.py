"""Conditional profiles through the HTTP API (tiny model): the response's `steering` field reports per
conditional profile whether it was applied and its probe's score (streaming and n > 1 alike), `"condition":
"ignore"` applies the profile regardless, the metrics count fired and not fired, and bad condition files and
bodies get 400s in the error envelope, leaving the stored profile as it was."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from server.config import Settings
from steering_vectors.core.profile import Condition, Profile

from .conftest import live_server

PROMPT = "Tell me about the sea"
MAX = 10


def make(loaded, name: str, seed: int, threshold: float | None, comparison: str = ">") -> Profile:
    g = torch.Generator().manual_seed(seed)
    hidden = loaded.fingerprint.hidden_size
    offsets = {layer: torch.randn(hidden, generator=g) * 4 for layer in (1, 2)}  # drawn first: same seed, same
    cond = None if threshold is None else Condition(layer=1, direction=torch.randn(hidden, generator=g),
                                                    threshold=threshold, comparison=comparison)
    return Profile(name=name, offsets=offsets, fingerprint=loaded.fingerprint, condition=cond)


@pytest.fixture(scope="module")
def live(tiny_loaded, tmp_path_factory):
    directory = tmp_path_factory.mktemp("conditional-profiles")
    make(tiny_loaded, "always", 1, -2.0).save(directory / "always.safetensors")
    make(tiny_loaded, "never", 2, 2.0).save(directory / "never.safetensors")
    make(tiny_loaded, "plain", 1, None).save(directory / "plain.safetensors")  # always's offsets, no condition
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


def reported(body: dict) -> dict[str, dict]:
    return {entry["profile"]: entry for entry in body["steering"]["profiles"]}


def test_a_condition_that_does_not_fire_leaves_the_reply_unsteered(live) -> None:
    plain = chat(live)["choices"][0]["message"]["content"]
    body = chat(live, {"profile": "never", "strength": 2.0})
    assert body["choices"][0]["message"]["content"] == plain
    (entry,) = body["steering"]["profiles"]
    assert entry["condition"]["applied"] is False and -1.0 <= entry["condition"]["score"] <= 1.0
    forced = chat(live, {"profile": "never", "strength": 2.0, "condition": "ignore"})
    assert forced["choices"][0]["message"]["content"] != plain
    assert "condition" not in forced["steering"]["profiles"][0]  # applied as a plain profile


@pytest.mark.parametrize("position", [None, "generated"])
def test_a_condition_that_fires_steers_as_the_plain_profile_does(live, position) -> None:
    extra = {} if position is None else {"position": position}
    fired = chat(live, {"profile": "always", "strength": 1.5, **extra}, logprobs=True)
    assert reported(fired)["always"]["condition"]["applied"] is True
    assert fired["steering"]["position"] == (position or "all")  # the profile's own mode unless overridden
    same = chat(live, {"profile": "plain", "strength": 1.5, **extra}, logprobs=True)
    assert fired["choices"][0]["message"]["content"] == same["choices"][0]["message"]["content"]
    assert fired["choices"][0]["logprobs"] == same["choices"][0]["logprobs"]
    other = chat(live, {"profile": "plain", "strength": 1.5, "position": "all" if position else "generated"})
    assert other["choices"][0]["message"]["content"] != fired["choices"][0]["message"]["content"]


def test_streaming_and_n_report_the_same_decision(live) -> None:
    steering = [{"profile": "always", "strength": 1.0}, {"profile": "never", "strength": 1.0}]
    whole = chat(live, steering, n=3, temperature=1.0, seed=3)
    decisions = {name: e["condition"] for name, e in reported(whole).items()}
    assert decisions["always"]["applied"] is True and decisions["never"]["applied"] is False
    with httpx.stream("POST", live.v1 + "/chat/completions", timeout=60, json={
            "model": live.base, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX,
            "stream": True, "steering": steering, "n": 2}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = {e["profile"]: e["condition"] for e in chunks[0]["steering"]["profiles"]}
    assert streamed == decisions  # the same prompt, the same scores


def test_metrics_count_fired_and_not_fired(live) -> None:
    chat(live, [{"profile": "always"}, {"profile": "never"}])
    text = httpx.get(live.url + "/metrics").text
    fired = [line for line in text.splitlines() if line.startswith("rahf_profile_conditions_total")]
    assert any('profile="always"' in line and 'fired="true"' in line for line in fired)
    assert any('profile="never"' in line and 'fired="false"' in line for line in fired)


def test_profiles_listing_shows_the_condition(live) -> None:
    listed = {p["name"]: p for p in httpx.get(live.v1 + "/profiles").json()["data"]}
    assert listed["always"]["condition"] == {"layer": 1, "threshold": -2.0, "comparison": ">", "reads": "mean",
                                             "score": "cosine"}
    assert listed["plain"]["condition"] is None


def test_bad_condition_bodies_and_files_are_refused(live, tiny_loaded) -> None:
    response = httpx.post(live.v1 + "/chat/completions", timeout=60, json={
        "model": live.base, "messages": [{"role": "user", "content": "hi"}],
        "steering": {"profile": "always", "condition": "sometimes"}})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("steering")
    good = make(tiny_loaded, "always", 1, -2.0)
    before = httpx.get(live.v1 + "/profiles/always").json()
    far = Profile(name="always", offsets=good.offsets, fingerprint=good.fingerprint,
                  condition=Condition(layer=9, direction=good.condition.direction, threshold=0.0))
    data = good.to_bytes()
    bad_threshold = data.replace(b'threshold\\": -2.0', b'threshold\\": null')  # same length: a readable file
    assert bad_threshold != data
    for data in (far.to_bytes(), bad_threshold):
        refused = httpx.put(live.v1 + "/profiles/always", content=data, timeout=60)
        assert refused.status_code in (400, 422), refused.text  # 422: made for another model (as offsets)
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(live.v1 + "/profiles/always").json() == before  # the stored profile is unchanged
