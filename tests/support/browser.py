"""A real browser for the drop page's tests: Debian's Chromium driven through its ChromeDriver by
Selenium, headless, with a fresh profile. ``DropPage`` speaks the page's own terms (enter the key,
add files, wait for rows, generate) through its ``data-testid`` hooks, and writes a screenshot of
the whole page under ``test-output/web/`` (git-ignored).

When Chromium, ChromeDriver or Selenium is missing the tests fail (never skip) saying how to
install them: ``FILEDROP_SETUP_TEST=1 scripts/setup`` as root.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.support.server import REPO
from tests.support.waiting import wait_until

T = TypeVar("T")
SHOTS = REPO / "test-output" / "web"
INSTALL = ("run `FILEDROP_SETUP_TEST=1 scripts/setup` as root (it installs Debian's chromium and "
           "chromium-driver, and selenium into .venv)")
# Flags that work on this kind of machine: no sandbox as root, and nothing that reaches for the
# network on its own (the machine's closed network refuses those connections, many at a time).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000")


def _binary(name: str, fallback: str) -> str:
    found = shutil.which(name) or (fallback if Path(fallback).exists() else None)
    if not found:
        raise AssertionError(f"{name} is not installed: {INSTALL}")
    return found


def start_browser(profile: Path, downloads: Path) -> Any:
    """A headless Chromium with a fresh profile in ``profile``; downloads land in ``downloads``."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise AssertionError(f"selenium is not installed: {INSTALL}") from None
    chromium = _binary("chromium", "/usr/bin/chromium")
    driver_bin = _binary("chromedriver", "/usr/bin/chromedriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver is given by path: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


class DropPage:
    """The drop page at ``url`` in ``driver``."""

    def __init__(self, driver: Any, url: str, test_name: str) -> None:
        from selenium.webdriver.common.by import By

        self.By = By
        self.driver = driver
        self.url = url
        self.test_name = test_name

    # -- reading -----------------------------------------------------------------------------
    def find(self, testid: str) -> Any:
        return self.driver.find_element(self.By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def find_all(self, testid: str) -> list[Any]:
        return self.driver.find_elements(self.By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def by_id(self, element_id: str) -> Any:
        return self.driver.find_element(self.By.ID, element_id)

    def rows(self) -> list[dict[str, str | None]]:
        """Every file row: name, state, sha256, note (one script call, so one consistent read)."""
        return self.driver.execute_script("""
            return [...document.querySelectorAll('[data-testid="file-row"]')].map((li) => ({
              name: li.querySelector('.file-name').textContent, state: li.dataset.state,
              sha256: li.dataset.sha256 || null, note: li.querySelector('.file-note').textContent,
              idx: li.dataset.fileIdx}));""")

    def row(self, name: str) -> dict[str, str | None]:
        found = [r for r in self.rows() if r["name"] == name]
        assert len(found) == 1, (name, self.rows())
        return found[0]

    def row_element(self, name: str) -> Any:
        for li in self.find_all("file-row"):
            if li.find_element(self.By.CLASS_NAME, "file-name").text == name:
                return li
        raise AssertionError(f"no row for {name}: {self.rows()}")

    def batch_id(self) -> str:
        return self.find("batch-id").text

    def console_errors(self) -> list[str]:
        """Errors the page's scripts raised or logged (failed requests the page handles, like
        the 404 that says a file has no chunk yet, are not errors of the page)."""
        return [e["message"] for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE" and e.get("source") != "network"]

    # -- doing -------------------------------------------------------------------------------
    def open(self) -> DropPage:
        self.driver.get(self.url + "/")
        wait_until(lambda: self.driver.execute_script("return document.readyState") == "complete",
                   timeout=10, what="the page to load")
        return self

    def enter_key(self, key: str) -> None:
        field = self.find("api-key")
        field.clear()
        field.send_keys(key + "\n")

    def key_message(self) -> str:
        return self.by_id("key-message").text

    def wait_key_accepted(self) -> None:
        self.wait(lambda: self.key_message() == "Key accepted." and self.find("file-input").is_displayed(),
                  "the key to be accepted")

    def add_files(self, paths: Sequence[Path]) -> None:
        self.find("file-input").send_keys("\n".join(str(p) for p in paths))

    def wait_rows(self, states: dict[str, str], timeout: float = 60) -> list[dict[str, str | None]]:
        """Wait until the rows are exactly ``{name: state}``; a row in ``error`` fails at once."""

        def check() -> list[dict[str, str | None]] | None:
            rows = self.rows()
            errors = [r for r in rows if r["state"] == "error" and states.get(r["name"] or "") != "error"]
            assert not errors, f"upload failed: {errors}"
            return rows if {r["name"]: r["state"] for r in rows} == states and len(rows) == len(states) else None

        return self.wait(check, f"rows {states} (now {self.rows()})", timeout)

    def wait(self, pred: Callable[[], T], what: str, timeout: float = 30) -> T:
        return wait_until(pred, timeout=timeout, interval=0.05, what=what)

    def throttle_uploads(self, bytes_per_second: int | None) -> None:
        """Chromium's own network emulation: uploads at most this fast (None: no limit), so a
        test can act in the middle of an upload instead of racing it."""
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1,
            "uploadThroughput": bytes_per_second if bytes_per_second else -1})

    def screenshot(self, name: str) -> Path:
        """The whole page (not just the window) as PNG under test-output/web/."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{self.test_name}-{name}.png"
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot",
                                           {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def press(self, *keys: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(*keys).perform()

    def focused(self) -> Any:
        return self.driver.switch_to.active_element

    def tab_to(self, matches: Callable[[Any], bool], what: str, most: int = 60) -> Any:
        """Press Tab until the focused element ``matches`` (at most ``most`` presses)."""
        from selenium.webdriver.common.keys import Keys

        for _ in range(most):
            self.press(Keys.TAB)
            el = self.focused()
            if matches(el):
                return el
        raise AssertionError(f"{what} is not reachable with Tab in {most} presses")


def wait_for_file(path: Path, timeout: float = 20) -> bytes:
    """A finished download (Chromium writes ``.crdownload`` first, then renames)."""

    def done() -> bytes | None:
        if path.exists() and not Path(str(path) + ".crdownload").exists():
            data = path.read_bytes()
            return data or None
        return None

    return wait_until(done, timeout=timeout, what=f"download {path.name}")
