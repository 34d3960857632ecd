"""`POST /v1/profiles/{name}/fit`: profiles from a few contrastive examples on the tiny model.

The stored offsets are checked against a reference computed here without the library's fit code: one
unpadded forward per side with `output_hidden_states`, means taken by hand, PCA by numpy's SVD."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from server.config import Settings
from steering_vectors.core.profile import Profile

from .conftest import live_server

PAIRS = [("a good and happy day", "a bad and sad day"), ("I love it", "I hate it"), ("yes, gladly", "no, never")]
REPLIES = [("hi there", "hello, friend!", "go away."), ("help me?", "of course, here", "no"),
           ("a joke", "why did the chicken", "I will not")]
INSTRUCTIONS = ("answer cheerfully", "answer gloomily")
PROMPTS = ["how is the weather", "tell me about cats", "what now"]


@pytest.fixture(scope="module")
def live(tiny_loaded, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fit-profiles")
    settings = Settings(profile_dir=directory, max_batch_size=4, strength_min=-10, strength_max=10)
    with live_server(tiny_loaded, settings) as live:
        yield live


def fit(live, name: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{live.v1}/profiles/{name}/fit", json=body, timeout=120, **kwargs)


# -- the reference -----------------------------------------------------------------------------------

def _chat(tokenizer, content: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _states(loaded, ids: list[int], read_from: int, layers: list[int]) -> tuple[np.ndarray, int]:
    """(L, H) float64 sums over positions read_from.. of the outputs of `layers`, and the count."""
    with torch.no_grad():
        hidden = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    sums = np.stack([hidden[layer + 1][0, read_from:].double().sum(0).numpy() for layer in layers])
    return sums, len(ids) - read_from


def reference_sides(loaded, shape: str, layers: list[int]) -> list[tuple[tuple[np.ndarray, int], ...]]:
    """Per pair: ((positive sums, count), (negative sums, count))."""
    tok = loaded.tokenizer
    out = []
    if shape == "pairs":
        for pos, neg in PAIRS:
            out.append(tuple(_states(loaded, tok(t, add_special_tokens=False)["input_ids"], 0, layers)
                             for t in (pos, neg)))
    elif shape == "replies":
        for prompt, pos, neg in REPLIES:
            head = _chat(tok, prompt)
            out.append(tuple(_states(loaded, head + tok(t, add_special_tokens=False)["input_ids"], len(head), layers)
                             for t in (pos, neg)))
    else:
        for prompt in PROMPTS:
            sides = [_chat(tok, prompt, system) for system in INSTRUCTIONS]
            out.append(tuple(_states(loaded, ids, len(ids) - 1, layers) for ids in sides))
    return out


def reference_offsets(sides, method: str) -> np.ndarray:
    """(L, H) offsets."""
    if method == "mean":
        pos = sum(p[0] for p, _ in sides) / sum(p[1] for p, _ in sides)
        neg = sum(n[0] for _, n in sides) / sum(n[1] for _, n in sides)
        return pos - neg
    diffs = np.stack([p[0] / p[1] - n[0] / n[1] for p, n in sides])  # (N, L, H)
    if method == "caa":
        return diffs.mean(0)
    out = []
    for layer in range(diffs.shape[1]):
        d = diffs[:, layer]
        _, _, vh = np.linalg.svd(d - d.mean(0), full_matrices=False)
        u = vh[0]
        m = float((d @ u).mean())
        out.append(u * m if m >= 0 else -u * -m)
    return np.stack(out)


def body_for(shape: str) -> dict:
    if shape == "pairs":
        return {"examples": [{"positive": p, "negative": n} for p, n in PAIRS]}
    if shape == "replies":
        return {"examples": [{"prompt": q, "positive": p, "negative": n} for q, p, n in REPLIES]}
    return {"instructions": {"positive": INSTRUCTIONS[0], "negative": INSTRUCTIONS[1]}, "prompts": PROMPTS}


# -- exact vectors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["pairs", "replies", "instructions"])
@pytest.mark.parametrize("method", ["caa", "pca", "mean"])
def test_fitted_offsets_match_the_reference(live, tiny_loaded, shape, method) -> None:
    layers = [0, 2]
    name = f"fit-{shape}-{method}"
    response = fit(live, name, {**body_for(shape), "method": method, "layers": layers, "default_strength": 1.5})
    assert response.status_code == 201, response.text
    summary = response.json()
    assert summary["id"] == name and summary["layers"] == layers and summary["default_strength"] == 1.5
    assert summary["method"] == f"quickfit/{method}"
    provenance = summary["provenance"]
    assert provenance["fit"] == method and provenance["layers"] == layers
    assert provenance["examples"]["shape"] == shape and provenance["examples"]["count"] == 3
    canonical = {"shape": shape, **body_for(shape)}
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert provenance["examples"]["sha256"] == digest

    stored = Profile.load(live.profile_dir / f"{name}.safetensors")
    expected = reference_offsets(reference_sides(tiny_loaded, shape, layers), method)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(stored.offsets[layer].double(), torch.from_numpy(expected[i]), atol=2e-5, rtol=1e-4)
    assert stored.fingerprint == tiny_loaded.fingerprint
    file_digest = "sha256:" + hashlib.sha256((live.profile_dir / f"{name}.safetensors").read_bytes()).hexdigest()
    assert summary["digest"] == file_digest == httpx.get(live.v1 + f"/profiles/{name}").json()["digest"]


def test_default_layers_a_refit_replaces_and_the_profile_steers_at_once(live, tiny_loaded) -> None:
    first = fit(live, "cheer", body_for("instructions"))
    assert first.status_code == 201, first.text
    assert first.json()["layers"] == [1, 2]  # the middle band of 4 layers
    assert first.json()["default_strength"] == 1.0 and first.json()["position_mode"] == "all"
    again = fit(live, "cheer", {**body_for("pairs"), "method": "mean", "position_mode": "generated"})
    assert again.status_code == 200, again.text
    assert again.json()["method"] == "quickfit/mean" and again.json()["position_mode"] == "generated"
    listed = httpx.get(live.v1 + "/profiles").json()["data"]
    assert [p["method"] for p in listed if p["id"] == "cheer"] == ["quickfit/mean"]
    base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
    chat = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "steering": {"profile": "cheer", "strength": 2}}
    steered = httpx.post(live.v1 + "/chat/completions", json=chat, timeout=60)
    assert steered.status_code == 200, steered.text
    applied = steered.json()["steering"]
    assert [(e["profile"], e["strength"]) for e in applied["profiles"]] == [("cheer", 2)]
    assert applied["position"] == "generated"


def test_a_profile_fitted_in_prompt_mode_steers_in_that_mode(live) -> None:
    made = fit(live, "cheer-prompt", {**body_for("pairs"), "position_mode": "prompt"})
    assert made.status_code == 201, made.text
    assert made.json()["position_mode"] == "prompt"
    base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
    chat = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "steering": {"profile": "cheer-prompt", "strength": 2}}
    steered = httpx.post(live.v1 + "/chat/completions", json=chat, timeout=60)
    assert steered.status_code == 200, steered.text
    assert steered.json()["steering"]["position"] == "prompt"


# -- bad input ---------------------------------------------------------------------------------------

BAD = [
    ("empty examples", {"examples": []}, "examples"),
    ("too many examples", {"examples": [{"positive": "a", "negative": "b"}] * 65}, "examples"),
    ("empty text", {"examples": [{"positive": "", "negative": "b"}]}, "examples[0].positive"),
    ("layer out of range", {**body_for("pairs"), "layers": [1, 4]}, "layers"),
    ("negative layer", {**body_for("pairs"), "layers": [-1]}, "layers[0]"),
    ("no layers", {**body_for("pairs"), "layers": []}, "layers"),
    ("unknown method", {**body_for("pairs"), "method": "svd"}, "method"),
    ("pca with one pair", {"examples": [{"positive": "a", "negative": "b"}], "method": "pca"}, "method"),
    ("both shapes", {**body_for("pairs"), **body_for("instructions")}, "examples"),
    ("instructions alone", {"instructions": {"positive": "a", "negative": "b"}}, "prompts"),
    ("prompts alone", {"prompts": ["a"]}, "instructions"),
    ("nothing", {}, "examples"),
    ("mixed shapes", {"examples": [{"positive": "a", "negative": "b"},
                                   {"prompt": "q", "positive": "a", "negative": "b"}]}, "examples"),
    ("strength out of bounds", {**body_for("pairs"), "default_strength": 11}, "default_strength"),
    ("unknown field", {**body_for("pairs"), "alpha": 1}, "alpha"),
    ("text not a string", {"examples": [{"positive": 1, "negative": "b"}]}, None),
    ("unknown position mode", {**body_for("pairs"), "position_mode": "middle"}, "position_mode"),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_is_a_400_in_the_error_envelope(live, case, body, param) -> None:
    response = fit(live, "bad-input", body)
    assert response.status_code == 400, (case, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, (case, error)
    assert not (live.profile_dir / "bad-input.safetensors").exists()


# -- long texts: truncated, reported, and fitted as the shortened examples -------------------------------------

# the tiny tokenizer reads one token per character; its template renders a user prompt U as 19 + len(U)
# tokens, with a system instruction I as 29 + len(I) + len(U); a side may have 512
LONG = {
    "pairs": ({"examples": [{"positive": "x" * 600, "negative": "b"}, {"positive": "ok", "negative": "z" * 513}]},
              {"examples": [{"positive": "x" * 512, "negative": "b"}, {"positive": "ok", "negative": "z" * 512}]},
              [(0, "positive", 600, 512), (1, "negative", 513, 512)]),
    # the reply keeps half (256), the prompt the rest: 19 template tokens and its last 237 characters
    "replies": ({"examples": [{"prompt": "ab" * 300, "positive": "p" * 600, "negative": "n" * 10},
                              {"prompt": "q", "positive": "yes", "negative": "no"}]},
                {"examples": [{"prompt": ("ab" * 300)[-237:], "positive": "p" * 256, "negative": "n" * 10},
                              {"prompt": "q", "positive": "yes", "negative": "no"}]},
                [(0, "positive", 619 + 600, 512), (0, "negative", 619 + 10, 266)]),
    # the prompt keeps its first 476 characters on both sides (29 + 7 + 476 = 512)
    "instructions": ({"instructions": {"positive": "be glad", "negative": "be sad"}, "prompts": ["w" * 600, "hi"]},
                     {"instructions": {"positive": "be glad", "negative": "be sad"}, "prompts": ["w" * 476, "hi"]},
                     [(0, "positive", 636, 512), (0, "negative", 635, 511)]),
}


@pytest.mark.parametrize("shape", list(LONG))
def test_long_sides_are_truncated_reported_and_fit_as_the_shortened_examples(live, shape) -> None:
    long, short, expected = LONG[shape]
    truncated = [{"example": i, "side": side, "tokens_before": before, "tokens_after": after}
                 for i, side, before, after in expected]
    fitted = {}
    for key, body in (("long", long), ("short", short)):
        response = fit(live, f"trunc-{shape}-{key}", {**body, "method": "mean", "layers": [1, 3]})
        assert response.status_code == 201, response.text
        fitted[key] = response.json()
    assert fitted["long"]["truncated"] == fitted["long"]["provenance"]["examples"]["truncated"] == truncated
    assert fitted["short"]["truncated"] == fitted["short"]["provenance"]["examples"]["truncated"] == []
    assert fitted["long"]["provenance"]["examples"]["tokens"] == fitted["short"]["provenance"]["examples"]["tokens"]
    assert fitted["long"]["provenance"]["examples"]["sha256"] != fitted["short"]["provenance"]["examples"]["sha256"]
    stored = {key: Profile.load(live.profile_dir / f"trunc-{shape}-{key}.safetensors") for key in fitted}
    assert all(torch.equal(stored["long"].offsets[k], stored["short"].offsets[k]) for k in (1, 3))
    assert stored["long"].provenance["examples"]["truncated"] == truncated


def test_the_largest_fit_is_accepted(live) -> None:
    # 64 pairs of sides over the budget: once 76800 tokens in all (refused over 32768), now 128 sides of 512
    examples = [{"positive": chr(97 + i % 26) * 600, "negative": chr(65 + i % 26) * 600} for i in range(64)]
    response = fit(live, "largest", {"examples": examples, "layers": [3]})
    assert response.status_code == 201, response.text
    assert response.json()["provenance"]["examples"]["tokens"] == 128 * 512
    assert {(e["tokens_before"], e["tokens_after"]) for e in response.json()["truncated"]} == {(600, 512)}
    assert len(response.json()["truncated"]) == 128


def test_bad_names_and_bodies(live) -> None:
    assert fit(live, "..bad", body_for("pairs")).json()["error"]["code"] == "invalid_profile_name"
    raw = httpx.post(f"{live.v1}/profiles/ok/fit", content=b"{not json", timeout=30,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    nan = httpx.post(f"{live.v1}/profiles/ok/fit", content=b'{"examples": [{"positive": "a", "negative": "b"}], '
                     b'"default_strength": NaN}', timeout=30, headers={"content-type": "application/json"})
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "default_strength"


def test_fitting_needs_an_admin_key(tiny_loaded, tmp_path) -> None:
    settings = Settings(profile_dir=tmp_path, api_keys=["user"], admin_keys=["admin"])
    with live_server(tiny_loaded, settings) as live:
        user = fit(live, "x", body_for("pairs"), headers={"Authorization": "Bearer user"})
        assert user.status_code == 403 and user.json()["error"]["code"] == "admin_key_required"
        nobody = fit(live, "x", body_for("pairs"))
        assert nobody.status_code == 401
        admin = fit(live, "x", body_for("pairs"), headers={"Authorization": "Bearer admin"})
        assert admin.status_code == 201, admin.text


# -- a stream keeps streaming ------------------------------------------------------------------------

def test_a_stream_keeps_streaming_while_a_fit_runs(live) -> None:
    base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
    arrivals: list[float] = []
    finish: list[str | None] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": base, "messages": [{"role": "user", "content": "go"}], "max_tokens": 420, "temperature": 0,
                "stream": True, "steering": {"profile": "fit-pairs-caa", "strength": 0}}
        with httpx.stream("POST", live.v1 + "/chat/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice["delta"].get("content"):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 5:
                        started.set()
                if choice["finish_reason"]:
                    finish.append(choice["finish_reason"])

    # 60 pairs of 250-token sides: 30000 tokens, 120 forward passes of one side each
    examples = [{"positive": chr(97 + i % 26) * 250, "negative": chr(65 + i % 26) * 250} for i in range(60)]
    if not any(p["id"] == "fit-pairs-caa" for p in httpx.get(live.v1 + "/profiles").json()["data"]):
        assert fit(live, "fit-pairs-caa", body_for("pairs")).status_code in (200, 201)
    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(120)
    begin = time.monotonic()
    response = fit(live, "long-fit", {"examples": examples, "layers": [3]})
    end = time.monotonic()
    thread.join(300)
    assert response.status_code == 201, response.text
    assert response.json()["provenance"]["examples"]["tokens"] == 30000 and response.json()["truncated"] == []
    assert finish == ["length"]  # the stream ran to its end
    during = [t for t in arrivals if begin < t < end]
    # the engine ran one fit batch after each step: the stream got tokens all through the fit
    assert len(during) >= 20, (len(during), len(arrivals), end - begin)


# -- rahf profiles fit -------------------------------------------------------------------------------

def test_the_cli_fits_on_a_running_server(live, tmp_path, capsys, monkeypatch) -> None:
    from steering_vectors.cli import main

    monkeypatch.delenv("RAHF_ADMIN_KEY", raising=False)
    lines = tmp_path / "pairs.jsonl"
    lines.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    assert main(["profiles", "fit", "from-cli", str(lines), "--url", live.url, "--method", "mean", "--layers", "0,2",
                 "--strength", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["id"], summary["method"], summary["layers"], summary["default_strength"]) == (
        "from-cli", "quickfit/mean", [0, 2], 0.5)
    stored = Profile.load(live.profile_dir / "from-cli.safetensors")
    fitted = fit(live, "from-api", {**body_for("pairs"), "method": "mean", "layers": [0, 2]})
    assert fitted.status_code == 201
    again = Profile.load(live.profile_dir / "from-api.safetensors")
    assert all(torch.equal(stored.offsets[k], again.offsets[k]) for k in (0, 2))

    body = tmp_path / "instructions.json"
    body.write_text(json.dumps(body_for("instructions")))
    assert main(["profiles", "fit", "bad name!", str(body), "--url", live.url]) == 1
    assert capsys.readouterr().err.startswith("error: 400 (name): invalid profile name")
    assert main(["profiles", "fit", "x", str(body), "--url", live.url, "--layers", "9"]) == 1
    assert capsys.readouterr().err.startswith("error: 400 (layers): layers: [9] outside")
