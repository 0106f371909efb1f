"""A throwaway PostgreSQL cluster for the tests, or the one ``FILEDROP_TEST_DATABASE_URL`` names.

``PostgresCluster.start()`` runs Debian's ``initdb`` and ``pg_ctl`` (as the ``postgres`` user when
we are root, which initdb requires) in a fresh temporary directory, listening on 127.0.0.1 and a
free port only, with trust authentication for local connections (nothing but this machine can
reach it, and it lives only as long as the test session). ``stop()`` stops it and removes the
directory. Each test gets its own database (``create_database``), dropped afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.support.waiting import free_port

SETUP_HINT = ("PostgreSQL is not installed: run `FILEDROP_SETUP_TEST=1 scripts/setup` as root (it installs "
              "Debian's postgresql), or set FILEDROP_TEST_DATABASE_URL to a server the tests may use")


def pg_bindir() -> Path | None:
    """Debian's versioned server binaries (initdb is not on PATH there)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresCluster:
    """One PostgreSQL server: ours (throwaway) or an external one (``url`` given)."""

    url: str = ""  # postgresql://user@host:port/dbname of an admin connection
    external: bool = False
    _dir: Path | None = None
    _bindir: Path | None = None
    _run_as: list[str] = field(default_factory=list)
    _opts: str = ""

    @classmethod
    def from_env(cls) -> PostgresCluster:
        url = os.environ.get("FILEDROP_TEST_DATABASE_URL", "")
        if url:
            return cls(url=url.replace("postgresql+asyncpg://", "postgresql://"), external=True)
        return cls().start()

    def start(self) -> PostgresCluster:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError(SETUP_HINT)
        self._bindir = bindir
        self._dir = Path(tempfile.mkdtemp(prefix="filedrop-pg-"))
        data = self._dir / "data"
        if os.geteuid() == 0:
            # initdb refuses to run as root: the cluster belongs to the postgres user.
            pw = pwd.getpwnam("postgres")
            os.chown(self._dir, pw.pw_uid, pw.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        port = free_port()
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self._opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {self._dir} -c fsync=on "
                      "-c max_connections=200 -c shared_buffers=64MB")
        self.start_server()
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        return self

    def start_server(self) -> None:
        """Start our cluster's server (again: after ``stop_server``), once it accepts connections."""
        assert self._dir is not None
        self._run("pg_ctl", "-D", str(self._dir / "data"), "-o", self._opts, "-l", str(self._dir / "server.log"),
                  "-w", "-t", "60", "start")

    def stop_server(self, mode: str = "fast", wait: bool = True) -> None:
        """Stop our cluster's server (``pg_ctl stop -m mode``), its files kept; without ``wait``
        pg_ctl returns at once (a ``smart`` stop then waits for the sessions still open)."""
        assert self._dir is not None
        self._run("pg_ctl", "-D", str(self._dir / "data"), "-m", mode, "-w" if wait else "-W", "-t", "60", "stop")

    def server_running(self) -> bool:
        assert self._dir is not None and self._bindir is not None
        return subprocess.run([*self._run_as, str(self._bindir / "pg_ctl"), "-D", str(self._dir / "data"), "status"],
                              capture_output=True, timeout=60, cwd=self._dir).returncode == 0

    def _run(self, tool: str, *args: str) -> None:
        assert self._bindir is not None
        proc = subprocess.run([*self._run_as, str(self._bindir / tool), *args], capture_output=True, text=True,
                              timeout=120, cwd=self._dir)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def psql(self, sql: str, dbname: str | None = None) -> str:
        """Run ``sql`` through psql as the admin connection; returns its output."""
        url = self.url if dbname is None else self.database_url(dbname, driver="postgresql")
        proc = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-XAtq", url, "-c", sql], capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def database_url(self, dbname: str, driver: str = "postgresql+asyncpg") -> str:
        parts = urlsplit(self.url)
        return urlunsplit((driver, parts.netloc, "/" + dbname, parts.query, ""))

    def create_database(self, template: str | None = None) -> str:
        """A fresh database, empty or a copy of ``template`` (which nothing may be connected to);
        returns its name."""
        name = "filedrop_t_" + uuid.uuid4().hex[:12]
        self.psql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.external or self._dir is None:
            return
        try:
            if self.server_running():  # a test may have stopped it (stop_server)
                self._run("pg_ctl", "-D", str(self._dir / "data"), "-m", "immediate", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
