"""The keys that sign URLs: made on first use, kept in the database (shared by every app process,
surviving restarts), rotated with a grace period by `filedrop secrets rotate`; what a signature
covers (method, path, query, expiry, the owner), each change refused as ERR_URL_INVALID, an
expired URL as ERR_URL_EXPIRED. Real migrated SQLite files, the production app factory, the CLI as
a subprocess."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from server.app import create_app
from server.db import Database, utcnow
from server.db.models import Base
from server.errors import UrlExpired, UrlInvalid
from server.signing import Signer, SigningKeys, expiry_after
from tests.support.jobs import AUTH, SEED_ROWS, SEED_TEMPLATE, start, start_ok, wait_job
from tests.support.server import REPO
from tests.support.signed import flip_last, params_of, path_of, with_param
from tests.support.uploads import assert_error
from tests.support.waiting import async_wait_until

OWNER = "a" * 64


def kid_of(url: str) -> str:
    return dict(params_of(url))["kid"]


def keys_in(db_path) -> list[tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    with sqlite3.connect(db_path) as c:
        return c.execute("SELECT kid, retires_at FROM signing_keys ORDER BY created_at").fetchall()


def secrets_cli(settings, *args: str, **more: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env["FILEDROP_DATA_DIR"] = str(settings.data_dir)
    env.update({f"FILEDROP_{k.upper()}": v for k, v in more.items()})
    return subprocess.run([sys.executable, "-m", "server", "secrets", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


async def finished_job(client, batch_id: str) -> str:  # type: ignore[no-untyped-def]
    job = await start_ok(client, batch_id, SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, batch_id, job["job_id"])
    return job["job_id"]


async def download_link(client, batch_id: str, job_id: str) -> str:  # type: ignore[no-untyped-def]
    r = await client.get(f"/api/batch/{batch_id}/{job_id}/result?format=url", headers=AUTH)
    assert r.status == 200, await r.text()
    return (await r.json())["download_url"]


async def test_one_key_made_on_first_use_shared_by_processes_and_restarts(aiohttp_client, settings) -> None:
    assert keys_in(settings.db_path) == []
    first = await aiohttp_client(create_app(settings))
    second = await aiohttp_client(create_app(settings))  # another app process on the same database
    r = await start(first, "shared", SEED_TEMPLATE, None, data_upload="url")
    job = await r.json()
    assert r.status == 201, job
    assert [k for k, _ in keys_in(settings.db_path)] == [kid_of(job["upload_URL"])]  # made on first use, stored
    r = await second.put(path_of(job["upload_URL"]), data=b'[{"reference_id": "r1", "data": {}}]')
    assert r.status == 201, await r.text()  # signed by one process, accepted by the other
    await wait_job(second, "shared", job["job_id"])
    link = await download_link(second, "shared", job["job_id"])
    await first.close()
    await second.close()
    restarted = await aiohttp_client(create_app(settings))
    assert (await restarted.get(path_of(link))).status == 200  # survives a restart
    assert kid_of(await download_link(restarted, "shared", job["job_id"])) == kid_of(link)  # the same key signs
    assert len(keys_in(settings.db_path)) == 1


async def test_rotation_keeps_old_urls_for_the_grace_then_stops_them(client, settings) -> None:
    job_id = await finished_job(client, "rotated")
    old = await download_link(client, "rotated", job_id)
    r = secrets_cli(settings, "rotate", "--grace", "1h")
    assert r.returncode == 0, r.stderr
    assert f"key {kid_of(old)}: its URLs verify until " in r.stdout
    new_kid = r.stdout.split()[3].rstrip(":")
    assert r.stdout.startswith(f"new signing key {new_kid}: ")
    assert stat.S_IMODE(settings.db_path.stat().st_mode) == 0o600  # the keys are the server user's only

    async def signed_by_new() -> str | None:  # the app rereads the keys within 5 s
        link = await download_link(client, "rotated", job_id)
        return link if kid_of(link) == new_kid else None

    new = await async_wait_until(signed_by_new, timeout=15, interval=0.2, what="links signed by the new key")
    assert (await client.get(path_of(old))).status == 200  # within the grace
    assert (await client.get(path_of(new))).status == 200
    listed = secrets_cli(settings, "list").stdout
    assert f"{kid_of(old)}\tverifies until " in listed and f"{new_kid}\tcurrent\t" in listed
    # A leak: --grace 0 stops every old URL (within the 5 s the app trusts what it read).
    assert secrets_cli(settings, "rotate", "--grace", "0").returncode == 0

    async def refused() -> dict | None:  # type: ignore[type-arg]
        r = await client.get(path_of(old))
        return await r.json() if r.status == 403 else None

    body = await async_wait_until(refused, timeout=15, interval=0.2, what="the old key's URLs to be refused")
    assert body["code"] == "ERR_URL_EXPIRED" and "rotated out" in body["message"], body
    r = await client.get(path_of(new))  # the key of the first rotation is retired too
    await assert_error(r, 403, "ERR_URL_EXPIRED")


@pytest.mark.parametrize("grace", ["8d", "999999999d", "9999999999999999999999s"])
def test_a_grace_over_the_longest_url_life_is_refused_naming_the_setting(settings, grace: str) -> None:
    r = secrets_cli(settings, "rotate", "--grace", grace)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "FILEDROP_MAX_URL_TTL (7d)" in r.stderr, r.stderr
    assert secrets_cli(settings, "rotate", "--grace", "7d").returncode == 0


@pytest.mark.parametrize("max_url_ttl,grace", [("12h", 12 * 3600), ("7d", 24 * 3600)])
def test_rotate_without_grace_keeps_old_urls_for_a_day_or_the_longest_url_life(settings, max_url_ttl: str,
                                                                              grace: int) -> None:
    """No --grace: 24h, or FILEDROP_MAX_URL_TTL when that is shorter (it was refused then, over a
    --grace 24h nobody typed): the old key verifies that long."""
    assert secrets_cli(settings, "rotate", max_url_ttl=max_url_ttl).returncode == 0  # the first key
    before = utcnow().replace(microsecond=0)
    r = secrets_cli(settings, "rotate", max_url_ttl=max_url_ttl)
    after = utcnow()
    assert r.returncode == 0 and r.stderr == "", r.stderr
    (_, retires_at), (_, current) = keys_in(settings.db_path)
    assert current is None
    assert before + timedelta(seconds=grace) <= datetime.fromisoformat(retires_at) <= after + timedelta(seconds=grace)
    assert "--grace" in secrets_cli(settings, "rotate", "--help").stdout
    assert "FILEDROP_MAX_URL_TTL" in " ".join(secrets_cli(settings, "rotate", "--help").stdout.split())


async def test_keys_retired_long_ago_are_forgotten(settings) -> None:
    db = Database(settings.db_path)
    try:
        keys = SigningKeys(db)
        signer = Signer(keys, "http://h")
        link = await signer.link("GET", "/p", OWNER, expiry_after(3600))
        query = params_of(link.url)
        await keys.rotate(grace=0, forget_after=3600)
        with pytest.raises(UrlExpired):  # rotated out: its (right) signature says expired
            await Signer(SigningKeys(db), "http://h").verify("GET", "/p", query, OWNER)
        await keys.rotate(grace=0, forget_after=0)  # retired before now: deleted
        assert kid_of(link.url) not in {k for k, _ in keys_in(settings.db_path)}
        with pytest.raises(UrlInvalid):  # an unknown key now
            await Signer(SigningKeys(db), "http://h").verify("GET", "/p", query, OWNER)
    finally:
        await db.dispose()


async def test_a_signature_covers_method_path_query_expiry_and_owner(settings) -> None:
    db = Database(settings.db_path)
    try:
        signer = Signer(SigningKeys(db), "https://files.example.com/")
        link = await signer.link("PUT", "/api/batch/b/j/data", OWNER, expiry_after(600), {"format": "csv"})
        assert link.url.startswith("https://files.example.com/api/batch/b/j/data?expires=")
        good = params_of(link.url)
        await signer.verify("PUT", "/api/batch/b/j/data", good, OWNER)  # as made: fine
        changed = {
            "method": ("GET", "/api/batch/b/j/data", good, OWNER),
            "path": ("PUT", "/api/batch/b/k/data", good, OWNER),
            "owner": ("PUT", "/api/batch/b/j/data", good, "b" * 64),
            "no owner": ("PUT", "/api/batch/b/j/data", good, None),
            "query": ("PUT", "/api/batch/b/j/data", params_of(with_param(link.url, "format", "json")), OWNER),
            "extra": ("PUT", "/api/batch/b/j/data", [*good, ("x", "1")], OWNER),
            "twice": ("PUT", "/api/batch/b/j/data", [*good, good[0]], OWNER),
            "expiry": ("PUT", "/api/batch/b/j/data",
                       params_of(with_param(link.url, "expires", str(int(dict(good)["expires"]) + 3600))), OWNER),
            "signature": ("PUT", "/api/batch/b/j/data",
                          params_of(with_param(link.url, "signature", flip_last(dict(good)["signature"]))), OWNER),
            "kid": ("PUT", "/api/batch/b/j/data", params_of(with_param(link.url, "kid", "0badc0de")), OWNER),
            "no signature": ("PUT", "/api/batch/b/j/data", [p for p in good if p[0] != "signature"], OWNER),
        }
        for what, args in changed.items():
            with pytest.raises(UrlInvalid):
                await signer.verify(*args)
                pytest.fail(f"a changed {what} was accepted")
        past = await signer.link("PUT", "/p", OWNER, (utcnow() - timedelta(seconds=1)).replace(microsecond=0))
        with pytest.raises(UrlExpired):
            await signer.verify("PUT", "/p", params_of(past.url), OWNER)
        # An expiry pushed into the past is a change like any other: invalid, not expired.
        with pytest.raises(UrlInvalid):
            await signer.verify("PUT", "/api/batch/b/j/data",
                                params_of(with_param(link.url, "expires", str(int(time.time()) - 10))), OWNER)
    finally:
        await db.dispose()


def test_the_models_and_the_migrations_agree(settings) -> None:
    from server.db import job_models, signing_models  # noqa: F401  (register their tables)

    engine = create_engine(settings.sync_db_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
