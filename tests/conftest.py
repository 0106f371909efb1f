"""Fixtures: a real migrated SQLite file per test, the production app factory, real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import create_app
from server.config import Settings
from server.db.migrate import upgrade
from tests.support.server import ServerProcess, server_env

API_KEY = "test-key-0123456789"
OTHER_KEY = "other-key-9876543210"
AUTH = {"X-API-Key": API_KEY}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(
        data_dir=tmp_path / "var",
        api_keys=(API_KEY, OTHER_KEY),
        min_free_disk=1 << 20,
        janitor_interval=0,
        fetch_allow=("127.0.0.1",),
        allow_http_callbacks=True,
        callback_backoff=0.05,
        workers=2,  # jobs' worker processes: two share the claims, whatever the machine's cores
    )
    upgrade(s.db_path)
    return s


@pytest.fixture
async def client(aiohttp_client, settings: Settings):  # type: ignore[no-untyped-def]
    """An aiohttp test client over the production app on a migrated database."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start real server subprocesses (`python -m server serve`); all stopped at teardown."""
    started: list[ServerProcess] = []

    def start(data_dir: Path | None = None, **settings: str) -> ServerProcess:
        data_dir = data_dir or tmp_path / "srv"
        env = server_env(data_dir, API_KEY, **settings)
        if not (data_dir / "filedrop.sqlite3").exists():
            upgrade(data_dir / "filedrop.sqlite3")
        proc = ServerProcess(env, tmp_path / f"server-{len(started)}.log").start()
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start real NGINX over the project's rendered nginx.conf: ``start(settings, app_port=...)``
    (tests/support/nginx.py); all stopped at teardown."""
    from tests.support.nginx import NginxFactory

    factory = NginxFactory(tmp_path / "nginx")
    yield factory.start
    factory.stop_all()
