"""Runtime profile management: list, show, upload (safetensors or GGUF), replace, delete, reload."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import httpx
import pytest
import torch

from server.config import Settings
from steering_vectors.core.profile import ModelFingerprint, Profile

from .conftest import live_server, make_profile
from .reference import chat_ids, greedy, text_of

PROMPT = "Say something"
MAX = 12


@pytest.fixture
def fresh(tiny_loaded, tiny_profiles, tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    tiny_profiles["alpha"].save(directory / "alpha.safetensors")
    (directory / "broken.safetensors").write_bytes(b"\x00" * 3)
    settings = Settings(profile_dir=directory, default_max_tokens=MAX)
    with live_server(tiny_loaded, settings) as live:
        live.base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        yield live


def reply(live, model: str | None = None, steering=None) -> httpx.Response:
    body = {"model": model or live.base, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": MAX}
    if steering is not None:
        body["steering"] = steering
    return httpx.post(live.v1 + "/chat/completions", json=body, timeout=60)


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def put(live, name: str, data: bytes, **kwargs) -> httpx.Response:
    return httpx.put(live.v1 + f"/profiles/{name}", content=data, timeout=60, **kwargs)


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_directory_profiles_loaded_and_bad_file_skipped(fresh, tiny_profiles) -> None:
    listing = httpx.get(fresh.v1 + "/profiles").json()
    assert [p["id"] for p in listing["data"]] == ["alpha"]
    assert [Path(s["path"]).name for s in listing["skipped"]] == ["broken.safetensors"]
    ready = httpx.get(fresh.url + "/readyz").json()
    assert ready["profiles"] == ["alpha"] and [Path(p).name for p in ready["skipped_profiles"]] == [
        "broken.safetensors"
    ]


def test_get_profile_shows_metadata_layers_and_norms(fresh, tiny_profiles) -> None:
    body = httpx.get(fresh.v1 + "/profiles/alpha").json()
    alpha = tiny_profiles["alpha"]
    assert body["id"] == "alpha" and body["layers"] == [1, 2] and body["hidden_size"] == 64
    assert body["offset_norms"] == {str(k): pytest.approx(v) for k, v in alpha.norms().items()}
    assert body["fingerprint"]["digest"] == alpha.fingerprint.digest
    assert_envelope(httpx.get(fresh.v1 + "/profiles/nope"), 404, "name")


def test_put_changes_next_reply_and_delete_restores(fresh, tiny_loaded) -> None:
    plain = content(reply(fresh))
    assert_envelope(reply(fresh, f"{fresh.base}:house"), 404, "model")

    house = make_profile(tiny_loaded, "anything", seed=11, scale=5.0)
    response = put(fresh, "house", house.to_bytes())
    assert response.status_code == 201 and response.json()["id"] == "house"
    steered = content(reply(fresh, f"{fresh.base}:house"))
    expected = greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX, [(house, 1.0)])
    assert steered == text_of(tiny_loaded, expected) != plain
    stored = Profile.load(fresh.profile_dir / "house.safetensors")
    assert stored.name == "house" and torch.equal(stored.offsets[1], house.offsets[1])
    assert f"{fresh.base}:house" in [m["id"] for m in httpx.get(fresh.v1 + "/models").json()["data"]]

    replacement = make_profile(tiny_loaded, "house", seed=12, scale=5.0)
    assert put(fresh, "house", replacement.to_bytes()).status_code == 200
    replaced = content(reply(fresh, f"{fresh.base}:house"))
    assert replaced == text_of(tiny_loaded, greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX,
                                                   [(replacement, 1.0)]))

    deleted = httpx.delete(fresh.v1 + "/profiles/house")
    assert deleted.status_code == 200 and deleted.json() == {"id": "house", "object": "profile", "deleted": True}
    assert not (fresh.profile_dir / "house.safetensors").exists()
    assert_envelope(reply(fresh, f"{fresh.base}:house"), 404, "model")
    assert content(reply(fresh)) == plain
    assert_envelope(httpx.delete(fresh.v1 + "/profiles/house"), 404, "name")


def _nan_profile_bytes(hidden: int) -> bytes:
    # Profile() refuses NaN, so write the safetensors file by hand
    header = {
        "offset.1": {"dtype": "F32", "shape": [hidden], "data_offsets": [0, 4 * hidden]},
        "__metadata__": {"format": "rahf-profile", "format_version": "1", "name": "x"},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack(f"<{hidden}f", *([float("nan")] * hidden))


def _low_rank_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    metadata = {"format": "rahf-profile", "format_version": "2", "name": "x"}
    return save({"offset.1": torch.ones(64), **tensors}, metadata=metadata)


def test_invalid_uploads_are_refused_and_leave_the_file_unchanged(fresh, tiny_loaded) -> None:
    path = fresh.profile_dir / "alpha.safetensors"
    before = path.read_bytes()
    steered_before = content(reply(fresh, f"{fresh.base}:alpha"))
    other = ModelFingerprint("llama", 64, 4, digest="0" * 64)
    cases = [
        (b"garbage", 400),
        (before[: len(before) // 2], 400),  # truncated
        (_nan_profile_bytes(64), 400),
        (Profile("x", {1: torch.ones(32)}).to_bytes(), 422),  # other hidden size
        (Profile("x", {9: torch.ones(64)}).to_bytes(), 422),  # layer the model lacks
        (Profile("x", {1: torch.ones(64)}, fingerprint=other).to_bytes(), 422),  # other weights
        (b"GGUF" + b"\x00" * 20, 400),
        (b"", 400),
        (_low_rank_bytes({"down.1": torch.ones(2, 64)}), 400),  # a down without its up
        (_low_rank_bytes({"down.1": torch.ones(2, 64), "up.1": torch.ones(64, 3)}), 400),  # ranks differ
        (_low_rank_bytes({"down.2": torch.ones(2, 64), "up.2": torch.ones(64, 2)}), 400),  # no offset at 2
    ]
    for data, status in cases:
        error = assert_envelope(put(fresh, "alpha", data), status, "body")
        assert error["type"] == "invalid_request_error"
        assert path.read_bytes() == before
    assert [p.name for p in fresh.profile_dir.iterdir() if not p.name.startswith("broken")] == ["alpha.safetensors"]
    assert content(reply(fresh, f"{fresh.base}:alpha")) == steered_before


def test_profile_names_are_validated(fresh, tiny_loaded) -> None:
    data = make_profile(tiny_loaded, "x", seed=1).to_bytes()
    for name in (".hidden", "a" * 65, "semi;colon", "-dash"):
        assert_envelope(put(fresh, name, data), 400, "name")
    assert_envelope(httpx.put(fresh.v1 + "/profiles/..%2F..%2Fescape", content=data), 404)
    assert sorted(p.name for p in fresh.profile_dir.iterdir()) == ["alpha.safetensors", "broken.safetensors"]


def test_gguf_control_vector_upload(fresh, tiny_loaded) -> None:
    from steering_vectors.core.gguf_io import write_control_vector

    profile = make_profile(tiny_loaded, "g", seed=21)
    response = put(fresh, "fromgguf", write_control_vector(profile))
    assert response.status_code == 201, response.text
    assert (fresh.profile_dir / "fromgguf.safetensors").is_file()
    expected = greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX, [(profile, 1.0)])
    assert content(reply(fresh, f"{fresh.base}:fromgguf")) == text_of(tiny_loaded, expected)


def test_multipart_upload(fresh, tiny_loaded) -> None:
    profile = make_profile(tiny_loaded, "m", seed=22)
    response = httpx.put(fresh.v1 + "/profiles/multi", files={"file": ("m.safetensors", profile.to_bytes())})
    assert response.status_code == 201, response.text
    assert httpx.get(fresh.v1 + "/profiles/multi").json()["layers"] == [1, 2]


def test_in_flight_request_keeps_its_profile(fresh, tiny_loaded, tiny_profiles) -> None:
    expected = content(reply(fresh, f"{fresh.base}:alpha"))
    body = {"model": f"{fresh.base}:alpha", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": MAX, "stream": True}
    with httpx.stream("POST", fresh.v1 + "/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["delta"]["role"] == "assistant"
        # replace, then delete, the profile while the request runs
        assert put(fresh, "alpha", make_profile(tiny_loaded, "alpha", seed=99).to_bytes()).status_code == 200
        assert httpx.delete(fresh.v1 + "/profiles/alpha").status_code == 200
        rest = [line[6:] for line in lines if line.startswith("data:")]
    assert rest[-1] == "[DONE]"
    text = "".join(json.loads(r)["choices"][0]["delta"].get("content") or "" for r in rest[:-1])
    assert text == expected


def test_reload_picks_up_files_written_by_hand(fresh, tiny_loaded) -> None:
    manual = make_profile(tiny_loaded, "manual", seed=5)
    manual.save(fresh.profile_dir / "manual.safetensors")
    response = httpx.post(fresh.v1 + "/profiles/-/reload")
    assert response.status_code == 200 and response.json()["data"] == ["alpha", "manual"]
    expected = greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX, [(manual, 1.0)])
    assert content(reply(fresh, f"{fresh.base}:manual")) == text_of(tiny_loaded, expected)


def test_profiles_with_non_finite_provenance_are_listed_as_strict_json(fresh, tiny_loaded) -> None:
    # shipped profiles record NaN accuracy for calibration strengths that were skipped
    profile = make_profile(tiny_loaded, "calibrated", seed=13)
    profile.provenance = {"calibration": {"rows": [{"strength": 2.0, "accuracy": float("nan")}]}}
    created = put(fresh, "calibrated", profile.to_bytes())
    assert created.status_code == 201, created.text
    shown, listed = httpx.get(fresh.v1 + "/profiles/calibrated"), httpx.get(fresh.v1 + "/profiles")
    for response in (created, shown, listed):
        assert response.status_code in (200, 201), response.text
        json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in a JSON response"))
    assert shown.json()["provenance"]["calibration"]["rows"] == [{"strength": 2.0, "accuracy": None}]
    assert "calibrated" in [p["id"] for p in listed.json()["data"]]


def test_low_rank_profile_upload_listing_and_mixing(fresh, tiny_loaded, tiny_profiles) -> None:
    """A profile with low-rank terms is stored, listed with its ranks, and steers as the hooks do, alone
    and mixed with an offset-only profile."""
    generator = torch.Generator().manual_seed(31)
    low_rank = {2: (torch.randn(3, 64, generator=generator), 3 * torch.randn(64, 3, generator=generator))}
    profile = make_profile(tiny_loaded, "lr", seed=30, scale=1.0, low_rank=low_rank)
    response = put(fresh, "lowrank", profile.to_bytes())
    assert response.status_code == 201, response.text
    assert response.json()["low_rank"] == {"2": 3} and response.json()["format_version"] == 2
    listed = {p["id"]: p for p in httpx.get(fresh.v1 + "/profiles").json()["data"]}
    assert listed["lowrank"]["low_rank"] == {"2": 3} and listed["alpha"]["low_rank"] == {}
    stored = Profile.load(fresh.profile_dir / "lowrank.safetensors")
    assert torch.equal(stored.low_rank[2][1], low_rank[2][1])

    ids = chat_ids(tiny_loaded, PROMPT)
    alone = content(reply(fresh, f"{fresh.base}:lowrank"))
    assert alone == text_of(tiny_loaded, greedy(tiny_loaded, ids, MAX, [(profile, 1.0)]))
    offsets_only = Profile("flat", profile.offsets, fingerprint=profile.fingerprint)
    assert alone != text_of(tiny_loaded, greedy(tiny_loaded, ids, MAX, [(offsets_only, 1.0)]))
    mixed = [{"profile": "lowrank", "strength": 0.5}, {"profile": "alpha", "strength": -0.5}]
    expected = greedy(tiny_loaded, ids, MAX, [(profile, 0.5), (tiny_profiles["alpha"], -0.5)])
    assert content(reply(fresh, steering=mixed)) == text_of(tiny_loaded, expected)


def test_lora_profile_upload_listing_steering_and_mixing(fresh, tiny_loaded, tiny_profiles) -> None:
    """A profile with per-row LoRA terms (format 3) is stored, listed with its ranks, steers as the hooks
    do alone and mixed with an offset profile, and one whose projection sizes do not fit is refused."""
    generator = torch.Generator().manual_seed(41)
    sizes = dict(tiny_loaded.fingerprint.projections)
    assert sizes == {"k_proj": 32, "q_proj": 64, "v_proj": 32}
    lora = {2: {name: (torch.randn(2, 64, generator=generator), 0.5 * torch.randn(sizes[name], 2, generator=generator))
                for name in ("q_proj", "v_proj")}}  # fmt: skip
    profile = Profile("lora", {2: torch.zeros(64)}, fingerprint=tiny_loaded.fingerprint, lora=lora)
    response = put(fresh, "lora", profile.to_bytes())
    assert response.status_code == 201, response.text
    assert response.json()["lora"] == {"2": {"q_proj": 2, "v_proj": 2}} and response.json()["format_version"] == 3
    listed = {p["id"]: p for p in httpx.get(fresh.v1 + "/profiles").json()["data"]}
    assert listed["lora"]["lora"] == {"2": {"q_proj": 2, "v_proj": 2}} and listed["alpha"]["lora"] == {}

    ids = chat_ids(tiny_loaded, PROMPT)
    alone = content(reply(fresh, f"{fresh.base}:lora"))
    assert alone == text_of(tiny_loaded, greedy(tiny_loaded, ids, MAX, [(profile, 1.0)]))
    assert alone != content(reply(fresh))
    mixed = [{"profile": "lora", "strength": 2.0}, {"profile": "alpha", "strength": 0.5}]
    expected = greedy(tiny_loaded, ids, MAX, [(profile, 2.0), (tiny_profiles["alpha"], 0.5)])
    assert content(reply(fresh, steering=mixed)) == text_of(tiny_loaded, expected)

    wrong = {2: {"v_proj": (torch.ones(2, 64), torch.ones(64, 2))}}  # q's output size on v
    bad = Profile("lora", {2: torch.zeros(64)}, fingerprint=tiny_loaded.fingerprint, lora=wrong)
    error = assert_envelope(put(fresh, "lora", bad.to_bytes()), 422, "body")
    assert "v_proj outputs 64 features" in error["message"]
    assert Profile.load(fresh.profile_dir / "lora.safetensors").lora_ranks() == {2: {"q_proj": 2, "v_proj": 2}}


def test_a_profile_shows_its_generation_result(fresh, tiny_loaded, generation_record) -> None:
    judged = make_profile(tiny_loaded, "judged", seed=14).with_generation(generation_record)
    created = put(fresh, "judged", judged.to_bytes())
    assert created.status_code == 201, created.text
    shown = httpx.get(fresh.v1 + "/profiles/judged").json()
    assert created.json()["generation"] == shown["generation"] == generation_record.summary()
    assert shown["generation"]["chosen_strength"] == 1.0 and shown["generation"]["half_b"] == 2
    assert [row["win_rate"] for row in shown["generation"]["strengths"]] == [0.75, 1.0]
    assert shown["generation"]["strengths"][0]["perplexity_change"] == pytest.approx(0.1)
    listed = {p["id"]: p for p in httpx.get(fresh.v1 + "/profiles").json()["data"]}
    assert listed["judged"]["generation"] == shown["generation"] and listed["alpha"]["generation"] is None
    # a malformed section makes the file no profile: refused, the stored one unchanged
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    metadata = {**judged.metadata(), "provenance": json.dumps({"generation": {"set": "toy"}})}
    error = assert_envelope(put(fresh, "judged", st_save(st_load(judged.to_bytes()), metadata=metadata)), 400, "body")
    assert "generation section" in error["message"]
    assert httpx.get(fresh.v1 + "/profiles/judged").json()["generation"] == shown["generation"]
