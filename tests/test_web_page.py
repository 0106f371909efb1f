"""The drop page in a real browser (headless Chromium + Selenium), through the project's NGINX in
front of a real ``filedrop serve``, as scripts/run starts them. The issue's scenarios: three files
in chunks with their SHA-256; the app killed and started again mid-upload; a page reload
mid-upload; 50 rows generated into 50 links that open through NGINX; a refused key; keyboard
only; a folder and dropped files; a key revoked mid-upload. Then what later reviews found: two
tabs on one batch, a forgotten key, a folder of many small files, names the server refuses, a
folder over the batch's file limit, a job followed again once the key is entered again. Each test
leaves a screenshot of the whole page in test-output/web/.

One browser serves the module; each test has its own NGINX port, so its own origin, and so its
own localStorage and sessionStorage.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from server.config import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.browser import DropPage, start_browser, wait_for_file
from tests.support.nginx import NginxProcess
from tests.support.server import REPO, ServerProcess
from tests.support.waiting import free_port, wait_until

MiB = 1 << 20
TERMINAL = ("Completed", "Completed with errors", "Cancelled", "Failed")
TEMPLATE = {"title": "Invoice {{ data.num }}", "lang": "en",
            "body": "<h1>Invoice {{ data.num }}</h1><p>Amount: {{ data.amount }}</p>"}


@dataclass
class Stack:
    app: ServerProcess
    ngx: NginxProcess
    data_dir: Path
    http_port: int
    settings: dict[str, str]

    @property
    def url(self) -> str:
        return self.ngx.url

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.request(method, self.url + path, headers={**AUTH, **kw.pop("headers", {})}, **kw)

    def manifest(self, batch_id: str) -> dict[str, dict[str, Any]]:
        r = self.api("POST", f"/api/v1/upload/{batch_id}/execute/Batch.Manifest", json={"params": {}},
                     headers={"X-Batch-No-Drop": "true"})
        assert r.status_code == 200, r.text
        return {f["name"]: f for f in r.json()["files"]}

    def chunk_ids(self, batch_id: str, file_idx: str) -> list[int] | None:
        r = self.api("GET", f"/api/v1/upload/{batch_id}/{file_idx}")
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        return r.json()["uploadedChunkIds"]

    def stored_chunk_posts(self, batch_id: str, file_idx: str) -> int:
        """Chunk POSTs of one file that the app answered 201/202, from NGINX's access log
        (NGINX stopped first: the log is buffered)."""
        self.ngx.stop()
        log = (self.ngx.prefix / "logs" / "access.log").read_text()
        return len(re.findall(rf'"POST /api/v1/upload/{batch_id}/{file_idx} HTTP/1\.1" 20[12] ', log))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    base = tmp_path_factory.mktemp("browser")
    driver = start_browser(base / "profile", base / "downloads")
    driver.downloads = base / "downloads"  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def stack(tmp_path: Path, server_factory, nginx_factory) -> Callable[..., Stack]:  # type: ignore[no-untyped-def]
    """``stack(**settings)``: the app (a subprocess) and NGINX in front of it, as scripts/run
    starts them; smartlinks are published on NGINX's port."""

    def start(**settings: str) -> Stack:
        http_port = free_port()
        app = server_factory(http_port=str(http_port), **settings)
        ngx = nginx_factory(Settings.from_env(app.env), app_port=app.port, http_port=http_port)
        return Stack(app, ngx, tmp_path / "srv", http_port, settings)

    return start


@pytest.fixture
def page_for(browser: Any, request: pytest.FixtureRequest) -> Callable[[Stack], DropPage]:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)

    def make(stack: Stack) -> DropPage:
        page = DropPage(browser, stack.ngx.page_url, name)
        page.throttle_uploads(None)
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        return page.open()

    yield make
    for handle in browser.window_handles[1:]:  # tabs a link opened
        browser.switch_to.window(handle)
        browser.close()
    browser.switch_to.window(browser.window_handles[0])
    browser.get("about:blank")  # stop whatever the page was still doing


def start_page(page: DropPage) -> DropPage:
    page.enter_key(API_KEY)
    page.wait_key_accepted()
    return page


