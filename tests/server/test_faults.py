"""Faults, against a real `rahf serve` process over the tiny model:

- `kill -9` while a profile is being uploaded leaves the stored file old or new, never partial, and the
  server starts again on the same directory;
- an upload onto a full disk (a per-process file size limit, RLIMIT_FSIZE: what a full or size-limited
  volume does to the writer, without root) is a clear 507 and the previous version stays in use;
- profile files that are corrupt at start-up are skipped with a warning and the server starts;
- SIGTERM with 32 streams in flight: all of them finish inside the shutdown timeout, and requests that
  arrive meanwhile get 503 (readiness too).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from server.config import Settings
from server.registry import STALE_TEMP_S, ProfileRegistry
from steering_vectors.core.profile import Profile

from .conftest import live_server, make_profile
from .procs import ServeProcess

CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises the signal it stopped for


def _offsets(profile: Profile) -> dict[int, list[float]]:
    return {layer: tensor.tolist() for layer, tensor in profile.offsets.items()}


def _stored(store: Path, name: str) -> Profile:
    return Profile.load(store / f"{name}.safetensors")


def _temp_files(store: Path) -> list[Path]:
    return [p for p in store.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def _big_profile(loaded, name: str, seed: int, megabytes: int) -> Profile:
    # the description makes the file big enough for the write to take a while
    return make_profile(loaded, name, seed=seed, description="x" * (megabytes * 2**20))


# -- kill -9 during a PUT -----------------------------------------------------------------------------


def _kill_during_put(server: ServeProcess, store: Path, body, when: str) -> None:
    """PUT `body` as profile alpha and SIGKILL the server at `when`: 'receiving' (half the body sent),
    'writing' (its temporary file has appeared), 'answered' (the response has arrived)."""
    half_sent = threading.Event()
    answered = threading.Event()

    def chunks():
        yield body[: len(body) // 2]
        half_sent.set()
        time.sleep(0.5 if when == "receiving" else 0)
        yield body[len(body) // 2 :]

    def upload() -> None:
        try:
            httpx.put(server.url + "/v1/profiles/alpha", content=chunks(), timeout=60)
            answered.set()
        except httpx.HTTPError:
            pass

    worker = threading.Thread(target=upload)
    worker.start()
    deadline = time.monotonic() + 60
    if when == "receiving":
        assert half_sent.wait(60)
        time.sleep(0.1)
    elif when == "writing":
        # the temporary file lives from the first byte written to the rename; a machine fast enough to
        # write and rename between two looks makes this the "answered" case, which must hold as well
        while not _temp_files(store) and worker.is_alive():
            assert time.monotonic() < deadline, "the upload neither wrote nor finished"
            time.sleep(0.0002)
    else:
        assert answered.wait(60)
    server.send(signal.SIGKILL)
    assert server.wait(30) == -signal.SIGKILL
    worker.join(60)


def test_kill_9_during_a_profile_put_leaves_the_old_or_the_new_file(tiny_model_dir, tiny_loaded, tmp_path):
    """Three kills in a row on one store (while the body arrives, while the file is written, after the
    answer); each time the next start on that store proves the server comes back and serves what is on disk."""
    store = tmp_path / "store"
    store.mkdir()
    current = make_profile(tiny_loaded, "alpha", seed=1)
    current.save(store / "alpha.safetensors")
    flags = ("--profile-dir", str(store), "--max-profile-bytes", str(64 * 2**20))
    for seed, when in enumerate(("receiving", "writing", "answered"), start=2):
        server = ServeProcess(tiny_model_dir, tmp_path / f"{when}.log", *flags).start()
        try:
            listing = httpx.get(server.url + "/v1/profiles", timeout=30).json()
            assert [p["id"] for p in listing["data"]] == ["alpha"] and listing["skipped"] == []
            norms = httpx.get(server.url + "/v1/profiles/alpha", timeout=30).json()["offset_norms"]
            assert norms == pytest.approx({str(k): v for k, v in current.norms().items()})
            new = _big_profile(tiny_loaded, "alpha", seed=seed, megabytes=12)
            _kill_during_put(server, store, new.to_bytes(), when)
        finally:
            server.stop(signal.SIGKILL)
        stored = _stored(store, "alpha")  # a complete, readable profile file ...
        assert _offsets(stored) in (_offsets(current), _offsets(new)), when  # ... the old one or the new one
        if when == "receiving":
            assert _offsets(stored) == _offsets(current) and not _temp_files(store)
        if when == "answered":
            assert _offsets(stored) == _offsets(new)
        current = stored
    with ServeProcess(tiny_model_dir, tmp_path / "last.log", *flags) as again:
        assert httpx.get(again.url + "/readyz", timeout=30).json()["profiles"] == ["alpha"]
        norms = httpx.get(again.url + "/v1/profiles/alpha", timeout=30).json()["offset_norms"]
        assert norms == pytest.approx({str(k): v for k, v in current.norms().items()})


def test_stale_temporary_files_are_removed_at_load(tiny_loaded, tmp_path) -> None:
    make_profile(tiny_loaded, "alpha", seed=1).save(tmp_path / "alpha.safetensors")
    stale = tmp_path / ".alpha.safetensors.abc123.tmp"
    fresh = tmp_path / ".alpha.safetensors.def456.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    hour_ago = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (hour_ago, hour_ago))
    registry = ProfileRegistry(tmp_path, tiny_loaded.fingerprint)
    assert registry.load_directory() == []
    assert registry.names() == ["alpha"]
    assert not stale.exists() and fresh.exists()  # a write in progress elsewhere is left alone


# -- a full disk --------------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_an_upload_onto_a_full_disk_is_a_clear_error_and_the_old_profile_stays(tiny_model_dir, tiny_loaded,
                                                                             tmp_path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    old = make_profile(tiny_loaded, "alpha", seed=1)
    old.save(store / "alpha.safetensors")
    before = (store / "alpha.safetensors").read_bytes()
    too_big = _big_profile(tiny_loaded, "alpha", seed=2, megabytes=2).to_bytes()
    server = ServeProcess(tiny_model_dir, tmp_path / "serve.log", "--profile-dir", str(store),
                          preexec_fn=_file_size_limit(2**20))  # no file of this process may pass 1 MiB
    with server:
        url = server.url + "/v1"
        for upload in ({"content": too_big},
                       {"files": {"file": ("alpha.safetensors", too_big, "application/octet-stream")}}):
            response = httpx.put(url + "/profiles/alpha", timeout=60, **upload)
            assert response.status_code == 507, response.text
            error = response.json()["error"]
            assert error["code"] == "insufficient_storage" and error["type"] == "server_error"
            assert "out of space" in error["message"] and str(store) not in response.text
            assert (store / "alpha.safetensors").read_bytes() == before
            assert _temp_files(store) == []
        created = httpx.put(url + "/profiles/grown", content=too_big, timeout=60)
        assert created.status_code == 507 and not (store / "grown.safetensors").exists()
        assert [p["id"] for p in httpx.get(url + "/profiles").json()["data"]] == ["alpha"]
        norms = httpx.get(url + "/profiles/alpha").json()["offset_norms"]
        assert norms == pytest.approx({str(k): v for k, v in old.norms().items()})
        base = httpx.get(url + "/models").json()["data"][0]["id"]
        steered = httpx.post(url + "/chat/completions", timeout=60, json={
            "model": f"{base}:alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert steered.status_code == 200
        small = make_profile(tiny_loaded, "alpha", seed=3)
        assert httpx.put(url + "/profiles/alpha", content=small.to_bytes(), timeout=60).status_code == 200
        assert _offsets(_stored(store, "alpha")) == _offsets(small)
        errors = [r for r in server.log_records() if r.get("level") == "error"]
        assert errors and all("profile store: cannot" in r["msg"] for r in errors)


# -- corrupt files at start-up ------------------------------------------------------------------------


def test_corrupt_profile_files_at_start_are_skipped_with_a_warning(tiny_loaded, tmp_path, caplog) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_profile(tiny_loaded, "alpha", seed=1).save(store / "alpha.safetensors")
    whole = make_profile(tiny_loaded, "cut", seed=2).to_bytes()
    header_length = int.from_bytes(whole[:8], "little")
    nan = make_profile(tiny_loaded, "nan", seed=3).to_bytes()
    corrupt = {
        "cut.safetensors": whole[: len(whole) // 2],  # truncated
        "noise.safetensors": os.urandom(300),
        "empty.safetensors": b"",
        "nan.safetensors": nan[:-4] + b"\x00\x00\xc0\x7f",  # the last float is NaN
        "header.safetensors": whole[:8] + b"{" * header_length,
        "vector.gguf": b"GGUF\x03\x00\x00\x00" + b"\xff" * 40,
    }
    for name, data in corrupt.items():
        (store / name).write_bytes(data)
    Profile(name="other", offsets={1: torch.ones(32)}).save(store / "other.safetensors")  # another model's size
    skipped = sorted([*corrupt, "other.safetensors"])
    with caplog.at_level(logging.WARNING, logger="server.registry"):
        with live_server(tiny_loaded, Settings(profile_dir=store)) as live:
            ready = httpx.get(live.url + "/readyz", timeout=30).json()
            assert ready["profiles"] == ["alpha"] and sorted(ready["skipped_profiles"]) == skipped
            base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
            reply = httpx.post(live.v1 + "/chat/completions", timeout=60, json={
                "model": f"{base}:alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert reply.status_code == 200
    warned = sorted(Path(r.args[0]).name for r in caplog.records
                    if r.levelno == logging.WARNING and r.getMessage().startswith("skipping profile file"))
    assert warned == skipped
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- SIGTERM with 32 streams --------------------------------------------------------------------------


def test_sigterm_lets_32_streams_finish_and_refuses_new_requests_with_503(tiny_model_dir, tmp_path) -> None:
    streams, tokens, timeout_s = 32, 400, 60
    server = ServeProcess(tiny_model_dir, tmp_path / "serve.log", "--max-batch-size", str(streams),
                          "--shutdown-timeout", str(timeout_s), "--plain-logs").start()
    base = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    started = threading.Barrier(streams + 1, timeout=120)
    results: list[dict] = [{} for _ in range(streams)]

    def stream(i: int) -> None:
        body = {"model": base, "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": tokens,
                "temperature": 0.8, "seed": i, "stream": True}
        events: list[str] = []
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
                results[i]["status"] = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 2:
                            started.wait()
        except httpx.HTTPError as exc:
            results[i]["error"] = repr(exc)
        results[i]["events"] = events
        results[i]["ended"] = time.monotonic()

    workers = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    try:
        for worker in workers:
            worker.start()
        started.wait()  # every stream has its role chunk and a first token
        signalled = time.monotonic()
        server.send(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": base, "messages": [{"role": "user", "content": "late"}], "max_tokens": 2})
        ready = httpx.get(server.url + "/readyz", timeout=30)
        alive = httpx.get(server.url + "/healthz", timeout=30)
        refused_at = time.monotonic()
        for worker in workers:
            worker.join(timeout_s + 30)
        code = server.wait(timeout_s + 30)
        exited = time.monotonic()
    finally:
        server.stop(signal.SIGKILL)
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    assert refused.json()["error"]["code"] == "not_ready"
    assert ready.status_code == 503 and alive.status_code == 200
    assert any(r["ended"] > refused_at for r in results)  # the 503s came while streams were still running
    for result in results:
        assert result.get("status") == 200 and "error" not in result, result.get("error")
        events = result["events"]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert finish in (["length"], ["stop"])
    assert code in CLEAN_EXIT, server.log_text()[-3000:]
    assert exited - signalled < timeout_s


# -- a client that leaves -------------------------------------------------------------------------------


def _completion_tokens(live) -> float:
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith("rahf_tokens_total{") and 'kind="completion"' in line:
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_a_client_that_leaves_a_non_streaming_request_frees_its_rows(tiny_loaded, path) -> None:
    with live_server(tiny_loaded, Settings(max_batch_size=4)) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        engine = live.app.state.serving.engine
        body = {"model": base, "max_tokens": 480, "temperature": 0, "n": 3}
        body |= {"messages": [{"role": "user", "content": "go"}]} if path == "/chat/completions" else {"prompt": "go"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.v1 + path, json=body, timeout=httpx.Timeout(30, read=0.5))
        deadline = time.monotonic() + 30
        while (engine.stats()["running"] or engine.stats()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (engine.stats()["running"], engine.stats()["waiting"]) == (0, 0)
        time.sleep(0.3)
        assert _completion_tokens(live) < 3 * 480  # cancelled, not run to the end
        metrics = httpx.get(live.url + "/metrics").text
        labels = f'method="POST",model_name="{base}",route="/v1{path}",status="499"'
        assert f"rahf_requests_total{{{labels}}} 1.0" in metrics
        again = httpx.post(live.v1 + path, json={**body, "max_tokens": 2, "n": 1}, timeout=60)
        assert again.status_code == 200
