"""Security properties, each checked against a running server:

- with keys set, every route (walked from the app, so a new route cannot slip through) needs one, except
  the health and metrics endpoints; every route that changes state needs an admin key;
- error bodies carry no stack traces and no server file paths;
- profile names cannot leave the profile directory;
- uploads (and profile files at start-up) are parsed without pickle: a pickle payload never runs;
- the body size limits hold for chunked bodies without Content-Length.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
from pathlib import Path

import httpx
import pytest
import torch

from server.config import Settings
from server.routes import served_routes

from .conftest import live_server, make_profile

ROOT = Path(__file__).resolve().parents[2]

OPEN = {"/healthz", "/health", "/readyz", "/metrics"}
OPEN |= {"/playground", "/playground/", "/playground/playground.js", "/playground/playground.css"}  # a static page
# POST routes that read (generate, tokenize) rather than change anything; every other method but GET changes state
READ_POSTS = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/tokenize"),
              ("POST", "/detokenize")}
USER, ADMIN = "user-key-1", "admin-key-1"


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def keyed(tiny_loaded, tiny_profiles, tmp_path_factory):
    directory = tmp_path_factory.mktemp("secure-profiles")
    tiny_profiles["alpha"].save(directory / "alpha.safetensors")
    settings = Settings(api_keys=[USER], admin_keys=[ADMIN], profile_dir=directory)
    with live_server(tiny_loaded, settings) as live:
        live.base = httpx.get(live.v1 + "/models", headers=_auth(USER)).json()["data"][0]["id"]
        yield live


def _walk(live) -> list[tuple[str, str, str]]:
    """(method, route path, concrete URL) for every route the app serves."""
    found = []
    for route in served_routes(live.app):
        path = getattr(route, "path", None)
        for method in sorted(getattr(route, "methods", None) or ()):
            concrete = re.sub(r"\{name\}", "nobody", path)
            concrete = re.sub(r"\{model_id(:path)?\}", live.base, concrete)
            found.append((method, path, live.url + concrete))
    return found


def test_the_walk_sees_every_route(keyed) -> None:
    seen = {(method, path) for method, path, _ in _walk(keyed)}
    assert {("POST", "/v1/chat/completions"), ("PUT", "/v1/profiles/{name}"), ("GET", "/openapi.json"),
            ("GET", "/docs"), ("GET", "/metrics"), ("POST", "/v1/profiles/-/reload")} <= seen
    assert len(seen) >= 14


def test_every_route_but_health_and_metrics_needs_a_key(keyed) -> None:
    for method, path, url in _walk(keyed):
        for headers in ({}, _auth("wrong"), {"Authorization": f"Basic {USER}"}, {"Authorization": "Bearer"}):
            response = httpx.request(method, url, headers=headers, timeout=30)
            if path in OPEN:
                assert response.status_code == 200, (method, path, response.status_code)
            else:
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["type"] == "authentication_error"
                assert response.headers["www-authenticate"] == "Bearer"


def test_every_mutation_needs_an_admin_key(keyed) -> None:
    mutations = 0
    for method, path, url in _walk(keyed):
        user = httpx.request(method, url, headers=_auth(USER), timeout=30)
        mutation = method not in ("GET", "HEAD") and (method, path) not in READ_POSTS
        if mutation:
            mutations += 1
            assert user.status_code == 403, (method, path, user.text)
            assert user.json()["error"]["code"] == "admin_key_required"
            admin = httpx.request(method, url, headers=_auth(ADMIN), timeout=30)
            assert admin.status_code not in (401, 403), (method, path, admin.text)
        else:
            assert user.status_code not in (401, 403), (method, path, user.text)
    assert mutations == 4  # PUT and DELETE of a profile, the reload, a fit
    assert (keyed.profile_dir / "alpha.safetensors").is_file()


# -- no traces, no paths ------------------------------------------------------------------------------

SECRET_DIR_MARK = "secret-store-dir"


def _assert_clean(response: httpx.Response, *paths: Path) -> None:
    text = response.text
    assert "Traceback" not in text and 'File "' not in text and ".py" not in text, text
    for path in (*paths, ROOT):
        assert str(path) not in text, text
    assert SECRET_DIR_MARK not in text, text


def test_error_bodies_carry_no_traces_or_paths(tiny_loaded, tiny_profiles, tmp_path, monkeypatch) -> None:
    directory = tmp_path / SECRET_DIR_MARK
    directory.mkdir()
    tiny_profiles["alpha"].save(directory / "alpha.safetensors")
    (directory / "broken.safetensors").write_bytes(b"\x01" * 40)
    (directory / "unreadable.safetensors").mkdir()  # a directory with a profile's name: skipped, not read
    (directory / "other.safetensors").write_bytes(make_profile(tiny_loaded, "o", seed=1).to_bytes()[:-9])
    with live_server(tiny_loaded, Settings(profile_dir=directory)) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        listing = httpx.get(live.v1 + "/profiles")
        assert sorted(s["path"] for s in listing.json()["skipped"]) == ["broken.safetensors", "other.safetensors"]
        _assert_clean(listing, directory)
        _assert_clean(httpx.get(live.url + "/readyz"), directory)
        responses = [
            httpx.put(live.v1 + "/profiles/alpha", content=b"\x00" * 100),
            httpx.put(live.v1 + "/profiles/alpha", content=b"GGUF" + b"\x00" * 100),
            httpx.put(live.v1 + "/profiles/alpha", content=make_profile(tiny_loaded, "x", seed=2).to_bytes()[:50]),
            httpx.put(live.v1 + "/profiles/..%2F..%2Fetc", content=b"x"),
            httpx.post(live.v1 + "/chat/completions", content=b"{bad json"),
            httpx.post(live.v1 + "/chat/completions", json={"model": base, "messages": "nope"}),
            httpx.post(live.v1 + "/completions", json={"model": base, "prompt": [10**9]}),
            httpx.get(live.v1 + "/profiles/%2e%2e"),
            httpx.get(live.url + "/nope/../../etc/passwd"),
        ]
        for response in responses:
            assert 400 <= response.status_code < 500
            _assert_clean(response, directory)

        # failures of the store itself: the path stays in the log, not in the answer
        from server import registry as registry_module

        def failing_write(errno_value: int):
            def write(path, data):
                raise OSError(errno_value, os.strerror(errno_value), str(path))
            return write

        data = make_profile(tiny_loaded, "alpha", seed=3).to_bytes()
        before = (directory / "alpha.safetensors").read_bytes()
        monkeypatch.setattr(registry_module, "atomic_write", failing_write(errno.EACCES))
        denied = httpx.put(live.v1 + "/profiles/alpha", content=data)
        assert denied.status_code == 500 and denied.json()["error"]["code"] == "profile_store_error"
        _assert_clean(denied, directory)
        monkeypatch.setattr(registry_module, "atomic_write", failing_write(errno.ENOSPC))
        full = httpx.put(live.v1 + "/profiles/alpha", content=data)
        assert full.status_code == 507 and full.json()["error"]["code"] == "insufficient_storage"
        _assert_clean(full, directory)
        assert (directory / "alpha.safetensors").read_bytes() == before
        monkeypatch.undo()

        def failing_iterdir(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))

        monkeypatch.setattr(Path, "iterdir", failing_iterdir)
        reload = httpx.post(live.v1 + "/profiles/-/reload")
        monkeypatch.undo()
        assert reload.status_code == 500
        _assert_clean(reload, directory)


def test_an_unexpected_exception_is_a_bare_500(tiny_loaded) -> None:
    from server.backends.base import Backend

    from .fakes import ScriptedEngine

    engine = ScriptedEngine([], RuntimeError(f"boom in {ROOT}/server/x.py line 3"), fail_at_start=True)

    def backend(settings: Settings) -> Backend:
        return Backend("scripted", engine, tiny_loaded.tokenizer, tiny_loaded.fingerprint, tiny_loaded.name)

    with live_server(tiny_loaded, Settings(), backend_factory=backend) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        response = httpx.post(live.v1 + "/chat/completions",
                              json={"model": base, "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 500
        assert response.json() == {"error": {"message": "internal server error", "type": "server_error",
                                              "param": None, "code": "internal_error"}}


# -- names cannot escape the store --------------------------------------------------------------------


def test_profile_names_cannot_leave_the_store(tiny_loaded, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    target = outside / "target.safetensors"
    original = make_profile(tiny_loaded, "target", seed=4).to_bytes()
    target.write_bytes(original)
    (store / "link.safetensors").symlink_to(target)  # an operator's link: read, never written through
    data = make_profile(tiny_loaded, "any", seed=5).to_bytes()
    names = ["..", "../outside/x", "%2e%2e", "%2e%2e%2foutside%2fx", "..%2Foutside%2Fx", "a%2F..%2F..%2Fx",
             "%2Fetc%2Fpasswd", "a%5C..%5Cx", ".hidden", "x%00y", "-x", "a..b", "a" * 65, "%20x"]
    with live_server(tiny_loaded, Settings(profile_dir=store)) as live:
        for name in names:
            response = httpx.put(live.v1 + f"/profiles/{name}", content=data)
            assert response.status_code in (400, 404, 405), (name, response.status_code, response.text)
            assert httpx.delete(live.v1 + f"/profiles/{name}").status_code in (400, 404, 405), name
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        for name in ("../outside/target", "/etc/passwd", "link/../../outside/target"):
            steered = httpx.post(live.v1 + "/chat/completions", json={
                "model": base, "messages": [{"role": "user", "content": "x"}], "steering": {"profile": name}})
            assert steered.status_code in (400, 404), steered.text
        assert httpx.put(live.v1 + "/profiles/link", content=data).status_code == 200
    assert sorted(p.name for p in outside.iterdir()) == ["target.safetensors"]
    assert target.read_bytes() == original  # the link was replaced, its target left alone
    assert not (store / "link.safetensors").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "store"]
    assert sorted(p.name for p in store.iterdir()) == ["link.safetensors"]


# -- no pickle ----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_uploads_and_profile_files_are_never_unpickled(tiny_loaded, tmp_path) -> None:
    marker = tmp_path / "pickle-ran"
    raw_pickle = pickle.dumps(_Payload(marker))
    buffer = io.BytesIO()
    torch.save({"offset.1": _Payload(marker)}, buffer)  # torch's zip-of-pickles format
    torch_file = buffer.getvalue()
    pickle.loads(raw_pickle)  # the payload works: loading it does create the marker
    assert marker.exists()
    marker.unlink()

    store = tmp_path / "store"
    store.mkdir()
    (store / "pickled.safetensors").write_bytes(raw_pickle)
    (store / "torchsaved.safetensors").write_bytes(torch_file)
    with live_server(tiny_loaded, Settings(profile_dir=store)) as live:
        skipped = {s["path"] for s in httpx.get(live.v1 + "/profiles").json()["skipped"]}
        assert skipped == {"pickled.safetensors", "torchsaved.safetensors"}
        for body in (raw_pickle, torch_file):
            assert httpx.put(live.v1 + "/profiles/evil", content=body).status_code == 400
            files = {"file": ("evil.pt", body, "application/octet-stream")}
            assert httpx.put(live.v1 + "/profiles/evil", files=files).status_code == 400
        assert httpx.post(live.v1 + "/profiles/-/reload").status_code == 200
    assert not marker.exists()
    # the server and the whole runtime core (profile.py and gguf_io.py read every file a server loads)
    sources = [*Path(ROOT, "server").rglob("*.py"), *Path(ROOT, "steering_vectors", "core").rglob("*.py")]
    assert Path(ROOT, "steering_vectors", "core", "profile.py") in sources
    for source in sources:
        text = source.read_text()
        assert not re.search(r"torch\.load\(|pickle\.loads?\(|import pickle|numpy\.load\(|np\.load\(", text), source


# -- size limits without Content-Length ---------------------------------------------------------------


def test_size_limits_hold_for_chunked_bodies(tiny_loaded, tiny_profiles) -> None:
    with live_server(tiny_loaded, Settings(max_body_bytes=4096, max_profile_bytes=8192)) as live:
        base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]

        def chunks(total: int, size: int = 512):
            sent = 0
            while sent < total:
                yield b" " * min(size, total - sent)
                sent += size

        def json_chunks(padding: int):
            yield b'{"model": "' + base.encode() + b'", "max_tokens": 1, "messages": [{"role": "user", '
            yield from chunks(padding)
            yield b'"content": "hi"}]}'

        fits = httpx.post(live.v1 + "/chat/completions", content=json_chunks(3000),
                          headers={"content-type": "application/json"}, timeout=60)
        assert fits.status_code == 200, fits.text
        for padding in (5000, 100_000):
            response = httpx.post(live.v1 + "/chat/completions", content=json_chunks(padding),
                                  headers={"content-type": "application/json"}, timeout=60)
            assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        raw = httpx.put(live.v1 + "/profiles/big", content=chunks(9000))
        assert raw.status_code == 413

        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.safetensors\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()

        def multipart(payload: bytes, extra: int):
            yield head
            yield payload
            yield from chunks(extra)
            yield f"\r\n--{boundary}--\r\n".encode()

        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        big = httpx.put(live.v1 + "/profiles/big", content=multipart(b"x", 20_000), headers=headers)
        assert big.status_code == 413
        small = tiny_profiles["alpha"].to_bytes()
        assert len(small) < 8192 - 300
        ok = httpx.put(live.v1 + "/profiles/small", content=multipart(small, 0), headers=headers)
        assert ok.status_code == 201, ok.text
        two = (head + small + f"\r\n--{boundary}\r\n".encode() + head.split(b"\r\n", 1)[1] + small
               + f"\r\n--{boundary}--\r\n".encode())
        refused = httpx.put(live.v1 + "/profiles/small", content=iter([two]), headers=headers)
        assert refused.status_code == 400  # one file part only
        assert httpx.get(live.url + "/readyz").status_code == 200
