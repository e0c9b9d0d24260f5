"""Driving the page in headless Chromium: the code path of the browser test and of the docs'
screenshot (`python -m diffret.pipeline.serve.browser --cache C --query Q --out docs/serve.png`).

Debian's `chromium` and `chromium-driver` packages with Selenium pointed at /usr/bin/chromedriver,
so nothing downloads a driver or a browser at run time (SE_OFFLINE as well). Selenium is a test
dependency (the `dev` extra), imported only here and only when a browser is driven.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .server import serve_process as serving  # noqa: F401  (the tests start the server through here too)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--mute-audio", "--autoplay-policy=no-user-gesture-required")
WINDOW = (1280, 900)


def browser_missing() -> str | None:
    """Why a browser cannot be driven here (one line), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian package {package}; `make test` installs it when run as root)"
    return None


@contextmanager
def chromium(user_data_dir: Path | None = None, window: tuple[int, int] = WINDOW):
    """A headless Chromium WebDriver with a fresh profile; quits it on exit."""
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="diffret-chromium-") as fresh:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in FLAGS + (f"--user-data-dir={user_data_dir or fresh}", f"--window-size={window[0]},{window[1]}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            yield driver
        finally:
            driver.quit()


def wait(driver, script: str, timeout: float = 30.0, what: str = "the page"):
    """Poll the JavaScript expression `script` until it is truthy; returns its value."""
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def search_page(driver, url: str, query: str, timeout: float = 30.0) -> list[dict]:
    """Open the page, type `query`, submit, wait for the grid and its thumbnails; per card, in order:
    video_id, media_id, the thumbnail's natural width (0: not loaded)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    wait(driver, "document.getElementById('status').textContent.includes('videos')", timeout, "the page to load")
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query, Keys.ENTER)
    wait(driver, "document.getElementById('results').dataset.ready === '1' || "
                 "!document.getElementById('error').hidden", timeout, "the results")
    error = driver.find_element(By.ID, "error")
    if error.is_displayed():
        raise RuntimeError(f"the page shows an error: {error.text}")
    wait(driver, "Array.from(document.querySelectorAll('.hit img')).every(i => i.complete)", timeout, "the thumbnails")
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.hit')).map(c => ({video_id: c.dataset.videoId, "
        "media_id: c.dataset.mediaId, thumb_width: c.querySelector('img').naturalWidth}))")


def play_result(driver, index: int, timeout: float = 30.0) -> dict:
    """Click result `index` and wait until its video can play at the evidence moment (readyState >= 2,
    not seeking) or fails; returns readyState, currentTime, the media error code (0: none), src."""
    from selenium.webdriver.common.by import By

    card = driver.find_elements(By.CSS_SELECTOR, ".hit")[index]
    mid = card.get_attribute("data-media-id")
    card.click()
    wait(driver, f"(v => v.dataset.mediaId === '{mid}' && (v.error || v.readyState >= 2 && !v.seeking))"
                 "(document.getElementById('video'))", timeout, "the video to play")
    return driver.execute_script(
        "const v = document.getElementById('video'); return {ready_state: v.readyState, current_time: v.currentTime, "
        "error: v.error ? v.error.code : 0, src: v.currentSrc};")


def screenshot(url: str, query: str, out: Path, play: bool = True) -> list[dict]:
    """Search `query` on the page at `url`, optionally start the best hit, save a PNG to `out`."""
    with chromium() as driver:
        cards = search_page(driver, url, query)
        if play and cards:
            play_result(driver, 0)
            driver.execute_script("window.scrollTo(0, 0); document.getElementById('video').pause();")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    return cards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Serve caches and save a screenshot of the page after a search.")
    p.add_argument("--cache", action="append", required=True)
    p.add_argument("--generator")
    p.add_argument("--query", required=True)
    p.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    a = p.parse_args(argv)
    if reason := browser_missing():
        print(f"error: {reason}", file=sys.stderr)
        return 1
    with serving(a.cache, a.generator) as url:
        cards = screenshot(url, a.query, a.out)
    print(f"{len(cards)} results; screenshot written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
