"""One profile directory, many replicas: the directory is the source of truth for every server reading it.

The registry on its own (a file written, replaced or deleted behind its back; no torn reads while a
writer replaces a file; read-only stores; the file watcher and its timer fallback), then two servers
sharing one directory: an upload to one is served by the other at once, with the same digest, in the
body, the `X-Steering` header, `/v1/profiles` and `/v1/models`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.profile_watch import ProfileWatcher
from server.registry import ProfileNotFoundError, ProfileRegistry, ProfileStoreReadOnlyError, parse_profile
from steering_vectors.core.models import load_model
from steering_vectors.core.profile import atomic_write

from .conftest import live_server, make_profile

BOUND_S = 2.0  # how soon a change made behind a replica's back must be visible without a request naming it


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def eventually(check, timeout: float = BOUND_S, step: float = 0.02):
    """Poll `check()` until it is truthy; fail after `timeout` seconds. Returns its value and the time taken."""
    start = time.monotonic()
    while True:
        value = check()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {check.__doc__ or check}")
        time.sleep(step)


# -- the registry on its own --------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> Path:
    directory = tmp_path / "store"
    directory.mkdir()
    return directory


def test_a_file_written_behind_the_registry_is_loaded_on_a_miss_replaced_and_deleted(tiny_loaded, store):
    registry = ProfileRegistry(store, tiny_loaded.fingerprint)
    assert registry.load_directory() == [] and registry.names() == []
    path = store / "alpha.safetensors"
    make_profile(tiny_loaded, "alpha", seed=1).save(path)
    first = sha(path)
    assert registry.names() == []  # nothing looked yet ...
    assert registry.digest("alpha") == first  # ... a request naming it loads it
    assert registry.names() == ["alpha"]
    replaced = make_profile(tiny_loaded, "alpha", seed=2)
    replaced.save(path)
    assert sha(path) != first
    assert registry.digest("alpha") == sha(path)
    assert registry.get("alpha").norms() == pytest.approx(replaced.norms())
    path.unlink()
    with pytest.raises(ProfileNotFoundError):
        registry.get("alpha")
    assert registry.names() == []


def test_an_unchanged_file_is_not_read_again(tiny_loaded, store, monkeypatch):
    make_profile(tiny_loaded, "alpha", seed=1).save(store / "alpha.safetensors")
    registry = ProfileRegistry(store, tiny_loaded.fingerprint)
    registry.load_directory()
    profile = registry.get("alpha")
    reads = []
    monkeypatch.setattr(ProfileRegistry, "_read", staticmethod(lambda path: reads.append(path) or 1 / 0))
    for _ in range(3):
        assert registry.get("alpha") is profile
        registry.rescan()
    assert reads == []


def test_rescan_follows_the_directory_and_its_bad_files(tiny_loaded, store):
    registry = ProfileRegistry(store, tiny_loaded.fingerprint)
    registry.load_directory()
    make_profile(tiny_loaded, "alpha", seed=1).save(store / "alpha.safetensors")
    (store / "beta.safetensors").write_bytes(b"not a profile")
    registry.rescan()
    assert registry.names() == ["alpha"] and [s.path for s in registry.skipped] == ["beta.safetensors"]
    make_profile(tiny_loaded, "beta", seed=2).save(store / "beta.safetensors")  # repaired
    (store / "alpha.safetensors").unlink()
    registry.rescan()
    assert registry.names() == ["beta"] and registry.skipped == []
    assert registry.state().digest("beta") == sha(store / "beta.safetensors")


def test_replicas_with_their_own_stores_give_one_upload_one_digest(tiny_loaded, tmp_path):
    """Replicas that do not share a directory (a volume each) and are sent the same upload store and name the
    same bytes; so does the API's description of the profile before it is stored, and a GGUF upload."""
    from server.routes.profiles import describe
    from steering_vectors.core.gguf_io import write_control_vector

    profile = make_profile(tiny_loaded, "alpha", seed=3)
    for upload in (profile.to_bytes(), write_control_vector(profile)):
        replicas = []
        for replica in ("a", "b"):
            (tmp_path / replica).mkdir(exist_ok=True)
            replicas.append(ProfileRegistry(tmp_path / replica, tiny_loaded.fingerprint))
            replicas[-1].put("alpha", upload)
        files = [tmp_path / replica / "alpha.safetensors" for replica in ("a", "b")]
        assert files[0].read_bytes() == files[1].read_bytes()
        digests = {registry.state().digest("alpha") for registry in replicas}
        assert digests == {sha(files[0])} == {describe(parse_profile(upload, name="alpha"))["digest"]}


