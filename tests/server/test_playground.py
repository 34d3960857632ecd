"""`/playground`: the static page and its two assets, served from the package, under a root path too, left
out of the API description, and gone with `playground=False` (the browser test: test_playground_browser.py)."""

from __future__ import annotations

import re
from importlib import resources

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.routes import served_routes

from .conftest import live_server

ASSETS = ("index.html", "playground.js", "playground.css")


def test_the_files_ship_in_the_package_and_load_nothing_from_elsewhere() -> None:
    for name in ASSETS:
        text = resources.files("server").joinpath("playground", name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), name


@pytest.fixture(scope="module")
def prefixed(tiny_loaded, tmp_path_factory):
    settings = Settings(root_path="/rahf", profile_dir=tmp_path_factory.mktemp("pg"), api_keys=["user"],
                        admin_keys=["admin"])
    with live_server(tiny_loaded, settings) as live:
        yield live


def test_the_page_and_its_assets_work_under_the_root_path(prefixed) -> None:
    page = httpx.get(prefixed.url + "/playground", timeout=30)  # no key: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'data-root="/rahf"' in page.text
    assert 'src="/rahf/playground/playground.js"' in page.text
    assert 'href="/rahf/playground/playground.css"' in page.text
    assert "__ROOT__" not in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{prefixed.url}/playground/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
    # the API the page calls keeps its keys
    assert httpx.get(prefixed.v1 + "/profiles", timeout=30).status_code == 401
    spec = httpx.get(prefixed.url + "/openapi.json", headers={"Authorization": "Bearer user"}, timeout=30).json()
    assert not [path for path in spec["paths"] if "playground" in path]


def test_the_root_path_is_escaped_into_the_page(tiny_loaded) -> None:
    settings = Settings(root_path='/a"b<c')
    with live_server(tiny_loaded, settings) as live:
        page = httpx.get(live.url + "/playground", timeout=30)
    assert page.status_code == 200
    assert 'data-root="/a&quot;b&lt;c"' in page.text and '/a"b<c' not in page.text


def test_the_off_switch_removes_the_page(monkeypatch) -> None:
    monkeypatch.setenv("RAHF_PLAYGROUND", "false")
    settings = Settings()
    assert settings.playground is False

    def pages(app) -> set[str]:
        return {route.path for route in served_routes(app) if getattr(route, "path", "").startswith("/playground")}

    assert pages(create_app(settings)) == set()
    assert pages(create_app(Settings(playground=True))) == {
        "/playground", "/playground/", "/playground/playground.js", "/playground/playground.css"}


def test_without_the_page_its_paths_are_404s(tiny_loaded) -> None:
    with live_server(tiny_loaded, Settings(playground=False)) as live:
        response = httpx.get(live.url + "/playground", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
