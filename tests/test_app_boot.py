"""The app refuses an unmigrated database, checks credentials, and answers errors as JSON."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.app import create_app
from server.config import Settings
from tests.conftest import API_KEY
from tests.support.server import REPO, ServerProcess, server_env
from tests.support.waiting import free_port


def test_serve_refuses_unmigrated_database(tmp_path: Path) -> None:
    env = server_env(tmp_path / "fresh", API_KEY)
    r = subprocess.run([sys.executable, "-m", "server", "serve"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "filedrop migrate" in r.stderr


async def test_app_context_refuses_unmigrated_database(tmp_path: Path) -> None:
    from aiohttp import web
    runner = web.AppRunner(create_app(Settings(data_dir=tmp_path / "x", api_keys=(API_KEY,))))
    with pytest.raises(RuntimeError, match="filedrop migrate"):
        await runner.setup()
    await runner.cleanup()


async def test_no_key_is_401_with_empty_body(client) -> None:
    r = await client.get("/api/v1/upload/whatever")
    assert r.status == 401
    assert await r.read() == b""
    assert r.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize("headers", [
    {"X-API-Key": API_KEY},
    {"X-Authentication-Token": API_KEY},
    {"Authorization": "Basic " + base64.b64encode(f"anyone:{API_KEY}".encode()).decode()},
])
async def test_each_credential_form_is_accepted(client, headers) -> None:
    r = await client.get("/api/v1/no-such-route", headers=headers)
    assert r.status == 404
    body = await r.json()
    assert body["entity-type"] == "exception" and body["status"] == 404 and body["code"]


async def test_wrong_key_is_401(client) -> None:
    r = await client.get("/api/v1/upload/x", headers={"X-API-Key": "nope"})
    assert r.status == 401


async def test_created_key_works_and_revoked_key_does_not(client, settings) -> None:
    from server.keys import KEYSTORE
    key = await client.app[KEYSTORE].create("alice")
    r = await client.get("/api/v1/no-such-route", headers={"X-API-Key": key})
    assert r.status == 404


async def test_probes_need_no_key(client) -> None:
    r = await client.get("/nuxeo/json/cmis")
    assert (await r.json())["default"]["productVersion"]
    r = await client.get("/nuxeo/runningstatus")
    assert r.status == 200


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    env = server_env(tmp_path / "k", API_KEY)
    run = lambda *a: subprocess.run([sys.executable, "-m", "server", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    unmigrated = run("keys", "list")
    assert unmigrated.returncode == 2 and "filedrop migrate" in unmigrated.stderr
    assert "Traceback" not in unmigrated.stderr
    assert run("migrate").returncode == 0
    created = run("keys", "create", "bob")
    assert created.returncode == 0 and created.stdout.strip().startswith("fd_")
    listed = run("keys", "list")
    assert "bob\tactive" in listed.stdout
    assert run("keys", "revoke", "bob").returncode == 0
    assert "bob\trevoked" in run("keys", "list").stdout
    assert run("keys", "revoke", "bob").returncode == 1


def test_readme_documents_every_setting() -> None:
    from server.config import SETTINGS_HELP
    readme = (REPO / "README.md").read_text()
    missing = [n for n in SETTINGS_HELP if f"FILEDROP_{n.upper()}" not in readme]
    assert not missing, f"README lacks {missing}"
    import dataclasses
    fields = {f.name for f in dataclasses.fields(Settings)} - {"extra"}
    assert fields == set(SETTINGS_HELP), "SETTINGS_HELP and Settings differ"


def test_domain_packages_do_not_import_aiohttp_web() -> None:
    offenders = []
    for pkg in ("uploads", "jobs"):
        for f in (REPO / "server" / pkg).rglob("*.py"):
            text = f.read_text()
            if re.search(r"^\s*(from aiohttp import .*\bweb\b|import aiohttp\.web|from aiohttp\.web)", text, re.M):
                offenders.append(str(f.relative_to(REPO)))
    assert not offenders


def test_the_long_running_processes_check_the_schema_without_alembic(tmp_path: Path) -> None:
    """The server and its workers check the schema's revision without loading Alembic (10.5 MB
    of RSS each); the revision they expect is the one Alembic computes from the migrations, and
    it is what a migrated database is at."""
    from server.db.migrate import head_revisions, upgrade
    from server.db.revision import SCHEMA_HEADS, check_at_head, current_revisions

    assert SCHEMA_HEADS == head_revisions(tmp_path / "unused"), "name the new migration in SCHEMA_HEADS"
    db = tmp_path / "filedrop.sqlite3"
    upgrade(db)
    assert current_revisions(db) == SCHEMA_HEADS
    check_at_head(db)
    code = ("import sys, pathlib, server.app, server.cli, server.jobs.worker, server.jobs.child; "
            "from server.db.revision import check_at_head; check_at_head(pathlib.Path(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako', 'pygments')))")
    r = subprocess.run([sys.executable, "-c", code, str(db)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("name,value", [("WORKERS", "-1"), ("APP_PORT", "70000"),
                                        ("MAX_FILES_PER_BATCH", "-5"), ("MAX_NUMBER_DIGITS", "639"), ("RENDER_MEMORY", "1M"), ("RENDER_TIMEOUT", "0"),
                                        ("MAX_CHUNK_SIZE", "-1"), ("MAX_CHUNK_SIZE", "0"), ("BATCH_TTL", "soon"),
                                        ("SMTP_FROM", "me@example.com\nBcc: x@example.com"), ("SMTP_FROM", "me@example.com\n"),
                                        ("SMTP_FROM", "nobody"), ("SMTP_FROM", "")])
def test_out_of_range_setting_is_refused_naming_it(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"FILEDROP_{name}"):
        Settings.from_env({f"FILEDROP_{name}": value})


@pytest.mark.parametrize(("name", "value", "says"), [
    ("PUBLIC_URL", "foo", "'foo' is not an http(s) URL"),
    ("PUBLIC_URL", "links.example.com", "'links.example.com' is not an http(s) URL"),
    ("PUBLIC_URL", "ftp://links.example.com", "'ftp://links.example.com' is not an http(s) URL"),
    ("PUBLIC_URL", "https://links.example.com:99999", "'https://links.example.com:99999' is not an http(s)"),
    ("PUBLIC_URL", "https://links.example.com/?x=1", "'https://links.example.com/?x=1' is not an http(s)"),
    ("FETCH_ALLOW", "127.0.0.1,10.0.0.0/33", "'10.0.0.0/33' is not an IP address or network"),
    ("FETCH_ALLOW", "10.0.0.300", "'10.0.0.300' is not an IP address or network"),
    ("FETCH_ALLOW", "fd00::/129", "'fd00::/129' is not an IP address or network"),
    ("FETCH_ALLOW", "assets example.com", "'assets example.com' is not a host name"),
])
def test_a_url_or_allow_list_that_cannot_work_is_refused(name: str, value: str, says: str) -> None:
    """Taken as they came: a public URL without scheme and host made every result link and signed
    URL a broken one; a mistyped network in the allow list was kept as a host name that no
    fetch matches, so the fetches it was meant to let through were refused as internal."""
    with pytest.raises(ValueError, match=re.escape(f"FILEDROP_{name}: {says}")):
        Settings.from_env({f"FILEDROP_{name}": value})


def test_a_public_url_and_allow_list_as_documented_are_taken() -> None:
    s = Settings.from_env({"FILEDROP_PUBLIC_URL": " https://links.example.com/filedrop/ ",
                           "FILEDROP_FETCH_ALLOW": "10.0.0.0/8, fd00::/8, 192.168.1.10, assets.internal, cafe"})
    assert s.public_url == "https://links.example.com/filedrop/"
    assert s.fetch_allow == ("10.0.0.0/8", "fd00::/8", "192.168.1.10", "assets.internal", "cafe")
    assert Settings.from_env({"FILEDROP_PUBLIC_URL": "http://127.0.0.1:8080"}).public_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize("value", ["filedrop@localhost", "Filedrop <jobs@example.com>", " jobs@example.com "])
def test_an_e_mail_address_is_taken_as_smtp_from(value: str) -> None:
    assert Settings.from_env({"FILEDROP_SMTP_FROM": value}).smtp_from == value.strip()


def test_job_form_limit_is_what_nginx_allows_for_a_start() -> None:
    from server.nginx import job_body_limit
    s = Settings(max_data_size=10 << 20, fetch_max_bytes=2 << 20, max_chunk_size=1 << 20)
    assert s.job_form_limit == (13 << 20) and job_body_limit(s) == s.job_form_limit
    assert job_body_limit(s.replace(max_chunk_size=64 << 20)) == 64 << 20


@pytest.mark.parametrize("chunk_size", [None, 4 << 20])
def test_settings_survive_the_trip_to_a_worker(tmp_path: Path, chunk_size: int | None) -> None:
    """``serve`` hands its settings to the workers it starts as FILEDROP_* variables: they must
    read back equal (an unset optional setting stays unset, not an empty string it refuses)."""
    s = Settings(data_dir=tmp_path, api_keys=("a", "b"), chunk_size=chunk_size, callback_secret="x",
                 allow_http_callbacks=True, fetch_allow=("127.0.0.1",))
    assert Settings.from_env(s.to_env()) == s


def test_a_second_serve_on_the_same_sqlite_database_is_refused(tmp_path: Path) -> None:
    """SQLite is one app process. A second ``serve`` on the same data dir (a second scripts/run
    on other ports) started, and its start removed the first one's upload temps: an upload in
    flight there was answered 404. Now it is refused in one line naming the holder; once the
    first is gone (even by ``kill -9``), a new one starts."""
    env = server_env(tmp_path / "data", API_KEY)
    assert subprocess.run([sys.executable, "-m", "server", "migrate"], cwd=REPO, env=env,
                          capture_output=True, timeout=60).returncode == 0
    first = ServerProcess(env, tmp_path / "first.log").start()
    later = None
    try:
        second = subprocess.run([sys.executable, "-m", "server", "serve"], cwd=REPO, capture_output=True,
                                text=True, env={**env, "FILEDROP_APP_PORT": str(free_port())}, timeout=20)
        assert second.returncode == 2, second.stderr
        assert second.stderr == (f"filedrop: another `filedrop serve` (pid {first.proc.pid}) is using "
                                 f"{tmp_path / 'data' / 'filedrop.sqlite3'}: SQLite serves one app process; stop "
                                 "that one first, or give this one a data dir of its own (FILEDROP_DATA_DIR); more "
                                 "app processes need PostgreSQL (FILEDROP_DATABASE_URL)\n")
        assert "listening" not in second.stdout
        first.kill9()
        later = ServerProcess({**env, "FILEDROP_APP_PORT": str(free_port())}, tmp_path / "later.log").start()
    finally:
        for p in (first, later):
            if p is not None:
                p.stop()
