"""The playground in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, which
scripts/ci-system-deps.sh installs) driven by Selenium, against a live server over the tiny model under a
root path, with keys on. Picks a profile, moves its slider, runs a comparison and checks that both replies
render and differ (and that the profile's decoding defaults are shown, where it has them and where a reply took
them); builds a profile from examples in the page and sees it listed and ticked.

Skipped, with the reason, where Chromium, its driver or Selenium is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.config import Settings

from .conftest import live_server, make_profile

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)
DRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
               if p and Path(p).is_file()), None)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="Chromium or its driver is not installed: the browser test needs Debian's chromium and "
                              "chromium-driver packages (bash scripts/ci-system-deps.sh installs them as root)"),
]

ADMIN = "admin-key"


@pytest.fixture(scope="module")
def live(tiny_loaded, tmp_path_factory):
    directory = tmp_path_factory.mktemp("browser-profiles")
    make_profile(tiny_loaded, "alpha", seed=1, default_strength=1.0,
                 decoding={"repetition_penalty": 1.3}).save(directory / "alpha.safetensors")
    settings = Settings(profile_dir=directory, root_path="/rahf", api_keys=["user-key"], admin_keys=[ADMIN],
                        strength_min=-8, strength_max=8)
    with live_server(tiny_loaded, settings) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 120):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def test_compare_and_build_in_the_page(live, browser) -> None:
    browser.get(live.url + "/playground")
    status = browser.find_element(By.ID, "status")
    wait(browser, lambda d: "API key" in status.text)  # keys are on: the page asks for one
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(ADMIN, Keys.TAB)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'li[data-profile="alpha"]'))

    # pick the profile and move its slider from 1 to 3 with the keyboard (step 0.05)
    browser.find_element(By.CSS_SELECTOR, 'input[type=checkbox][data-profile="alpha"]').click()
    slider = browser.find_element(By.CSS_SELECTOR, 'input[type=range][data-profile="alpha"]')
    assert slider.get_attribute("min") == "-8" and slider.get_attribute("max") == "8"
    slider.send_keys(*([Keys.ARROW_RIGHT] * 40))
    shown = browser.find_element(By.CSS_SELECTOR, 'li[data-profile="alpha"] output')
    assert float(shown.text) == pytest.approx(3.0)
    assert "alpha @ 3" in browser.find_element(By.ID, "steering-label").text

    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("go")
    Select(browser.find_element(By.ID, "position")).select_by_value("all")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("12")
    browser.find_element(By.ID, "compare").click()
    plain, steered = (browser.find_element(By.ID, i) for i in ("reply-plain", "reply-steered"))
    wait(browser, lambda d: plain.get_attribute("data-done") == "true" and steered.get_attribute("data-done") == "true")
    for reply in (plain, steered):
        assert "error" not in (reply.get_attribute("class") or ""), reply.text
        assert reply.get_attribute("textContent"), reply.get_attribute("id")
    assert plain.get_attribute("textContent") != steered.get_attribute("textContent")
    # the page sets no penalty: the steered request took the profile's, and the page says so
    assert browser.find_element(By.ID, "conditions").text == (
        "repetition_penalty 1.300 from the profiles' decoding defaults")
    browser.find_element(By.CSS_SELECTOR, 'li[data-profile="alpha"] button.link').click()
    assert "repetition_penalty 1.300" in browser.find_element(By.ID, "details").text

    # a repetition penalty typed into the page goes with both requests: the unsteered reply is then the
    # API's reply to the same body with that penalty (which differs from the reply without it)
    import httpx

    headers = {"Authorization": f"Bearer {ADMIN}"}
    model = httpx.get(live.v1 + "/models", headers=headers).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": 12, "temperature": 0,
            "seed": 0}  # fmt: skip
    api = [httpx.post(live.v1 + "/chat/completions", json={**body, **extra}, headers=headers, timeout=60)
           .json()["choices"][0]["message"]["content"] for extra in ({}, {"repetition_penalty": 1.8})]  # fmt: skip
    assert api[0] == plain.get_attribute("textContent") and api[1] != api[0]
    penalty = browser.find_element(By.ID, "repetition-penalty")
    penalty.send_keys("1.8")
    browser.find_element(By.ID, "compare").click()
    wait(browser, lambda d: plain.get_attribute("data-done") == "true" and plain.get_attribute("textContent") == api[1])
    penalty.clear()

    # build a profile from the examples in the page and see it listed, ticked, with its details
    name = browser.find_element(By.ID, "fit-name")
    name.clear()
    name.send_keys("built-here")
    Select(browser.find_element(By.ID, "fit-method")).select_by_value("pca")
    browser.find_element(By.ID, "fit").click()
    result = browser.find_element(By.ID, "fit-result")
    wait(browser, lambda d: result.text.startswith("built ") or "error" in (result.get_attribute("class") or ""))
    assert result.text.startswith("built built-here (quickfit/pca, layers 1, 2)"), result.text
    box = browser.find_element(By.CSS_SELECTOR, 'input[type=checkbox][data-profile="built-here"]')
    assert box.is_selected()
    assert "built-here" in browser.find_element(By.ID, "details").text


def test_building_needs_an_admin_key(live, browser) -> None:
    browser.get(live.url + "/playground")
    browser.execute_script("sessionStorage.clear()")
    browser.get(live.url + "/playground")
    browser.find_element(By.ID, "api-key").send_keys("user-key", Keys.TAB)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'li[data-profile="alpha"]'))
    browser.find_element(By.ID, "fit").click()
    result = browser.find_element(By.ID, "fit-result")
    wait(browser, lambda d: "error" in (result.get_attribute("class") or ""))
    assert result.text.startswith("needs an admin key"), result.text
