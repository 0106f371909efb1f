"""``filedrop drop --smartlinks --force`` beside a live server whose workers are publishing a
slow job, with NGINX serving the folder: once the command exits 0 the folder is gone and stays
gone, every link of the batch is 404 at NGINX, and the job's endpoints are 404 too."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from server.config import Settings
from tests.support.disk_state import run_cli, table
from tests.support.jobs import rows
from tests.support.live import AUTH, get, start
from tests.support.waiting import wait_until
from tests.test_job_workers import SLOW, db, workers


def heartbeats(srv) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with db(srv) as c:
        return dict(c.execute("SELECT worker_id, seen_at FROM job_workers"))


@pytest.mark.slow
def test_drop_force_during_a_slow_job_leaves_nothing_published(server_factory, nginx_factory) -> None:
    srv = server_factory(workers="2")
    settings = Settings.from_env(srv.env)
    ngx = nginx_factory(settings, app_port=srv.port)
    jid = start(srv, "dropme", SLOW, rows(600)).json()["job_id"]
    wait_until(lambda: get(srv, f"/api/batch/dropme/{jid}/status")["succeededCount"] >= 20, timeout=60,
               what="some links published")
    folder = Path(srv.env["FILEDROP_DATA_DIR"]) / "smartlinks" / "dropme"
    links = [f"/dropme/{p.name}" for p in folder.iterdir() if not p.name.startswith(".")]
    assert links and all(ngx.fetch("GET", link).status == 200 for link in links[:5])

    r = run_cli(settings, "drop", "--smartlinks", "dropme", "--force", "--cancel-wait", "3s")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "marked Cancelled" not in r.stderr  # a worker stopped it
    assert table(r.stdout)["drop-smartlinks"][0][:1] == ["dropme"]
    assert not folder.exists()
    # At once: NGINX keeps no descriptor of a file between requests.
    assert [link for link in links if ngx.fetch("GET", link).status != 404] == []
    for what in ("status", "log", "result", "cancel"):
        assert requests.get(f"{srv.url}/api/batch/dropme/{jid}/{what}", headers=AUTH, timeout=30).status_code == 404

    # It stays gone: let every worker go round twice (two heartbeats each), then look again.
    seen = heartbeats(srv)
    wait_until(lambda: len(workers(srv)) == 2 and all(heartbeats(srv).get(w, "") > seen.get(w, "") for w in
                                                      workers(srv)), timeout=30, what="a heartbeat of each worker")
    seen = heartbeats(srv)
    wait_until(lambda: all(heartbeats(srv).get(w, "") > seen.get(w, "") for w in workers(srv)), timeout=30,
               what="another heartbeat of each worker")
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if "dropme" in p.name]  # nor a renamed leftover
    assert all(ngx.fetch("GET", link).status == 404 for link in links)
