"""scripts/drop-batch and scripts/cleanup from a checkout, scripts/run's data dir, and the progress
bar on a terminal."""

from __future__ import annotations

import os
import pty
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.config import Settings
from server.db.models import BatchFile
from tests.support.disk_state import (
    HOUR,
    FileSpec,
    add_batch,
    add_job,
    admin_env,
    batch_state,
    count,
    table,
)
from tests.support.server import REPO
from tests.support.waiting import free_port


def test_wrappers_run_from_any_directory_with_relative_data_dir(settings: Settings, tmp_path: Path) -> None:
    pk, _ = add_batch(settings, "by-script", [FileSpec()])
    add_batch(settings, "stale", [FileSpec()], idle=25 * HOUR)
    env = admin_env(settings)
    env["FILEDROP_DATA_DIR"] = os.path.relpath(settings.data_dir, tmp_path)  # relative to the caller
    run = lambda *a: subprocess.run(a, cwd=tmp_path, env=env, capture_output=True, text=True,  # noqa: E731
                                    timeout=60)
    r = run(str(REPO / "scripts" / "drop-batch"), "by-script")
    assert r.returncode == 0, r.stderr
    assert table(r.stdout)["drop-batch"][0][:3] == ["by-script", "1000", "removed"]
    assert batch_state(settings, "by-script") == "dropped" and count(settings, BatchFile, BatchFile.batch_pk == pk) == 0
    r = run(str(REPO / "scripts" / "drop-batch"), "--smartlinks", "nothing-here")
    assert r.returncode == 1 and "no smartlink batch" in r.stderr
    r = run(str(REPO / "scripts" / "cleanup"), "--dry-run")
    assert r.returncode == 0 and [row[0] for row in table(r.stdout)["expired-batch"]] == ["stale"]
    r = run(str(REPO / "scripts" / "cleanup"))
    assert r.returncode == 0 and batch_state(settings, "stale") is None
    assert "alembic" not in r.stderr  # only admin steps are logged


def test_wrappers_find_their_checkout_with_cdpath_exported(settings: Settings) -> None:
    """With CDPATH exported (some shell profiles do), `cd scripts/..` inside scripts/filedrop
    printed the directory it found, so the checkout's path it captured was that path twice, on
    two lines: no .venv there, scripts/setup not found, exit 2 from `scripts/filedrop ...` called
    by a relative path."""
    add_batch(settings, "stale", [FileSpec()], idle=25 * HOUR)
    env = {**admin_env(settings), "CDPATH": "."}
    r = subprocess.run(["scripts/filedrop", "cleanup", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [row[0] for row in table(r.stdout)["expired-batch"]] == ["stale"]


def test_run_reads_a_relative_data_dir_from_the_callers_directory(tmp_path: Path) -> None:
    """scripts/run, like the admin wrappers, takes a relative FILEDROP_DATA_DIR from where it is
    called, not from the checkout it changes into: its set-up migrates that directory's database
    and keeps the dev key there. A busy port stops it before anything starts."""
    rel = f"var-{tmp_path.name}"  # made in the checkout if it were read from there
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    port = free_port()
    env.update(FILEDROP_DATA_DIR=rel, FILEDROP_HTTP_PORT=str(port), FILEDROP_PAGE_PORT=str(free_port()),
               FILEDROP_APP_PORT=str(free_port()))
    try:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", port))
            holder.listen()
            r = subprocess.run([str(REPO / "scripts" / "run")], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=180)
        assert r.returncode == 1 and f"127.0.0.1:{port}: the port is in use" in r.stderr, r.stderr
        assert not (REPO / rel).exists()
        data = tmp_path / rel
        assert (data / "filedrop.sqlite3").is_file() and (data / "dev-api-key").is_file()
    finally:
        shutil.rmtree(REPO / rel, ignore_errors=True)


def on_terminal(settings: Settings, *args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns (status, terminal text, stdout)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "server", *args], cwd=REPO, env=admin_env(settings),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # read the terminal until the process closes it
        try:
            block = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not block:
            break
        seen += block
    os.close(master)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode is not None
    return proc.returncode, seen.decode(errors="replace"), stdout.decode()


def test_progress_bar_only_on_a_terminal(settings: Settings) -> None:
    for i in range(25):
        add_batch(settings, f"old-{i}", [FileSpec(data=b"x" * 10)], idle=25 * HOUR)
    rc, terminal, out = on_terminal(settings, "cleanup")
    assert rc == 0
    assert "[" + "#" * 30 + "] 25/25 expired-batch" in terminal
    assert "removed expired-batch old-" in terminal  # log lines are printed above the bar
    assert "\x1b[K" in terminal
    assert len(table(out)["expired-batch"]) == 25 and "\x1b" not in out  # the table stays clean
    # Not a terminal: no bar at all.
    for i in range(3):
        add_batch(settings, f"again-{i}", [FileSpec()], idle=25 * HOUR)
    r = subprocess.run([sys.executable, "-m", "server", "cleanup"], cwd=REPO, env=admin_env(settings),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "\x1b" not in r.stderr and "####" not in r.stderr


def test_drop_smartlinks_shows_files_removed_on_a_terminal(settings: Settings) -> None:
    add_job(settings, "a" * 32, "many", finished_ago=60, rows=[(f"r{i}", "s" * 16) for i in range(250)])
    rc, terminal, out = on_terminal(settings, "drop", "--smartlinks", "many")
    assert rc == 0
    assert "] 100/250 drop-smartlinks many" in terminal and "] 250/250 drop-smartlinks many" in terminal
    assert table(out)["drop-smartlinks"][0][:3] == ["many", str(sum(len(f"<p>r{i}</p>") for i in range(250))),
                                                    "removed"]
    assert settings.smartlink_root is not None and not (settings.smartlink_root / "many").exists()
