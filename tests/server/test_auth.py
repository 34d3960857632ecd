"""API keys and admin keys: 401 without or with a wrong key, 403 for profile changes without an admin key."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.config import Settings

from .conftest import live_server, make_profile


@pytest.fixture(scope="module")
def keyed(tiny_loaded, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# keys\nfile-user\nadmin:file-admin\n")
    settings = Settings(api_keys="user-key,other-user", admin_keys=["admin-key"], keys_file=keys,
                        profile_dir=tmp_path_factory.mktemp("kp"))
    with live_server(tiny_loaded, settings) as live:
        yield live


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_api_needs_a_valid_key(keyed) -> None:
    for key in (None, "wrong", "user-key-but-longer"):
        response = httpx.get(keyed.v1 + "/models", headers=_auth(key))
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    response = httpx.get(keyed.v1 + "/models", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert response.status_code == 401
    for key in ("user-key", "other-user", "file-user", "admin-key", "file-admin"):
        assert httpx.get(keyed.v1 + "/models", headers=_auth(key)).status_code == 200


def test_openai_client_with_keys(keyed) -> None:
    base = httpx.get(keyed.v1 + "/models", headers=_auth("user-key")).json()["data"][0]["id"]
    good = openai.OpenAI(base_url=keyed.v1, api_key="user-key", max_retries=0)
    reply = good.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=keyed.v1, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401


def test_profile_changes_need_an_admin_key(keyed, tiny_loaded) -> None:
    data = make_profile(tiny_loaded, "p", seed=3).to_bytes()
    url = keyed.v1 + "/profiles/guarded"
    assert httpx.put(url, content=data).status_code == 401
    refused = httpx.put(url, content=data, headers=_auth("user-key"))
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert not (keyed.profile_dir / "guarded.safetensors").exists()
    assert httpx.put(url, content=data, headers=_auth("file-admin")).status_code == 201
    assert httpx.get(url, headers=_auth("user-key")).status_code == 200  # reading needs only an API key
    assert httpx.delete(url, headers=_auth("user-key")).status_code == 403
    assert httpx.post(keyed.v1 + "/profiles/-/reload", headers=_auth("user-key")).status_code == 403
    assert httpx.delete(url, headers=_auth("admin-key")).status_code == 200


def test_operations_endpoints_stay_open(keyed) -> None:
    assert httpx.get(keyed.url + "/healthz").status_code == 200
    assert httpx.get(keyed.url + "/readyz").status_code == 200
    assert httpx.get(keyed.url + "/metrics").status_code == 200


def test_keys_are_not_shown() -> None:
    settings = Settings(api_keys="s3cret-one", admin_keys="s3cret-two")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    from server.auth import KeyRing

    assert "s3cret" not in repr(KeyRing.from_lists(*settings.keys()))


def test_api_keys_without_admin_keys_lock_profile_changes(tiny_loaded) -> None:
    with live_server(tiny_loaded, Settings(api_keys=["only-user"])) as live:
        response = httpx.put(live.v1 + "/profiles/x", content=b"...", headers=_auth("only-user"))
        assert response.status_code == 403


def test_admin_keys_alone_guard_only_profile_changes(tiny_loaded, tiny_profiles) -> None:
    with live_server(tiny_loaded, Settings(admin_keys=["root"])) as live:
        assert httpx.get(live.v1 + "/models").status_code == 200
        data = tiny_profiles["alpha"].to_bytes()
        assert httpx.put(live.v1 + "/profiles/x", content=data).status_code == 401
        assert httpx.put(live.v1 + "/profiles/x", content=data, headers=_auth("guess")).status_code == 401
        assert httpx.put(live.v1 + "/profiles/x", content=data, headers=_auth("root")).status_code == 201
