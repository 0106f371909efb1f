"""Server state is readable by its user only (data dir and directories 0700; database, uploaded
files, smartlinks and NGINX's logs 0600) whatever the umask it was started under, and NGINX,
running as that same user, still serves the smartlinks: as root over root's files, as root over
another user's files, and as an ordinary user (tests/test_nginx_run.py::test_nginx_needs_no_root)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from server import nginx as ngx
from server.config import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.jobs import SEED_ROWS, SEED_TEMPLATE
from tests.support.nginx import app_behind_nginx, fetch, nginx_binary, wait_served
from tests.support.waiting import free_port, wait_until


def loose_modes(root: Path) -> list[str]:
    """Everything under ``root`` that its group or others could read, with its mode."""
    out = []
    for d, dirs, files in os.walk(root):
        for p in [Path(d), *(Path(d) / x for x in dirs + files)]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            if mode & 0o077:
                out.append(f"{p.relative_to(root)} {oct(mode)}")
    return out


def test_state_made_under_umask_022_is_private_and_nginx_serves_it(server_factory, nginx_factory,
                                                                    tmp_path: Path) -> None:
    old = os.umask(0o022)  # what a shell gives the server: the server must not depend on it
    data = tmp_path / "srv"
    try:
        srv, proxy = app_behind_nginx(server_factory, nginx_factory, data, API_KEY)
    finally:
        os.umask(old)
    base = proxy.url
    # An upload in two chunks (assembled) and a smartlink job, all through NGINX.
    batch = requests.post(f"{base}/api/v1/upload", headers=AUTH, timeout=10).json()["batchId"]
    for i, part in enumerate((b"a" * 10, b"b" * 5)):
        r = requests.post(f"{base}/api/v1/upload/{batch}/0", data=part, timeout=10, headers={
            **AUTH, "X-File-Name": "f.bin", "X-File-Size": "15", "X-Upload-Type": "chunked",
            "X-Upload-Chunk-Index": str(i), "X-Upload-Chunk-Count": "2"})
        assert r.status_code in (201, 202), r.text
    files = {"document_file": ("t.json", json.dumps(SEED_TEMPLATE), "application/json"),
             "data": (None, json.dumps(SEED_ROWS))}
    r = requests.post(f"{base}/api/batch/private/start", headers=AUTH, files=files, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    wait_until(lambda: requests.get(f"{base}/api/batch/private/{job}/status", headers=AUTH, timeout=10)
               .json()["status"] == "Completed", timeout=60, what="the job to complete")
    wait_until(lambda: requests.get(f"{base}/api/v1/upload/{batch}/0", headers=AUTH, timeout=10).json()
               .get("complete"), timeout=30, what="the chunked file to be assembled")
    row = SEED_ROWS[0]
    page = fetch(proxy.port, "GET", f"/private/{row['reference_id']}.{row['suffix']}.html")
    assert page.status == 200 and b"240 000 009 425" in page.body

    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    links = data / "smartlinks" / "private"
    assert any(links.glob("*.html")) and any((data / "uploads").rglob("*.data"))
    assert (data / "filedrop.sqlite3").exists()
    assert loose_modes(data) == []
    logs = proxy.prefix / "logs"
    wait_until(lambda: f"/private/{row['reference_id']}".encode() in (logs / "access.log").read_bytes(),
               timeout=10, what="the access log to be flushed")
    for log in ("access.log", "error.log"):
        assert stat.S_IMODE((logs / log).stat().st_mode) == 0o600, log


def test_root_nginx_serves_private_links_owned_by_another_user(tmp_path: Path) -> None:
    """Started as root over a data dir another user owns (a service account), NGINX's workers run
    as that user (``user`` directive) and so can read its 0700/0600 tree; nobody else can."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start NGINX over another user's files")
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="filedrop-owned-"))  # 0700: nobody must be able to reach var/
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    proc = None
    try:
        data = base / "var"
        link = data / "smartlinks" / "b1" / "ref.0123456789abcdef.html"
        link.parent.mkdir(parents=True, mode=0o700)
        link.write_bytes(b"<p>owned</p>")
        for d, dirs, files in os.walk(data):
            for p in [d, *(os.path.join(d, x) for x in dirs + files)]:
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
                os.chmod(p, 0o700 if os.path.isdir(p) else 0o600)
        port = free_port()
        conf = ngx.render(Settings(data_dir=data, app_port=free_port()), base / "p", listen=f"127.0.0.1:{port}")
        assert f"user {nobody.pw_name} " in conf.read_text()
        proc = subprocess.Popen([nginx_binary(), "-p", str(base / "p"), "-c", str(conf), "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_served(proc, port, "/b1/ref.0123456789abcdef.html", base / "p", "nginx serving another user's files")
        assert fetch(port, "GET", "/b1/ref.0123456789abcdef.html").body == b"<p>owned</p>"
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                                 timeout=10).stdout.split()
        assert workers
        for w in workers:
            uid_line = next(x for x in Path(f"/proc/{w}/status").read_text().splitlines() if x.startswith("Uid:"))
            assert set(uid_line.split()[1:]) == {str(nobody.pw_uid)}
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