def test_three_files_go_up_in_chunks_and_show_the_servers_sha256(tmp_path: Path, stack, page_for) -> None:
    s = stack(chunk_size="4M")
    big = random_file(tmp_path / "big.bin", 20_000_000)  # 5 chunks of 4 MiB
    text = tmp_path / "résumé 100% <b>.txt"  # a name is only data: encoded, shown as text
    text.write_text("Bonjour, été 2026\n" * 500, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    page = start_page(page_for(s))

    page.add_files([big, text, empty])
    rows = page.wait_rows({"big.bin": "complete", text.name: "complete", "empty.txt": "complete"})

    expected = {p.name: sha256(p) for p in (big, text, empty)}
    assert {r["name"]: r["sha256"] for r in rows} == expected
    batch_id = page.batch_id()
    manifest = s.manifest(batch_id)
    assert {n: f["sha256"] for n, f in manifest.items()} == expected
    assert {n: f["size"] for n, f in manifest.items()} == {p.name: p.stat().st_size for p in (big, text, empty)}
    info = s.api("GET", f"/api/v1/upload/{batch_id}/{page.row('big.bin')['idx']}").json()
    assert info["uploadType"] == "chunked" and info["chunkCount"] == 5
    # Each finished file shows its size and SHA-256 in words, not only in attributes.
    shown = page.row_element("big.bin").text
    assert "20000000 bytes" in shown and expected["big.bin"] in shown
    assert page.by_id("total-text").text.startswith("3 of 3 files complete")
    assert page.console_errors() == []
    page.screenshot("complete")


def test_a_file_over_the_chunk_cap_goes_up_in_bigger_chunks(tmp_path: Path, stack, page_for) -> None:
    """With FILEDROP_MAX_CHUNKS_PER_FILE low, a file that would need more chunks of the announced
    size goes up in fewer, bigger ones (up to FILEDROP_MAX_CHUNK_SIZE); one bigger than both
    allow is refused on the page, naming them."""
    s = stack(chunk_size="1M", max_chunk_size="2M", max_chunks_per_file="4")
    six = random_file(tmp_path / "six.bin", 6 * MiB)  # 6 chunks of 1 MiB: over the cap
    nine = random_file(tmp_path / "nine.bin", 9 * MiB)  # over 4 x 2 MiB
    page = start_page(page_for(s))
    assert "At most 8.0 MiB a file" in page.by_id("limits-line").text, page.by_id("limits-line").text
    page.add_files([six, nine])
    rows = page.wait_rows({"six.bin": "complete"})
    assert rows[0]["sha256"] == sha256(six)
    info = s.api("GET", f"/api/v1/upload/{page.batch_id()}/{rows[0]['idx']}").json()
    assert info["chunkCount"] == 4 and info["sha256"] == sha256(six)
    refusal = page.by_id("files-message").text
    assert refusal.startswith("Not added: nine.bin: over the 8388608 bytes") and \
        "FILEDROP_MAX_CHUNKS_PER_FILE x FILEDROP_MAX_CHUNK_SIZE" in refusal, refusal


def test_the_page_resumes_after_the_app_is_killed_mid_upload(tmp_path: Path, stack, page_for,
                                                             server_factory) -> None:
    s = stack(chunk_size="1M")
    big = random_file(tmp_path / "big.bin", 16 * MiB)  # 16 chunks
    page = start_page(page_for(s))
    page.throttle_uploads(4 * MiB)  # ~4 s for the file: time to stop the app in the middle
    page.add_files([big])
    batch_id = page.wait(lambda: re.fullmatch(r"[0-9a-f]{32}", page.batch_id()) and page.batch_id(), "a batch")
    before = page.wait(lambda: (ids := s.chunk_ids(batch_id, "0")) and len(ids) >= 6 and ids,
                       "6 chunks stored", timeout=30)
    assert len(before) < 16
    figures = page.row_element("big.bin").find_element(page.By.CLASS_NAME, "file-figures").text
    assert re.search(r"of 16 MiB, [0-9.]+ (KiB|MiB)/s, \d+ s left", figures), figures

    s.app.kill9()
    # NGINX answers 503 (JSON) while the app is down: the row shows its message and keeps trying,
    # after the 5 s its Retry-After asks for (+0-20 %), not the backoff's first 0.5 s.
    note = page.wait(lambda: "the application is not available" in (n := page.row("big.bin")["note"] or "") and n,
                     "the row to say the app is unavailable")
    assert re.search(r"Retrying in [56] s…$", note), note
    assert page.row("big.bin")["state"] == "uploading"
    page.screenshot("app-down")
    server_factory(data_dir=s.data_dir, http_port=str(s.http_port), app_port=str(s.app.port), **s.settings)
    page.throttle_uploads(None)

    rows = page.wait_rows({"big.bin": "complete"}, timeout=60)
    assert rows[0]["sha256"] == sha256(big) == s.manifest(batch_id)["big.bin"]["sha256"]
    page.screenshot("resumed")
    # It went on from the server's chunk ids: the chunks stored before the kill were not sent
    # again (a few duplicates at most: chunks stored whose answer the kill cut off).
    assert 16 <= s.stored_chunk_posts(batch_id, "0") <= 16 + 3


def test_after_a_reload_the_file_picked_again_resumes_from_the_servers_chunks(tmp_path: Path, stack,
                                                                              page_for) -> None:
    s = stack(chunk_size="1M")
    big = random_file(tmp_path / "big.bin", 16 * MiB)
    page = start_page(page_for(s))
    page.throttle_uploads(4 * MiB)
    page.add_files([big])
    batch_id = page.wait(lambda: re.fullmatch(r"[0-9a-f]{32}", page.batch_id()) and page.batch_id(), "a batch")
    page.wait(lambda: (ids := s.chunk_ids(batch_id, "0")) and len(ids) >= 5, "5 chunks stored", timeout=30)

    page.driver.refresh()
    page.wait_key_accepted()  # the key is kept in sessionStorage
    row = page.wait(lambda: (r := page.rows()) and r[0]["state"] == "paused" and r[0], "the remembered file")
    assert page.batch_id() == batch_id
    assert row["name"] == "big.bin" and "Choose or drop this file again" in (row["note"] or "")
    stored = len(s.chunk_ids(batch_id, "0") or [])
    progress = float(page.row_element("big.bin").find_element(page.By.TAG_NAME, "progress").get_attribute("value"))
    assert progress == pytest.approx(stored / 16)  # what the server has, before anything is sent
    page.screenshot("remembered")

    page.throttle_uploads(None)
    page.add_files([big])  # matched by name, size and lastModified
    rows = page.wait_rows({"big.bin": "complete"})
    assert rows[0]["sha256"] == sha256(big) and rows[0]["idx"] == "0"
    page.screenshot("resumed")
    assert 16 <= s.stored_chunk_posts(batch_id, "0") <= 16 + 3


def test_fifty_rows_become_fifty_links_that_open_through_nginx(tmp_path: Path, stack, page_for, browser) -> None:
    s = stack()
    template = tmp_path / "template.json"
    template.write_text(json.dumps(TEMPLATE))
    rows = [{"reference_id": f"ref{i:03d}", "suffix": f"{i:03d}5f1ea1e9b982f900468a",
             "data": {"num": f"N-{i:03d}", "amount": f"{100 + i} EUR"}} for i in range(50)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    page = start_page(page_for(s))
    page.add_files([template, data])
    page.wait_rows({"template.json": "complete", "rows.json": "complete"})

    from selenium.webdriver.support.ui import Select

    template_select, data_select = Select(page.find("template-file")), Select(page.find("data-file"))
    assert sorted(o.text for o in template_select.options) == ["rows.json", "template.json"]
    assert sorted(o.text for o in data_select.options) == ["rows.json", "template.json"]
    # The server's refusal is shown as its message, not as JSON (rows are no master template).
    template_select.select_by_visible_text("rows.json")
    page.find("generate").click()
    message = page.by_id("generate-message")
    refusal = page.wait(lambda: "error" in (message.get_attribute("class") or "") and message.text, "the refusal")
    idx = {r["name"]: r["idx"] for r in page.rows()}
    answer = s.api("POST", f"/api/v1/upload/{page.batch_id()}/execute/SmartLinks.Generate",
                   json={"params": {"template": idx["rows.json"], "data": idx["rows.json"]}},
                   headers={"X-Batch-No-Drop": "true"})
    assert answer.status_code == 422 and refusal == answer.json()["message"], (refusal, answer.text)
    assert page.find("job-status").text == ""

    template_select.select_by_visible_text("template.json")
    data_select.select_by_visible_text("rows.json")
    # Every text the status shows, in order, to see it move (not only its last value).
    page.driver.execute_script("""
        window.seen = [];
        const status = document.querySelector('[data-testid="job-status"]');
        new MutationObserver(() => window.seen.push(status.textContent))
          .observe(status, {childList: true, characterData: true, subtree: true});""")
    page.find("generate").click()

    status = page.wait(lambda: (t := page.find("job-status").text) and t.startswith(TERMINAL) and t,
                       "the job to end", timeout=60)
    assert status.startswith("Completed:") and "50 succeeded, 0 errored" in status, status
    seen = page.driver.execute_script("return window.seen")
    assert seen[0].startswith(("Queued:", "In progress:")) and seen[-1] == status, seen
    links = page.wait(lambda: len(found := page.find_all("smartlink")) == 50 and found, "50 links")
    hrefs = [a.get_attribute("href") for a in links]
    batch_id = page.batch_id()
    assert hrefs == [f"{s.url}/{batch_id}/{r['reference_id']}.{r['suffix']}.html" for r in rows]
    for href, row in zip(hrefs, rows, strict=True):
        r = requests.get(href, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        assert f"Invoice {row['data']['num']}" in r.text and row["data"]["amount"] in r.text
    assert int(page.by_id("job-log-count").text) >= 1

    # A link opens the page in the browser too (a new tab).
    links[7].click()
    page.wait(lambda: len(browser.window_handles) == 2, "the link's tab")
    browser.switch_to.window(browser.window_handles[1])
    page.wait(lambda: "Invoice N-007" in browser.find_element(page.By.TAG_NAME, "h1").text, "the smartlink page")
    assert browser.title == "Invoice N-007"
    browser.close()
    browser.switch_to.window(browser.window_handles[0])

    # Copy puts the link on the clipboard.
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": s.ngx.page_url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    links[3].find_element(page.By.XPATH, "following-sibling::button").click()
    page.wait(lambda: page.by_id("links-message").text == "Link copied.", "the copy")
    assert browser.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], (e) => arguments[0](String(e)))") == hrefs[3]

    # The result as CSV, fetched with the key and handed to the browser as a download.
    job_id = page.by_id("job-id").text
    page.by_id("download-csv").click()
    table = list(csv.DictReader(io.StringIO(wait_for_file(browser.downloads / f"{job_id}.csv").decode())))
    assert [r["url"] for r in table] == hrefs and {r["status"] for r in table} == {"succeeded"}
    page.screenshot("links")

    # After a reload the page follows its last job again.
    browser.refresh()
    page.wait_key_accepted()
    page.wait(lambda: len(page.find_all("smartlink")) == 50, "the links again")
    assert page.find("job-status").text == status

    # Readable at 360 px: nothing wider than the screen.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 360, "height": 800, "deviceScaleFactor": 1, "mobile": True})
    width = page.wait(lambda: browser.execute_script("return window.innerWidth") == 360 and 360, "360 px")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    page.screenshot("narrow-360")


NAMES = ["évil\u202etxt.exe", "é" * 128, "é" * 127 + "a", "क्\u200dष.txt", "a\u200bb", "tab\there", "a/b", "a\\b",
         ".", "..", "   ", "line\u2028sep", "para\u2029sep", "nonchar\ufdd0", "plane\U0001fffe", "bom\ufeff",
         "ZWNJ\u200c.txt", "tag\U000e0041", "c1\x85", "del\x7f", "soft\u00adhyphen", "emoji 😀.txt", "a" * 255]


def test_a_name_the_server_refuses_is_refused_on_the_page_and_never_sent(stack, page_for) -> None:
    """The page sent a file whose name the server refuses (400), and its Retry could only fail the
    same way. Now the page refuses it up front, saying why, by the server's own rule."""
    from server.api.uploads import FileNameInvalid, decode_file_name

    s = stack()
    page = start_page(page_for(s))

    def server_takes(name: str) -> bool:
        try:
            decode_file_name(urllib.parse.quote(name, safe=""))
        except FileNameInvalid:
            return False
        return True

    page.driver.execute_script("""
        const dt = new DataTransfer();
        for (const name of arguments[0]) dt.items.add(new File(['x'], name));
        const zone = document.getElementById('drop-zone');
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""",
                               ["évil\u202etxt.exe", "é" * 128, "क्\u200dष.txt"])
    page.wait_rows({"क्\u200dष.txt": "complete"})
    refusal = page.by_id("files-message").text
    assert refusal.startswith("Not added: évil<U+202E>txt.exe: its name has U+202E"), refusal
    assert "the name is 256 bytes of UTF-8, over 255" in refusal, refusal
    assert set(s.manifest(page.batch_id())) == {"क्\u200dष.txt"}

    # The page's rule is the server's, name by name.
    page_takes = page.driver.execute_async_script("""
        const [names, done] = arguments;
        import('/_/upload.js').then((m) => names.map((n) => m.nameProblem(n) === null))
          .then(done, (e) => done(String(e)));""", NAMES)
    assert page_takes == [server_takes(n) for n in NAMES], (NAMES, page_takes)


def test_a_wrong_key_is_refused_in_words_and_nothing_is_uploaded(stack, page_for) -> None:
    s = stack()
    page = page_for(s)
    page.enter_key("not-the-key-at-all")
    page.wait(lambda: "The key was refused" in page.key_message(), "the refusal")
    assert page.find("api-key").get_attribute("aria-invalid") == "true"
    assert not page.find("file-input").is_displayed() and not page.find("generate").is_displayed()
    page.screenshot("refused")
    with sqlite3.connect(s.data_dir / "filedrop.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM batches").fetchone() == (0,)
    uploads = s.data_dir / "uploads"  # holds only the server's own .synced marker
    assert [p.name for p in uploads.iterdir() if not p.name.startswith(".")] == []
    # The same page takes the right key: the refusal was the server's, not the page's.
    start_page(page)


def test_keyboard_alone_enters_the_key_pauses_resumes_and_generates(tmp_path: Path, stack, page_for) -> None:
    from selenium.webdriver.common.keys import Keys

    s = stack(chunk_size="1M")
    big = random_file(tmp_path / "big.bin", 8 * MiB)
    template = tmp_path / "template.json"
    template.write_text(json.dumps(TEMPLATE))
    page = page_for(s)

    page.tab_to(lambda el: el.get_attribute("data-testid") == "api-key", "the key field")
    page.press(API_KEY, Keys.ENTER)
    page.wait_key_accepted()
    # Every visible control has a name a screen reader can say.
    unnamed = page.driver.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter((el) => el.offsetParent !== null)
          .filter((el) => !((el.labels && el.labels.length) || el.getAttribute('aria-label')
                            || el.getAttribute('aria-labelledby') || (el.tagName === 'BUTTON' && el.textContent.trim())))
          .map((el) => el.outerHTML);""")
    assert unnamed == []

    page.throttle_uploads(1 * MiB)
    page.add_files([big, template])  # a native file dialog cannot be driven: the one exception
    page.tab_to(lambda el: el.get_attribute("aria-label") == "Pause big.bin", "the row's pause button")
    page.press(Keys.ENTER)
    page.wait(lambda: page.row("big.bin")["state"] == "paused", "big.bin paused")
    assert page.focused().get_attribute("aria-label") == "Resume big.bin"  # focus stays put
    page.throttle_uploads(None)
    page.press(Keys.SPACE)
    page.wait_rows({"big.bin": "complete", "template.json": "complete"})
    assert page.row("big.bin")["sha256"] == sha256(big)

    # Rows pasted, template chosen by default (its name), started with Enter.
    rows = [{"reference_id": f"k{i}", "data": {"num": f"K-{i}", "amount": "1"}} for i in range(3)]
    page.tab_to(lambda el: el.get_attribute("id") == "data-paste", "the rows field")
    page.press(json.dumps(rows))
    assert page.by_id("data-from-paste").is_selected()
    assert page.find("template-file").get_attribute("value") == page.row("template.json")["idx"]
    page.tab_to(lambda el: el.get_attribute("data-testid") == "generate", "the generate button")
    page.press(Keys.ENTER)
    status = page.wait(lambda: (t := page.find("job-status").text) and t.startswith(TERMINAL) and t,
                       "the job to end", timeout=60)
    assert status.startswith("Completed:") and "3 succeeded" in status, status
    page.wait(lambda: len(page.find_all("smartlink")) == 3, "3 links")
    pasted = [r for r in page.rows() if (r["name"] or "").startswith("pasted-rows-")]
    assert len(pasted) == 1 and pasted[0]["state"] == "complete"
    page.tab_to(lambda el: el.get_attribute("data-testid") == "smartlink", "the first link")
    page.screenshot("keyboard")


def test_a_folder_and_dropped_files_go_up_with_their_paths(tmp_path: Path, stack, page_for) -> None:
    s = stack()
    folder = tmp_path / "reports"
    (folder / "2026").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "2026" / "b.csv").write_text("x,y\n1,2\n")
    page = start_page(page_for(s))

    page.driver.find_element(page.By.ID, "folder-input").send_keys(str(folder))
    # A drop: the browser cannot be dragged onto from outside headless, so the page gets the
    # DragEvent a drop makes, with files built in the page (DataTransfer, as a real drop has).
    page.driver.execute_script("""
        const dt = new DataTransfer();
        dt.items.add(new File(['dropped one'], 'dropped-1.txt', {type: 'text/plain'}));
        dt.items.add(new File([new Uint8Array(300000).fill(7)], 'dropped-2.bin'));
        const zone = document.getElementById('drop-zone');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""")
    rows = page.wait_rows({"reports/a.txt": "complete", "reports/2026/b.csv": "complete",
                           "dropped-1.txt": "complete", "dropped-2.bin": "complete"})
    digests = {r["name"]: r["sha256"] for r in rows}
    assert digests == {
        "reports/a.txt": sha256(folder / "a.txt"), "reports/2026/b.csv": sha256(folder / "2026" / "b.csv"),
        "dropped-1.txt": hashlib.sha256(b"dropped one").hexdigest(),
        "dropped-2.bin": hashlib.sha256(bytes([7]) * 300000).hexdigest(),
    }
    # On the server a file has its own name only (no path: X-File-Name refuses "/").
    assert set(s.manifest(page.batch_id())) == {"a.txt", "b.csv", "dropped-1.txt", "dropped-2.bin"}
    page.screenshot("folder-and-drop")

    # Remove: gone from the page and from the batch.
    page.row_element("dropped-1.txt").find_element(page.By.CSS_SELECTOR, '[data-action="remove"]').click()
    page.wait(lambda: len(page.rows()) == 3, "the row to go")
    page.wait(lambda: "dropped-1.txt" not in s.manifest(page.batch_id()), "the file to leave the batch")
    assert set(s.manifest(page.batch_id())) == {"a.txt", "b.csv", "dropped-2.bin"}


def test_a_folder_dropped_over_the_batchs_file_limit_says_what_was_left_out(tmp_path: Path, stack, page_for) -> None:
    """A dropped folder is walked up to FILEDROP_MAX_FILES_PER_BATCH files; the rest were left out
    without a word. Now the page says how many, naming the setting. A real drop of a real folder:
    Chromium's own drag events (DevTools Input.dispatchDragEvent) with the folder's path."""
    s = stack(max_files_per_batch="3")
    folder = tmp_path / "many"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"f{i}.txt").write_text(f"file {i}\n")
        (folder / "sub" / f"g{i}.txt").write_text(f"sub file {i}\n")
    page = start_page(page_for(s))
    zone = page.by_id("drop-zone")
    rect = page.driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.x, r.y, r.width, r.height]",
                                      zone)
    x, y = rect[0] + rect[2] / 2, rect[1] + rect[3] / 2
    data = {"items": [], "files": [str(folder)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        page.driver.execute_cdp_cmd("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
    rows = page.wait(lambda: len(r := page.rows()) == 3 and all(x["state"] == "complete" for x in r) and r,
                     "3 files of the folder to go up")
    assert all((r["name"] or "").startswith("many/") for r in rows), rows
    message = page.by_id("files-message").text
    assert message == ("Not added: 3 files of what was dropped: a batch holds at most 3 files "
                       "(FILEDROP_MAX_FILES_PER_BATCH)."), message


# Counts what the page reads from and writes to localStorage (the real storage underneath).
STORAGE_COUNTER = """
(() => {
  const seen = window.storageSeen = {reads: 0, readBytes: 0, writes: 0, writeBytes: 0, largestWrite: 0};
  const {getItem, setItem} = Storage.prototype;
  Storage.prototype.getItem = function (key) {
    const value = getItem.call(this, key);
    seen.reads++;
    seen.readBytes += (value || '').length;
    return value;
  };
  Storage.prototype.setItem = function (key, value) {
    const text = String(value);
    seen.writes++;
    seen.writeBytes += text.length;
    seen.largestWrite = Math.max(seen.largestWrite, text.length);
    return setItem.call(this, key, text);
  };
})();"""


def test_a_folder_of_many_small_files_costs_the_page_the_same_for_each_file(tmp_path: Path, stack, page_for,
                                                                            browser) -> None:
    """A folder of documents is the most common drop. Each file cost the page more than the one
    before: the whole localStorage record (every file's) was read and written again for each
    file, and Generate's two lists were rebuilt with every complete file's option at each file
    complete, so n files cost n x n (1,000 tiny files took 69 s, 2,000 did not end in 300 s).
    Counted, not timed: what the page reads and writes in localStorage and the options it puts
    into or takes out of the lists grow with the files, not with their square; and a fresh file
    costs one request, its one chunk, whose 201 carries the SHA-256 the row shows: no info asked,
    before or after (it was asked after, only for the SHA-256)."""
    n = 150
    s = stack()
    folder = tmp_path / "docs"
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"doc-{i:03d}.txt"
        path.write_text(f"document {i}\n" * (1 + i % 7))
        paths.append(path)
    hook = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": STORAGE_COUNTER})
    try:
        page = start_page(page_for(s))
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": hook["identifier"]})
    page.driver.execute_script("""
        window.optionsMoved = 0;
        const observer = new MutationObserver((records) => {
          for (const r of records) window.optionsMoved += r.addedNodes.length + r.removedNodes.length;
        });
        for (const id of ['template-file', 'data-file']) observer.observe(document.getElementById(id), {childList: true});""")
    before = page.driver.execute_script("return {...window.storageSeen}")

    page.driver.find_element(page.By.ID, "folder-input").send_keys(str(folder))
    rows = page.wait_rows({f"docs/{p.name}": "complete" for p in paths}, timeout=120)

    assert {r["name"]: r["sha256"] for r in rows} == {f"docs/{p.name}": sha256(p) for p in paths}
    from selenium.webdriver.support.ui import Select

    assert sorted(o.text for o in Select(page.find("template-file")).options) == sorted(p.name for p in paths)
    seen = page.driver.execute_script("return window.storageSeen")
    moved = page.driver.execute_script("return window.optionsMoved")
    read = seen["readBytes"] - before["readBytes"]
    written = seen["writeBytes"] - before["writeBytes"]
    # Each file's own record and the small head: a few hundred bytes a file (the whole record
    # every time was some 10 kB a file here, and more with every file).
    assert seen["largestWrite"] < 1000, seen
    assert read + written < 1000 * n, (read, written)
    assert seen["writes"] - before["writes"] <= 4 * n, seen
    # Each complete file's option put into each list once (rebuilt lists moved n x n).
    assert 2 * n <= moved <= 2 * n + 10, moved
    batch_id = page.batch_id()
    page.screenshot("many-files")
    s.ngx.stop()  # its access log is buffered
    log = (s.ngx.prefix / "logs" / "access.log").read_text()
    file_requests = re.findall(rf'"(GET|POST) /api/v1/upload/{batch_id}/(\d+) HTTP/1\.1" (\d+) ', log)
    kinds = {(method, status) for method, _idx, status in file_requests}
    assert kinds == {("POST", "201")}, kinds
    assert sorted(int(idx) for _method, idx, _status in file_requests) == list(range(n)), file_requests


def test_a_batch_dropped_under_the_page_is_forgotten_and_its_unfinished_files_go_up_again(
        tmp_path: Path, stack, page_for) -> None:
    """The page's batch dropped (or expired) while the page is open: each file it sent after
    that stopped with "batch … was dropped" and a Retry that could only fail the same way; now
    the batch is forgotten as after a reload, and the file goes up in a new batch."""
    s = stack()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("first\n")
    second.write_text("second\n")
    page = start_page(page_for(s))
    page.add_files([first])
    page.wait_rows({"first.txt": "complete"})
    old = page.batch_id()
    r = subprocess.run([sys.executable, "-m", "server", "drop", old], cwd=REPO, env=s.app.env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    page.add_files([second])
    rows = page.wait_rows({"second.txt": "complete"})
    assert rows[0]["sha256"] == sha256(second)
    new = page.batch_id()
    assert new != old and re.fullmatch(r"[0-9a-f]{32}", new)
    assert s.api("GET", f"/api/v1/upload/{new}/0").json()["sha256"] == sha256(second)
    message = page.by_id("files-message").text
    assert message == ("The batch is gone from the server (dropped or expired), or is another key's: the file not yet "
                       "complete goes up again in a new batch. Gone with it, add again if needed: first.txt.")
    page.screenshot("batch-gone")


def test_two_tabs_on_one_batch_never_give_two_files_the_same_index(tmp_path: Path, stack, page_for,
                                                                      browser) -> None:
    """Two tabs of the page share localStorage, so both go on with the same batch. Each took the
    next fileIdx from what it had read when it opened: a file added in one tab and then another in
    the other got the same index, and the second replaced the first on the server (a whole file
    replaces a complete one) while the first tab still showed it complete."""
    s = stack()
    a, b, c = (tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt")
    for p in (a, b, c):
        p.write_text(f"the file {p.name}\n" * 10)
    first = start_page(page_for(s))
    first.add_files([a])
    first.wait_rows({"a.txt": "complete"})
    tab1 = browser.current_window_handle
    browser.switch_to.new_window("tab")  # a tab of its own: no sessionStorage, the same localStorage
    second = start_page(DropPage(browser, s.ngx.page_url, first.test_name + "-tab2").open())
    second.wait_rows({"a.txt": "complete"})  # the remembered batch, from the server
    assert second.batch_id() == first.batch_id()
    tab2 = browser.current_window_handle

    browser.switch_to.window(tab1)
    first.add_files([b])
    first.wait_rows({"a.txt": "complete", "b.txt": "complete"})
    browser.switch_to.window(tab2)
    second.add_files([c])
    second.wait_rows({"a.txt": "complete", "c.txt": "complete"})

    manifest = s.manifest(first.batch_id())
    assert {n: f["sha256"] for n, f in manifest.items()} == {p.name: sha256(p) for p in (a, b, c)}, manifest
    assert len({f["fileIdx"] for f in manifest.values()}) == 3


def test_a_forgotten_key_is_used_for_nothing_more(tmp_path: Path, stack, page_for) -> None:
    """"Forget the key" says the key is forgotten in this tab; the page went on sending it with
    every button still there (Generate started a job, Remove removed a file, the CSV downloaded)
    for whoever used the tab next. Now nothing is sent without a key entered again."""
    s = stack()
    template = tmp_path / "template.json"
    template.write_text(json.dumps(TEMPLATE))
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"reference_id": "r1", "data": {"num": "1", "amount": "2"}}]))
    page = start_page(page_for(s))
    page.add_files([template, data])
    page.wait_rows({"template.json": "complete", "rows.json": "complete"})
    batch_id = page.batch_id()

    page.by_id("key-forget").click()
    page.wait(lambda: page.key_message() == "The key is forgotten in this tab.", "the key forgotten")
    page.find("generate").click()
    message = page.by_id("generate-message")
    said = page.wait(lambda: "error" in (message.get_attribute("class") or "") and message.text, "the refusal")
    assert "key" in said, said
    page.row_element("rows.json").find_element(page.By.CSS_SELECTOR, '[data-action="remove"]').click()
    page.wait(lambda: "could not be removed" in page.by_id("files-message").text, "the removal refused")
    assert s.api("GET", f"/api/batch/{batch_id}/jobs").json()["jobs"] == [], "a job was started"
    assert set(s.manifest(batch_id)) == {"template.json", "rows.json"}
    assert page.find("api-key").get_attribute("value") == ""


def _slow_job_files(tmp_path: Path, rows: int) -> tuple[Path, Path]:
    """A template whose rows each take a while, and ``rows`` rows for it."""
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"body": "{% for i in range(100000) %}{% endfor %}{{ data.n }}"}))
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"reference_id": f"r{i}", "suffix": f"{i:04d}5f1ea1e9b982f900468a",
                                 "data": {"n": i}} for i in range(rows)]))
    return template, data


def test_a_job_is_followed_again_once_the_key_is_entered_again(tmp_path: Path, stack, page_for) -> None:
    """The key forgotten while the page follows a job: the status polls stop and say why; the
    key entered again follows the same job again (it stayed stopped until a reload)."""
    s = stack()
    template, data = _slow_job_files(tmp_path, 5000)
    page = start_page(page_for(s))
    page.add_files([template, data])
    page.wait_rows({"template.json": "complete", "rows.json": "complete"})
    page.find("generate").click()
    status = page.find("job-status")
    page.wait(lambda: status.get_attribute("data-status") in ("Queued", "In progress"), "the job followed")
    job_id = page.by_id("job-id").text

    page.by_id("key-forget").click()
    message = page.by_id("generate-message")
    said = page.wait(lambda: "error" in (message.get_attribute("class") or "") and message.text, "the polls stopped")
    assert "key" in said, said

    page.enter_key(API_KEY)
    page.wait_key_accepted()
    r = s.api("POST", f"/api/batch/{page.batch_id()}/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "Cancelled", r.text
    page.wait(lambda: status.get_attribute("data-status") == "Cancelled", "the job followed again to its end")
    assert page.by_id("job-id").text == job_id
    page.wait(lambda: message.text == "", "the error gone")


def test_a_file_the_server_keeps_under_a_job_stays_on_the_page(tmp_path: Path, stack, page_for) -> None:
    """Remove while a job started from the batch runs: the server refuses (409, its rows may read
    the file) and the row stays, saying why; once the job ended, remove takes it off both."""
    s = stack()
    template, data = _slow_job_files(tmp_path, 2000)
    page = start_page(page_for(s))
    page.add_files([template, data])
    page.wait_rows({"template.json": "complete", "rows.json": "complete"})
    batch_id, idx = page.batch_id(), {r["name"]: r["idx"] for r in page.rows()}
    r = s.api("POST", f"/api/v1/upload/{batch_id}/execute/SmartLinks.Generate", headers={"X-Batch-No-Drop": "true"},
              json={"params": {"template": idx["template.json"], "data": idx["rows.json"]}})
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    page.row_element("rows.json").find_element(page.By.CSS_SELECTOR, '[data-action="remove"]').click()
    message = page.wait(lambda: page.by_id("files-message").text, "the refusal")
    assert message.startswith("rows.json could not be removed on the server:") and job in message, message
    assert s.api("GET", f"/api/batch/{batch_id}/{job}/status").json()["status"] not in TERMINAL  # still
    assert page.row("rows.json")["state"] == "complete"
    assert s.api("GET", f"/api/v1/upload/{batch_id}/{idx['rows.json']}").status_code == 200

    assert s.api("POST", f"/api/batch/{batch_id}/{job}/cancel").json()["status"] == "Cancelled"
    page.row_element("rows.json").find_element(page.By.CSS_SELECTOR, '[data-action="remove"]').click()
    page.wait_rows({"template.json": "complete"})
    assert s.api("GET", f"/api/v1/upload/{batch_id}/{idx['rows.json']}").status_code == 404


def test_a_key_revoked_mid_upload_pauses_the_upload_and_says_so(tmp_path: Path, stack, page_for) -> None:
    s = stack(chunk_size="1M")

    def keys(*argv: str) -> str:
        env = {**s.app.env, "FILEDROP_API_KEYS": ""}
        r = subprocess.run([sys.executable, "-m", "server", "keys", *argv], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    key = keys("create", "browser")
    big = random_file(tmp_path / "big.bin", 64 * MiB)  # 16 s at 4 MiB/s: refused long before the end
    page = page_for(s)
    page.enter_key(key)
    page.wait_key_accepted()
    page.throttle_uploads(4 * MiB)
    page.add_files([big])
    page.wait(lambda: [r["state"] for r in page.rows()] == ["uploading"], "the upload to start")
    keys("revoke", "browser")  # the server trusts a key lookup for up to 5 s
    # The chunk uploads (XMLHttpRequest) get the 401 back, no login dialog: every upload pauses.
    row = page.wait(lambda: (r := page.row("big.bin"))["state"] == "paused" and r, "the upload to pause",
                    timeout=30)
    assert "the key was refused" in (row["note"] or "")
    assert "The key was refused" in page.key_message()
    page.screenshot("revoked")


def evil_link(s: Stack, body: str) -> str:
    """A smartlink (tenant's HTML and script) published through the API; its URL."""
    r = s.api("POST", "/api/batch/evil/start", files={
        "document_file": (None, json.dumps({"body": body})),
        "data": (None, json.dumps([{"reference_id": "x", "suffix": "abcdefghijklmnopqrs"}]))})
    assert r.status_code == 202, r.text
    status_url = f"/api/batch/evil/{r.json()['job_id']}/status"
    final = wait_until(lambda: (st := s.api("GET", status_url).json()["status"]) in TERMINAL and st,
                       timeout=30, what="the smartlink published")
    assert final == "Completed", final
    return f"{s.url}/evil/x.abcdefghijklmnopqrs.html"


def test_a_smartlink_opened_in_the_pages_tab_cannot_read_its_key(stack, page_for, browser) -> None:
    """The page keeps the key in its tab's sessionStorage. A smartlink opened in that same tab
    (pasted into the address bar after using the page) runs on another origin (the public port;
    the page has a port of its own), so the storage it sees is not the page's."""
    s = stack()
    link = evil_link(s, '<p id="seen"></p><script>document.getElementById("seen").textContent = '
                        'JSON.stringify(Object.entries(sessionStorage)) + JSON.stringify(Object.entries(localStorage));'
                        '</script>')
    page = start_page(page_for(s))
    held = browser.execute_script("return JSON.stringify(Object.entries(sessionStorage))")
    assert API_KEY in held  # the page did keep it: what the link must not see
    browser.get(link)
    seen = page.wait(lambda: (el := browser.find_elements(page.By.ID, "seen")) and el[0].text, "the link's script")
    assert API_KEY not in seen and seen == "[][]", seen
    browser.get(s.url + "/")  # the public port's `/` is the page again, on its own origin
    page.wait(lambda: browser.current_url == s.ngx.page_url + "/", "the redirect to the page's port")
    page.wait_key_accepted()  # this tab's page origin still holds the key


def test_a_smartlink_cannot_reach_into_a_drop_page_it_opens(stack, page_for, browser) -> None:
    """A smartlink that opens the drop page (hoping to read the key a user types there) gets no
    handle on it: the page is on another origin, and it is sent with
    Cross-Origin-Opener-Policy: same-origin, so it opens in a browsing context group of its own."""
    s = stack()
    template = {"body": '<button id="open">open</button><script>document.getElementById("open").onclick = '
                        '() => { window.dropPage = window.open("/", "drop"); };</script>'}
    r = s.api("POST", "/api/batch/evil/start", files={
        "document_file": (None, json.dumps(template)),
        "data": (None, json.dumps([{"reference_id": "x", "suffix": "abcdefghijklmnopqrs"}]))})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    page = page_for(s)  # a window on the page's origin, for its helpers; the link opens in it

    def ended() -> bool:
        return s.api("GET", f"/api/batch/evil/{job_id}/status").json()["status"] in TERMINAL

    page.wait(ended, "the smartlink published")
    browser.get(f"{s.url}/evil/x.abcdefghijklmnopqrs.html")
    opener = browser.current_window_handle
    browser.find_element(page.By.ID, "open").click()  # a click: no popup blocker in the way
    page.wait(lambda: len(browser.window_handles) == 2, "the drop page's window")
    browser.switch_to.window([h for h in browser.window_handles if h != opener][0])
    page.wait(lambda: browser.find_elements(page.By.ID, "api-key"), "the drop page loaded")
    browser.switch_to.window(opener)
    reach = browser.execute_script(
        "try { return window.dropPage.closed ? 'closed' : 'open: ' + window.dropPage.document.title; }"
        " catch (e) { return 'refused: ' + e.name; }")
    assert reach == "closed" or reach.startswith("refused"), reach


def test_a_smartlinks_request_to_the_api_gets_no_login_challenge(stack, page_for, browser) -> None:
    """The API shares the public port (the origin) with the smartlinks. Had a browser ever been
    challenged there, the login typed into its dialog would be sent again with a tenant's script's
    requests; Chromium's requests (a smartlink's fetch here) are answered 401 without one."""
    s = stack()
    link = evil_link(s, '<p id="seen"></p><script>fetch("/api/batch/evil/jobs").then((r) => {'
                        'document.getElementById("seen").textContent = r.status + " " + '
                        'r.headers.get("WWW-Authenticate"); });</script>')
    page = page_for(s)
    browser.get(link)
    seen = page.wait(lambda: (el := browser.find_elements(page.By.ID, "seen")) and el[0].text, "the link's script")
    assert seen == "401 null", seen
