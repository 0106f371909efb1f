"""Command line: serve, migrate, keys (and drop, cleanup)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from server.config import Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as e:
        raise SystemExit(f"filedrop: bad setting: {e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from server.app import create_app
    from server.db.migrate import NotMigrated, check_at_head

    settings = _settings()
    try:
        check_at_head(settings.db_path)
    except NotMigrated as e:
        print(f"filedrop: {e}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    host = args.host or settings.app_host
    port = args.port or settings.app_port
    web.run_app(create_app(settings), host=host, port=port, access_log=None, shutdown_timeout=10,
                print=lambda *_: print(f"filedrop: app listening on http://{host}:{port}", flush=True))
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from server.db.migrate import current_revisions, upgrade

    settings = _settings()
    upgrade(settings.db_path)
    print(f"filedrop: {settings.db_path} at revision {', '.join(sorted(current_revisions(settings.db_path)))}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select, update

    from server.auth import KeyStore
    from server.db import Database, utcnow
    from server.db.migrate import check_at_head
    from server.db.models import ApiKey

    settings = _settings()
    check_at_head(settings.db_path)

    async def run() -> int:
        db = Database(settings.db_path)
        try:
            if args.keys_cmd == "create":
                key = await KeyStore(db, ()).create(args.name)
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

    try:
        return asyncio.run(run())
    except Exception as e:  # e.g. a duplicate name
        print(f"filedrop: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="filedrop", description="filedrop server and admin commands "
                                "(settings come from FILEDROP_* variables; see README)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the app on FILEDROP_APP_HOST:FILEDROP_APP_PORT")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        level = Settings.from_env().log_level
    except ValueError:
        level = "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)
