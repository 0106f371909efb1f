"""Fixtures: a real migrated database per test (a SQLite file; for the suites marked ``engines``
also a PostgreSQL database of a throwaway cluster), the production app factory, real servers.

``@pytest.mark.engines`` (a module's ``pytestmark``) runs each of its tests that uses the
``database`` fixture (``settings``, ``server_factory`` do) once per engine: the contract tests
every engine must pass. The PostgreSQL cluster is started once per session, on first use
(``tests/support/postgres.py``: Debian's server as the postgres user in a temp dir, or
``FILEDROP_TEST_DATABASE_URL``), and each test gets a database of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import create_app
from server.config import Settings
from server.db.migrate import upgrade
from server.db.revision import current_revisions
from tests.support.postgres import PostgresCluster
from tests.support.server import ServerProcess, server_env

ENGINES = ("sqlite", "postgresql")

API_KEY = "test-key-0123456789"
OTHER_KEY = "other-key-9876543210"
AUTH = {"X-API-Key": API_KEY}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database" in metafunc.fixturenames and metafunc.definition.get_closest_marker("engines"):
        metafunc.parametrize("database", ENGINES, indirect=True)


class _Databases:
    """The session's PostgreSQL cluster and the databases of tests that ended. A test's database
    is dropped when the next one is made (and at the end): by then whatever the test started
    (an app whose fixture ends after this one, a server process) has let go of it.

    Migrated databases are copies of one migrated once per session (``CREATE DATABASE ...
    TEMPLATE``: ~0.1 s instead of ~1 s of Alembic per test)."""

    def __init__(self) -> None:
        self.cluster: PostgresCluster | None = None
        self.template: str | None = None
        self.done: list[str] = []

    def make(self, migrated: bool = True) -> str:
        if self.cluster is None:
            self.cluster = PostgresCluster.from_env()
        self.drop_done()
        if migrated and self.template is None:
            template = self.cluster.create_database()
            upgrade(self.cluster.database_url(template))  # its connections are closed on return
            self.template = template
        return self.cluster.create_database(self.template if migrated else None)

    def drop_done(self) -> None:
        assert self.cluster is not None
        while self.done:
            self.cluster.drop_database(self.done.pop())


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[_Databases]:
    dbs = _Databases()
    yield dbs
    if dbs.cluster is not None:
        dbs.drop_done()
        if dbs.template is not None:
            dbs.cluster.drop_database(dbs.template)
        dbs.cluster.stop()


@pytest.fixture
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """``FILEDROP_DATABASE_URL`` of the test: "" (SQLite in the data dir), or a PostgreSQL
    database of its own, already migrated, when the test runs on that engine."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield ""
        return
    dbs: _Databases = request.getfixturevalue("pg_databases")
    name = dbs.make()
    assert dbs.cluster is not None
    yield dbs.cluster.database_url(name)
    dbs.done.append(name)


@pytest.fixture
def empty_database(pg_databases: _Databases) -> Iterator[str]:
    """A PostgreSQL database of its own, empty (not migrated)."""
    name = pg_databases.make(migrated=False)
    assert pg_databases.cluster is not None
    yield pg_databases.cluster.database_url(name)
    pg_databases.done.append(name)


@pytest.fixture
def settings(tmp_path: Path, database: str) -> Settings:
    s = Settings(
        data_dir=tmp_path / "var",
        database_url=database,
        api_keys=(API_KEY, OTHER_KEY),
        min_free_disk=1 << 20,
        janitor_interval=0,
        fetch_allow=("127.0.0.1",),
        allow_http_callbacks=True,
        callback_backoff=0.05,
        workers=2,  # jobs' worker processes: two share the claims, whatever the machine's cores
    )
    if not database:  # a PostgreSQL one is a copy of a migrated database
        upgrade(s.database)
    return s


@pytest.fixture
async def client(aiohttp_client, settings: Settings):  # type: ignore[no-untyped-def]
    """An aiohttp test client over the production app on a migrated database."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def server_factory(tmp_path: Path, database: str) -> Iterator:  # type: ignore[type-arg]
    """Start real server subprocesses (`python -m server serve`) on the test's database; all
    stopped at teardown."""
    started: list[ServerProcess] = []

    def start(data_dir: Path | None = None, **settings: str) -> ServerProcess:
        data_dir = data_dir or tmp_path / "srv"
        if database:
            settings.setdefault("database_url", database)
        env = server_env(data_dir, API_KEY, **settings)
        target = env.get("FILEDROP_DATABASE_URL") or data_dir / "filedrop.sqlite3"
        if not current_revisions(target):
            upgrade(target)
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