def test_a_safetensors_file_wins_over_a_gguf_file_of_the_same_name(tiny_loaded, store):
    from steering_vectors.core.gguf_io import write_control_vector

    gguf = store / "alpha.gguf"
    gguf.write_bytes(write_control_vector(make_profile(tiny_loaded, "alpha", seed=1)))
    registry = ProfileRegistry(store, tiny_loaded.fingerprint)
    registry.load_directory()
    assert registry.digest("alpha") == sha(gguf)
    make_profile(tiny_loaded, "alpha", seed=2).save(store / "alpha.safetensors")
    assert registry.digest("alpha") == sha(store / "alpha.safetensors")  # what an upload's first step leaves
    registry.rescan()
    assert [(s.path, "already provides" in s.reason) for s in registry.skipped] == [("alpha.gguf", True)]


def test_no_torn_reads_while_a_writer_replaces_the_file(tiny_loaded, store):
    """A writer replaces a 4 MB profile 30 times (write + rename) while a reader looks it up in a loop:
    every lookup gives one of the versions written, whole, and never a skipped file."""
    from tests.server.test_faults import _big_profile

    path = store / "alpha.safetensors"
    versions = [_big_profile(tiny_loaded, "alpha", seed=seed, megabytes=4).to_bytes() for seed in (1, 2)]
    digests = {"sha256:" + hashlib.sha256(v).hexdigest() for v in versions}
    atomic_write(path, versions[0])
    registry = ProfileRegistry(store, tiny_loaded.fingerprint)
    registry.load_directory()
    done = threading.Event()

    def writer() -> None:
        for i in range(30):
            atomic_write(path, versions[(i + 1) % 2])
        done.set()

    seen: list[str] = []
    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        state = registry.lookup(["alpha"])
        assert state.skipped == (), state.skipped
        seen.append(state.digest("alpha"))
    thread.join()
    assert set(seen) <= digests and len(seen) > 1
    assert registry.digest("alpha") == sha(path)


def test_a_read_only_registry_never_writes(tiny_loaded, tmp_path):
    missing = tmp_path / "not-yet"
    registry = ProfileRegistry(missing, tiny_loaded.fingerprint, writable=False)
    assert registry.load_directory() == [] and not missing.exists()  # not created
    missing.mkdir()
    stale = missing / ".alpha.safetensors.abc.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    import os

    os.utime(stale, (old, old))
    make_profile(tiny_loaded, "alpha", seed=1).save(missing / "alpha.safetensors")
    registry.rescan()
    assert registry.names() == ["alpha"] and stale.exists()  # the writer's business
    with pytest.raises(ProfileStoreReadOnlyError):
        registry.put("beta", make_profile(tiny_loaded, "beta", seed=2).to_bytes())
    with pytest.raises(ProfileStoreReadOnlyError):
        registry.delete("alpha")
    assert sorted(p.name for p in missing.iterdir()) == [".alpha.safetensors.abc.tmp", "alpha.safetensors"]


@pytest.mark.parametrize("events", [True, False], ids=["file-events", "rescan-timer"])
def test_the_watcher_keeps_the_listing_current(tiny_loaded, store, events):
    """Without any request naming the profile, the listing follows additions, replacements and deletions
    within BOUND_S: through file events, or through the timer alone (file systems without events)."""
    registry = ProfileRegistry(store, tiny_loaded.fingerprint)
    registry.load_directory()
    watcher = ProfileWatcher(registry, rescan_s=5.0 if events else 0.25, events=events)
    watcher.start()
    try:
        time.sleep(0.3)  # the watch is set up
        path = store / "alpha.safetensors"
        make_profile(tiny_loaded, "alpha", seed=1).save(path)
        eventually(lambda: registry.state().digest("alpha") == sha(path))
        first = sha(path)
        make_profile(tiny_loaded, "alpha", seed=2).save(path)
        assert sha(path) != first
        eventually(lambda: registry.state().digest("alpha") == sha(path))
        path.unlink()
        eventually(lambda: registry.names() == [])
    finally:
        watcher.stop()
    assert not watcher._thread.is_alive()


# -- two servers, one directory -----------------------------------------------------------------------


