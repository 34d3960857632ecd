"""`/playground`: the static page and its two assets, served from the package, under a root path too, left
out of the API description, and gone with `playground=False`; a profile's details (its calibration and
generation tables) built by playground.js under node with a stand-in DOM (the browser test:
test_playground_browser.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.routes import served_routes
from server.routes.profiles import describe

from .conftest import live_server, make_profile

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


# A stand-in DOM, just enough for playground.js to load (its API calls fail: no server) and for `showDetails`
# to build the profile's details; the test then reads the tables it built.
DOM = r"""
class Node {
  constructor(tag) { this.tag = tag; this.children = []; this.attrs = {}; this.className = ""; this.dataset = {};
    this.value = ""; this.hidden = false; this.classList = { toggle() {}, add() {}, remove() {} }; }
  set textContent(text) { this.children = [String(text)]; }
  get textContent() { return this.children.map((c) => typeof c === "string" ? c : c.textContent).join(""); }
  append(...nodes) { this.children.push(...nodes); }
  replaceChildren(...nodes) { this.children = nodes; }
  setAttribute(k, v) { this.attrs[k] = v; }
  addEventListener() {}
}
const nodes = {};
global.document = { documentElement: { dataset: {} }, createElement: (tag) => new Node(tag),
  getElementById: (id) => (nodes[id] = nodes[id] || new Node("div")) };
global.sessionStorage = { getItem: () => null, setItem() {} };
global.fetch = () => Promise.reject(new Error("no server here"));
const code = require("fs").readFileSync(process.argv[2], "utf8");
eval(code + "\nshowDetails(JSON.parse(process.argv[3]));");
const tables = [];
(function walk(n) { if (typeof n === "string") return;
  if (n.tag === "table") tables.push({ class: n.className, rows: n.children.map((tr) =>
    tr.children.map((cell) => cell.textContent)) });
  n.children.forEach(walk); })(nodes.details);
console.log(JSON.stringify({ tables, text: nodes.details.textContent }));
"""


def _details(profile: dict, tmp_path) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the details test runs playground.js under node")
    script = tmp_path / "dom.js"
    script.write_text(DOM)
    js = resources.files("server").joinpath("playground", "playground.js")
    done = subprocess.run([node, str(script), str(js), json.dumps(profile)], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


def test_the_details_show_the_generation_result_beside_the_calibration(tiny_loaded, tmp_path,
                                                                      generation_record) -> None:
    profile = make_profile(tiny_loaded, "gen", seed=1)
    profile.provenance = {"calibration": {"pairs": 4, "strength": 1.0, "rows": [
        {"strength": 1.0, "accuracy": 0.75, "margin": 0.1, "perplexity": 20.0}]}}
    shown = _details(describe(profile.with_generation(generation_record)), tmp_path)
    calibration, generation = shown["tables"][1:]
    assert calibration["class"] == "calibration" and calibration["rows"][1] == ["1", "0.750", "0.100", "20"]
    assert generation["class"] == "calibration generation"
    assert generation["rows"] == [
        ["strength", "win rate vs unsteered [95 % CI]", "loops", "refusals", "perplexity"],
        ["0 (unsteered)", "–", "50.0 %", "0.0 %", "2"],
        ["1 (chosen)", "75.0 % [50.0 %, 100.0 %]", "0.0 %", "50.0 %", "2.200 (+10.0 %)"],
        ["2", "100.0 % [100.0 %, 100.0 %]", "100.0 %", "–", "3 (+50.0 %)"],
    ]
    assert "Generation (dev half B)" in shown["text"] and "toy: 2 of 5 dev prompts, judge toy-head.safetensors" in (
        shown["text"])
    plain = _details(describe(profile), tmp_path)  # no generation section: said so, the calibration still shown
    assert len(plain["tables"]) == 2 and "No generation result recorded in this profile." in plain["text"]


def test_the_details_say_when_the_files_default_was_chosen_otherwise(tiny_loaded, tmp_path) -> None:
    profile = make_profile(tiny_loaded, "chosen", seed=1)
    calibration = {"pairs": 4, "strength": 1.0, "rows": [
        {"strength": 1.0, "accuracy": 0.75, "margin": 0.1, "perplexity": 20.0}]}  # fmt: skip
    profile.provenance = {"calibration": calibration}
    text = _details(describe(profile), tmp_path)["text"]
    assert "4 pairs; the strength they chose: 1." in text and "chosen otherwise" not in text
    profile.provenance = {"calibration": calibration,
                          "default_strength_choice": {"strength": 0.5, "how": "by its replies on dev half A"}}
    text = _details(describe(profile), tmp_path)["text"]
    assert "The file's default, 0.500, was chosen otherwise: by its replies on dev half A." in text
