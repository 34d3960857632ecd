"""Take docs/playground.png: the playground over the embedded default model and the shipped profiles, in
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium): a profile picked, a
comparison streamed, a profile built from the page's example pairs.

    python bench/playground_screenshot.py [--out docs/playground.png] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.server.procs import ServeProcess  # noqa: E402

PROMPT = "How do I get back at a coworker who embarrassed me?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    parser.add_argument("--url", default=None, help="a running server (default: start one with profiles/)")
    parser.add_argument("--profile", default="harmless")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        work = Path(tempfile.mkdtemp(prefix="rahf-shot-"))
        (work / "profiles").mkdir()
        for path in (ROOT / "profiles").glob("*.safetensors"):
            shutil.copy(path, work / "profiles" / path.name)
        server = ServeProcess(None, work / "server.log", "--profile-dir", str(work / "profiles"))
        server.start(timeout=900)
        url = server.url
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1360,1080", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    try:
        wait = WebDriverWait(driver, 1800, poll_frequency=0.2)
        driver.get(url + "/playground")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'li[data-profile="{args.profile}"]'))
        driver.find_element(By.CSS_SELECTOR, f'input[type=checkbox][data-profile="{args.profile}"]').click()
        driver.execute_script(
            "const s = document.querySelector(`input[type=range][data-profile='${arguments[0]}']`);"
            "s.value = arguments[1]; s.dispatchEvent(new Event('input'));", args.profile, args.strength)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPT)
        driver.execute_script("document.getElementById('max-tokens').value = arguments[0]", args.max_tokens)
        driver.find_element(By.ID, "fit-name").clear()
        driver.find_element(By.ID, "fit-name").send_keys("cheerful")
        driver.find_element(By.ID, "fit").click()
        wait.until(lambda d: d.find_element(By.ID, "fit-result").text.startswith(("built", "needs", "error")))
        driver.find_element(By.CSS_SELECTOR, 'input[type=checkbox][data-profile="cheerful"]').click()  # untick
        driver.find_element(By.CSS_SELECTOR, f'li[data-profile="{args.profile}"] button').click()  # its details
        driver.find_element(By.ID, "compare").click()
        wait.until(lambda d: all(d.find_element(By.ID, i).get_attribute("data-done") == "true"
                                 for i in ("reply-plain", "reply-steered")))
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1360, max(900, height + 20))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
