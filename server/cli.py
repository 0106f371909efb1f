"""Command line: serve, worker, migrate, keys, secrets (and drop, cleanup)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from server.config import Settings, parse_duration


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as e:
        print(f"filedrop: bad setting: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # as the README says: 2 for bad arguments or settings


def _path_problem(settings: Settings) -> str | None:
    """Why this user cannot use the data dir, the database's directory or the smartlink root:
    one line naming the setting, or None. Only looks (nothing is made): a data dir that is a
    file, or one under another user's private directory, was an OSError traceback of every
    command (``migrate`` first, so of ``scripts/run``). A path that is not there yet is fine:
    the nearest directory above it must be usable."""
    assert settings.db_path is not None and settings.smartlink_root is not None
    paths = [(settings.data_dir, "FILEDROP_DATA_DIR")]
    if not settings.database_url and "FILEDROP_DB_PATH" in os.environ:
        paths.append((settings.db_path.parent, "FILEDROP_DB_PATH"))
    if "FILEDROP_SMARTLINK_ROOT" in os.environ:
        paths.append((settings.smartlink_root, "FILEDROP_SMARTLINK_ROOT"))
    for path, setting in paths:
        probe = path
        try:
            while not probe.exists():
                probe = probe.parent
        except PermissionError:
            return (f"{setting}: cannot reach {path}: permission denied (run as the user that owns it, "
                    "or choose a directory of this user's)")
        if not probe.is_dir():
            return f"{setting}: {probe} is not a directory" + (f" (so {path} cannot be one)" if probe != path else "")
        if not os.access(probe, os.W_OK | os.X_OK):
            return (f"{setting}: {probe} is not writable by this user (run as the user that owns it, or "
                    "choose a directory of this user's)")
    return None


def _usable_settings() -> Settings:
    """The settings, once their directories are usable (else one line on stderr, exit 2)."""
    settings = _settings()
    problem = _path_problem(settings)
    if problem is not None:
        print(f"filedrop: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return settings


def _migrated_settings() -> Settings | None:
    """The settings, or None (having said why on stderr) when the database is not at head."""
    from server.db.revision import NotMigrated, check_at_head

    settings = _usable_settings()
    assert settings.db_path is not None
    if not settings.database_url and not settings.db_path.exists():
        # Most likely the wrong data dir: `filedrop migrate` would make a second, empty database.
        where = ("from FILEDROP_DB_PATH" if "FILEDROP_DB_PATH" in os.environ else
                 "from FILEDROP_DATA_DIR" if "FILEDROP_DATA_DIR" in os.environ else
                 "FILEDROP_DATA_DIR is not set: ./var of the current directory")
        print(f"filedrop: no database at {settings.db_path} ({where}): point FILEDROP_DATA_DIR at "
              "the server's data dir (or FILEDROP_DB_PATH at its database); only for a new "
              "installation run `filedrop migrate`, which creates an empty database there", file=sys.stderr)
        return None
    try:
        check_at_head(settings.database)
    except NotMigrated as e:
        print(f"filedrop: {e}", file=sys.stderr)
        return None
    private_state(settings)
    return settings


def private_state(settings: Settings) -> None:
    """Data dir 0700, database files 0600, whatever the umask they were made under: the
    database holds key hashes and every batch, the data dir the uploads and smartlinks (secret
    URLs). Only what this user owns is changed."""
    assert settings.db_path is not None
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = settings.db_path
    for path, mode in ((settings.data_dir, 0o700), (db, 0o600), (Path(f"{db}-wal"), 0o600),
                       (Path(f"{db}-shm"), 0o600)):
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            if st.st_uid == os.geteuid() and st.st_mode & 0o7777 != mode:
                path.chmod(mode)


def _only_app_process(settings: Settings) -> bool:
    """SQLite: take an exclusive ``flock`` on ``<db>.serve.lock`` for this process's life (its
    descriptor is never closed; workers are exec'd, so none inherits it); False, having said
    why, when another ``filedrop serve`` holds it. SQLite is one app process: a second one on
    the same database (say a second ``scripts/run`` on other ports) removed the first one's
    upload temps at its start, cutting off its uploads in flight. PostgreSQL: no lock (app
    processes share it)."""
    if settings.database_url:
        return True
    assert settings.db_path is not None
    path = settings.db_path.with_name(f"{settings.db_path.name}.serve.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        print(f"filedrop: another `filedrop serve`{f' (pid {holder})' if holder.isdigit() else ''} is using "
              f"{settings.db_path}: SQLite serves one app process; stop that one first, or give this one "
              "a data dir of its own (FILEDROP_DATA_DIR); more app processes need PostgreSQL "
              "(FILEDROP_DATABASE_URL)", file=sys.stderr)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the next one's message
    return True


SHUTDOWN_GRACE = 7.0  # seconds a SIGTERM'd app waits for the requests in flight (a stalled upload's)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.protocol import BindError, serve, tune_allocator

    tune_allocator()  # before any thread allocates
    from server.app import create_app

    settings = _migrated_settings()
    if settings is None:
        return 2
    if not _only_app_process(settings):
        return 2
    host = args.host or settings.app_host
    port = args.port or settings.app_port
    app = create_app(settings)
    # What start-up loaded (modules, the app) lives as long as the process: frozen, the garbage
    # collector's full passes no longer walk it. A 10,000-row start spent 20-100 ms in them.
    gc.freeze()
    try:
        # Requests in flight get SHUTDOWN_GRACE to end; the rest of the stop (workers, the
        # recorder, the database) must fit in what is left of the 10 s the README promises.
        serve(app, host, port, shutdown_timeout=SHUTDOWN_GRACE,
              on_listening=lambda: print(f"filedrop: app listening on http://{host}:{port}", flush=True))
    except BindError as e:
        from server.supervisor import port_holder

        if e.errno != errno.EADDRINUSE:  # not this machine's address, or a name that does not resolve
            print(f"filedrop: the app {e.strerror}: set {'FILEDROP_APP_HOST' if args.host is None else '--host'} "
                  "to an address of this machine", file=sys.stderr)
            return 2
        holder = port_holder(port)
        print(f"filedrop: the app {e.strerror}{f' (held by {holder})' if holder else ''}: set "
              f"{'FILEDROP_APP_PORT' if args.port is None else '--port'} to a free port", file=sys.stderr)
        return 2
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from server.jobs.worker import main as run_worker

    if args.parent is not None:  # started by `filedrop serve`, which checked the schema
        return run_worker(_settings(), args.id, args.parent)
    settings = _migrated_settings()
    if settings is None:
        return 2
    return run_worker(settings, args.id, None)


def cmd_migrate(_args: argparse.Namespace) -> int:
    from server.db.migrate import upgrade
    from server.db.revision import NotMigrated, current_revisions
    from server.db.urls import shown

    settings = _usable_settings()
    try:
        before = sorted(current_revisions(settings.database))
    except NotMigrated as e:  # PostgreSQL unreachable: one line, not a traceback
        print(f"filedrop: {e}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    upgrade(settings.database)
    private_state(settings)
    after = sorted(current_revisions(settings.database))
    change = "unchanged" if before == after else f"was {', '.join(before)}" if before else "new database"
    print(f"filedrop: {shown(settings.database)} at revision {', '.join(after)} ({change})")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select, update

    from server.auth import KeyStore
    from server.db import Database, utcnow
    from server.db.models import ApiKey
    from server.errors import KeyNameInvalid, KeyNameTaken

    settings = _migrated_settings()
    if settings is None:
        return 2

    async def run() -> int:
        assert settings is not None
        db = Database(settings.database, settings.database_pool)
        try:
            if args.keys_cmd == "create":
                try:
                    key = await KeyStore(db, ()).create(args.name)
                except (KeyNameInvalid, KeyNameTaken) as e:
                    print(f"filedrop: {e.message}", file=sys.stderr)
                    return 2
                print(key)
                return 0
            if args.keys_cmd == "list":
                async with db.read() as s:
                    for k in await s.scalars(select(ApiKey).order_by(ApiKey.id)):
                        state = "revoked" if k.revoked_at else "active"
                        print(f"{k.name}\t{state}\t{k.created_at.isoformat()}Z")
                return 0
            async with db.write() as s:
                res = await s.execute(update(ApiKey).where(ApiKey.name == args.name, ApiKey.revoked_at.is_(None))
                                      .values(revoked_at=utcnow()))
            if res.rowcount == 0:
                print(f"filedrop: no active key named {args.name!r}", file=sys.stderr)
                return 1
            return 0
        finally:
            await db.dispose()

    return asyncio.run(run())


def cmd_secrets(args: argparse.Namespace) -> int:
    """The keys that sign expiring URLs (``server.signing``): list them, or rotate."""
    from server.signing import SigningKeys

    def when(dt: Any) -> str:
        return f"{dt:%Y-%m-%dT%H:%M:%S}Z"

    if args.secrets_cmd == "rotate":
        ceiling = _settings().max_url_ttl
        if args.grace is None:  # not given: a day, or all of the longest URL life when shorter
            args.grace = min(24 * 3600.0, ceiling)
        elif args.grace > ceiling:
            # Every URL an old key signed expires within FILEDROP_MAX_URL_TTL of its signing.
            print(f"filedrop: --grace {_say_duration(args.grace)} is over FILEDROP_MAX_URL_TTL "
                  f"({_say_duration(ceiling)}): no URL the old keys signed lives longer", file=sys.stderr)
            return 2

    async def run(db: Any, settings: Settings) -> int:
        from server.db import utcnow

        keys = SigningKeys(db)
        if args.secrets_cmd == "rotate":
            new, retiring = await keys.rotate(args.grace, forget_after=settings.max_url_ttl)
            print(f"new signing key {new.kid}: signs every URL made from now on (running servers switch "
                  "within 5 s)")
            now = utcnow()
            for k in retiring:
                print(f"key {k.kid}: " + (f"retired at {when(k.retires_at)}: its URLs are refused (expired)"
                                          if k.retired(now) else f"its URLs verify until {when(k.retires_at)}"))
            return 0
        now = utcnow()
        found = await keys.all()
        if not found:
            print("no signing key yet: the first signed URL makes one")
        for k in found:
            state = ("current" if k.retires_at is None else f"retired at {when(k.retires_at)}"
                     if k.retired(now) else f"verifies until {when(k.retires_at)}")
            print(f"{k.kid}\t{state}\tcreated {when(k.created_at)}")
        return 0

    return _admin(run)


class TerminalProgress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal. Tiny on purpose
    (one line, two callers): no dependency for it. Log records are printed above the bar."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.line = ""

    def __call__(self, done: int, total: int, item: Any) -> None:
        filled = 30 * min(done, total) // max(total, 1)
        self.line = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {item.kind} {item.target}"[:120]
        self.draw()

    def status(self, text: str) -> None:
        self.line = text
        self.draw()

    def draw(self) -> None:
        self.stream.write("\r\x1b[K" + self.line)
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        self.clear()
        self.line = ""


class _AboveBar(logging.Handler):
    def __init__(self, bar: TerminalProgress, inner: logging.Handler) -> None:
        super().__init__(inner.level)
        self.bar, self.inner = bar, inner

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.clear()
        self.inner.handle(record)
        if self.bar.line:
            self.bar.draw()


@contextlib.contextmanager
def _progress() -> Iterator[TerminalProgress | None]:
    if not sys.stderr.isatty():
        yield None
        return
    bar = TerminalProgress(sys.stderr)
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [_AboveBar(bar, h) for h in saved]
    try:
        yield bar
    finally:
        bar.close()
        root.handlers = saved


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def print_table(plan: Any) -> None:
    """What was removed (or would be), one row each, and the bytes freed: the admin commands'
    output. Columns are separated by two spaces (values never hold two in a row)."""
    rows = [("KIND", "TARGET", "BYTES", "RESULT", "DETAIL")]
    rows += [(i.kind, i.target, str(i.bytes), i.result, i.detail) for i in plan.items]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip())
    done = "would remove" if plan.dry_run else "removed"
    freed = plan.bytes_freed
    print(f"{len(plan.items)} item(s), {sum(1 for i in plan.items if i.result == done)} {done}, "
          f"{freed} bytes ({_human(freed)}) {'would be freed' if plan.dry_run else 'freed'}, "
          f"{len(plan.errors)} error(s)" + (" (dry run: nothing changed)" if plan.dry_run else ""))


def _say_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _grace(text: str) -> float:
    """As ``_duration``, without its 100-year bound: cmd_secrets refuses anything over
    FILEDROP_MAX_URL_TTL itself, naming that setting."""
    try:
        return parse_duration(text, longest=None)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _admin(run: Callable[[Any, Settings], Awaitable[int]]) -> int:
    """Run an admin coroutine against the configured database: 2 when it is not migrated."""
    from server.db import Database

    settings = _migrated_settings()
    if settings is None:
        return 2

    async def main() -> int:
        db = Database(settings.database, settings.database_pool)
        try:
            return await run(db, settings)
        finally:
            await db.dispose()

    return asyncio.run(main())


def cmd_drop(args: argparse.Namespace) -> int:
    from server import janitor
    from server.errors import Conflict, NotFound

    async def run(db: Any, settings: Settings) -> int:
        try:
            with _progress() as bar:
                if args.smartlinks:
                    item = await janitor.drop_smartlink_batch(db, settings, args.batch_id, force=args.force,
                                                              cancel_wait=args.cancel_wait, progress=bar)
                else:
                    # The upload service removes the bytes in one step: a status line, not a bar.
                    if bar:
                        bar.status(f"filedrop drop: dropping upload batch {args.batch_id}…")
                    item = await janitor.drop_upload_batch(db, settings, args.batch_id, force=args.force,
                                                           cancel_wait=args.cancel_wait)
        except NotFound as e:
            print(f"filedrop: {e.message}", file=sys.stderr)
            return 1
        except Conflict as e:
            print(f"filedrop: {e.message}", file=sys.stderr)
            return 3
        print_table(janitor.Plan([item]))
        return 1 if item.failed else 0  # e.g. the folder could not be removed: its row says why

    return _admin(run)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from server import janitor

    floor = _settings().cleanup_grace
    if args.older_than is not None and args.older_than < floor:
        # Never do less than asked without saying so: anything younger may still be in use.
        print(f"filedrop: --older-than {_say_duration(args.older_than)} is below the safety floor of "
              f"{_say_duration(floor)} (what was written since may still be in use); "
              "FILEDROP_CLEANUP_GRACE lowers the floor", file=sys.stderr)
        return 2

    async def run(db: Any, settings: Settings) -> int:
        with _progress() as bar:
            async with janitor.one_at_a_time(db, wait=None):  # after a pass under way (a server's janitor)
                if bar:
                    bar.status("filedrop cleanup: looking for what to remove…")
                plan = await janitor.plan(db, settings, older_than=args.older_than, smartlinks=args.smartlinks)
                await janitor.apply(db, settings, plan, dry_run=args.dry_run, older_than=args.older_than,
                                    progress=bar)
        print_table(plan)
        return 1 if plan.errors else 0

    return _admin(run)


def build_parser() -> argparse.ArgumentParser:
    from server.janitor import CANCEL_WAIT

    p = argparse.ArgumentParser(prog="filedrop", description="filedrop server and admin commands "
                                "(settings come from FILEDROP_* variables; see README)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the app on FILEDROP_APP_HOST:FILEDROP_APP_PORT")
    s.add_argument("--host", help="address to listen on (default: FILEDROP_APP_HOST)")
    s.add_argument("--port", type=_port, help="port to listen on, 1-65535 (default: FILEDROP_APP_PORT; NGINX "
                   "proxies to that setting)")
    s.set_defaults(func=cmd_serve)
    w = sub.add_parser("worker", help="render smartlink jobs: claim rows from the database, render them in a "
                       "limited child process, publish them (serve runs FILEDROP_WORKERS of these; run more "
                       "here or on other hosts sharing the database and data dir); stops on SIGTERM")
    w.add_argument("--id", help=argparse.SUPPRESS)  # given by serve, which hands its rows back on exit
    w.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # serve's pid: the worker dies with it
    w.set_defaults(func=cmd_worker)
    m = sub.add_parser("migrate", help="create/upgrade the database schema (Alembic)")
    m.set_defaults(func=cmd_migrate)
    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="make a key; prints it once")
    kc.add_argument("name")
    ksub.add_parser("list", help="list key names")
    kr = ksub.add_parser("revoke", help="revoke a key by name")
    kr.add_argument("name")
    k.set_defaults(func=cmd_keys)
    sc = sub.add_parser("secrets", help="the keys that sign expiring URLs (made on first use, kept in the "
                        "database)")
    scsub = sc.add_subparsers(dest="secrets_cmd", required=True)
    scsub.add_parser("list", help="each key: current, verifying until its grace ends, or retired")
    rot = scsub.add_parser("rotate", help="a new key signs from now on; the old ones' URLs keep verifying "
                           "for --grace")
    rot.add_argument("--grace", type=_grace, metavar="DURATION",
                     help="how long URLs signed by the old keys keep working, at most FILEDROP_MAX_URL_TTL "
                     "(default 24h, or FILEDROP_MAX_URL_TTL when that is shorter; 0: stop them now, e.g. after "
                     "a leak)")
    sc.set_defaults(func=cmd_secrets)
    d = sub.add_parser("drop", help="drop an upload batch (rows and bytes), or with --smartlinks a "
                       "smartlink batch (published files and its jobs' rows); exit 1: not found, "
                       "3: in use")
    d.add_argument("batch_id")
    d.add_argument("--smartlinks", action="store_true", help="drop the smartlink batch of this id")
    d.add_argument("--force", action="store_true", help="cancel a running job of the batch first")
    d.add_argument("--cancel-wait", type=_duration, default=CANCEL_WAIT, metavar="DURATION",
                   help="with --force: how long a live server gets to stop the job before it is "
                   "marked cancelled here (default 10s)")
    d.set_defaults(func=cmd_drop)
    c = sub.add_parser("cleanup", help="remove expired batches, leftovers, orphans and old jobs; "
                       "prints a table; exit 1 on errors")
    c.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="age for idle upload batches and finished jobs (e.g. 24h; default: "
                   "FILEDROP_BATCH_TTL and FILEDROP_JOB_RETENTION; refused under "
                   "FILEDROP_CLEANUP_GRACE, 10m)")
    c.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
    c.add_argument("--smartlinks", action="store_true",
                   help="also remove the smartlinks of expired jobs and smartlink dirs no job refers to")
    c.set_defaults(func=cmd_cleanup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # Everything the server makes (database, uploads, smartlinks, logs) is this user's alone,
    # whatever umask it was started with; NGINX reads the smartlinks as the same user.
    os.umask(0o077)
    args = build_parser().parse_args(argv)
    try:
        level = Settings.from_env().log_level
    except ValueError:
        level = "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_alembic(level)
    # aiosqlite's DEBUG lines are each statement with its parameters: URL-signing secrets and
    # the SHA-256 of every calling key among them. Never written, whatever the level.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    return int(args.func(args) or 0)


def quiet_alembic(level: str) -> None:
    """Alembic's INFO lines (plugins, "Context impl SQLiteImpl", each revision run) are noise
    (``migrate`` and the tests load Alembic): shown only with FILEDROP_LOG_LEVEL=DEBUG. ``migrate``
    says what it did."""
    if logging.getLevelName(level.upper()) != logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)