def _chat(url: str, model: str, profile: str | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    if profile is not None:
        body["steering"] = {"profile": profile}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def _served_digest(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    header = response.headers["x-steering"]
    digest = header.rsplit(";digest=", 1)[1]
    assert response.json()["steering"]["profiles"][0]["digest"] == digest
    return digest


@pytest.fixture
def pair(tiny_model_dir, tmp_path):
    """Two servers over one directory: a writer and a read-only replica (separately loaded models)."""
    directory = tmp_path / "shared"
    directory.mkdir()
    with live_server(load_model(tiny_model_dir), Settings(profile_dir=directory)) as writer:
        reader_settings = Settings(profile_dir=directory, profile_uploads=False)
        with live_server(load_model(tiny_model_dir), reader_settings) as reader:
            base = httpx.get(writer.url + "/v1/models").json()["data"][0]["id"]
            yield writer, reader, base, directory


def test_a_profile_uploaded_to_one_replica_is_served_by_the_other_at_once(pair, tiny_loaded):
    writer, reader, base, directory = pair
    path = directory / "alpha.safetensors"
    for seed in (1, 2):
        upload = httpx.put(writer.url + "/v1/profiles/alpha", content=make_profile(tiny_loaded, "alpha",
                                                                                  seed=seed).to_bytes())
        assert upload.status_code == (201 if seed == 1 else 200), upload.text
        digest = sha(path)
        assert upload.json()["digest"] == digest
        # the very next request to the other replica: the new version, named by its digest everywhere
        assert _served_digest(_chat(reader.url, base, "alpha")) == digest
        assert _served_digest(_chat(reader.url, f"{base}:alpha")) == digest
        assert httpx.get(reader.url + "/v1/profiles/alpha").json()["digest"] == digest
        listed = httpx.get(reader.url + "/v1/profiles").json()["data"]
        assert [(p["id"], p["digest"]) for p in listed] == [("alpha", digest)]
        models = httpx.get(reader.url + "/v1/models").json()["data"]
        assert [(m.get("profile"), m.get("digest")) for m in models] == [(None, None), ("alpha", digest)]
        assert httpx.get(writer.url + "/v1/models").json()["data"] == models
    header = _chat(reader.url, base, "alpha").headers["x-steering"]
    assert header == f"alpha=1;position=all;digest={digest}"
    assert httpx.delete(writer.url + "/v1/profiles/alpha").status_code == 200
    gone = _chat(reader.url, base, "alpha")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "profile_not_found"
    assert httpx.get(reader.url + "/v1/profiles/alpha").status_code == 404
    assert [m["id"] for m in httpx.get(reader.url + "/v1/models").json()["data"]] == [base]


def test_a_read_only_replica_refuses_changes_and_says_why(pair, tiny_loaded):
    writer, reader, base, directory = pair
    data = make_profile(tiny_loaded, "alpha", seed=1).to_bytes()
    refused = httpx.put(reader.url + "/v1/profiles/alpha", content=data)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "profile_store_read_only" and error["type"] == "permission_error"
    assert "read-only" in error["message"] and str(directory) not in refused.text
    assert list(directory.iterdir()) == []
    assert httpx.put(writer.url + "/v1/profiles/alpha", content=data).status_code == 201
    deleted = httpx.delete(reader.url + "/v1/profiles/alpha")
    assert deleted.status_code == 403 and deleted.json()["error"]["code"] == "profile_store_read_only"
    assert (directory / "alpha.safetensors").exists()
    spec = httpx.get(reader.url + "/openapi.json").json()
    assert "403" in spec["paths"]["/v1/profiles/{name}"]["put"]["responses"]
    assert "403" not in httpx.get(writer.url + "/openapi.json").json()["paths"]["/v1/profiles/{name}"]["put"][
        "responses"]


def test_a_file_copied_in_by_hand_is_listed_by_every_replica_within_the_bound(pair, tiny_loaded):
    """No request names it: the watcher of each replica picks it up."""
    writer, reader, base, directory = pair
    path = directory / "beta.safetensors"
    make_profile(tiny_loaded, "beta", seed=3).save(path)
    for live in (writer, reader):
        ready = lambda live=live: "beta" in httpx.get(live.url + "/readyz").json()["profiles"]  # noqa: E731
        eventually(ready)
    path.unlink()
    for live in (writer, reader):
        eventually(lambda live=live: httpx.get(live.url + "/readyz").json()["profiles"] == [])
