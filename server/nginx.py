"""Render the top-level ``nginx.conf`` template for one NGINX prefix.

``python -m server.nginx render --prefix DIR`` reads Settings from ``FILEDROP_*`` and writes
``DIR/nginx.conf`` plus the directories NGINX needs (``logs/``, ``tmp/*``); then
``nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`` runs as a normal process. Rendering is
idempotent and the file is replaced atomically, so re-rendering under a running NGINX followed by
``nginx -s reload`` never shows it half a file.

Invariants: every ``{{NAME}}`` placeholder in the template is filled (an unknown or missing one
is an error, not an empty string); a value that could change the meaning of the configuration
(quotes, ``;``, braces, ``$``, whitespace in a path) is refused rather than escaped.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.config import Settings

TEMPLATE = Path(__file__).resolve().parents[1] / "nginx.conf"
# The drop page's static files (index.html and the /_/ assets), served from the repo itself.
WEB_ROOT = Path(__file__).resolve().parents[1] / "web"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
# What a path may contain to be written into the config unquoted and uninterpreted.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/@+,=:~-]*")
_SAFE_HOST = re.compile(r"[A-Za-z0-9.:-]+")
# Directories under the prefix NGINX writes to; nginx.conf names each of them.
PREFIX_DIRS = ("logs", "tmp/client_body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi")


def upstream_address(host: str, port: int) -> str:
    """Where NGINX reaches the app: a wildcard bind is reached over loopback."""
    if host and not _SAFE_HOST.fullmatch(host):
        raise ValueError(f"app_host {host!r}: use a host name or an IP address")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def job_body_limit(settings: Settings) -> int:
    """Largest request body under ``/api/`` outside the upload API (job starts): the app's
    ``job_form_limit``, never below ``max_chunk_size``."""
    return max(settings.max_chunk_size, settings.job_form_limit)


def _user_directive(root: Path) -> str:
    # As root, NGINX's workers would drop to `nobody`, who cannot read a private data dir (or
    # write its temp dirs). They run as the owner of the smartlink root instead: the identity
    # that writes the files reads them, nothing more. Not root: no directive (nginx ignores it).
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    probe = root
    while not probe.exists():
        probe = probe.parent
    st = probe.stat()
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        return ""
    return f"user {user} {group};"


def values(settings: Settings, *, listen: str | None = None, worker_processes: str = "auto") -> dict[str, str]:
    """The placeholder values for ``settings``; ``listen`` defaults to every address, http_port."""
    root = Path(settings.smartlink_root or settings.data_dir / "smartlinks")
    if not _SAFE_PATH.fullmatch(str(root)):
        raise ValueError(f"smartlink_root {str(root)!r}: NGINX needs an absolute path of plain characters")
    listen = listen or str(settings.http_port)
    if not re.fullmatch(r"(?:[0-9.]+:|\[[0-9a-fA-F:]+\]:)?[0-9]{1,5}", listen):
        raise ValueError(f"listen {listen!r}: use PORT, ADDR:PORT or [ADDR6]:PORT")
    if not re.fullmatch(r"auto|[1-9][0-9]{0,2}", worker_processes):
        raise ValueError(f"worker_processes {worker_processes!r}: use auto or a count")
    return {
        "USER_DIRECTIVE": _user_directive(root),
        "WORKER_PROCESSES": worker_processes,
        "LISTEN": listen,
        "APP_ADDR": upstream_address(settings.app_host, settings.app_port),
        "SMARTLINK_ROOT": str(root),
        "CHUNK_BODY_LIMIT": str(settings.max_chunk_size),
        "JOB_BODY_LIMIT": str(job_body_limit(settings)),
        "WEB_ROOT": _web_root(),
    }


def _web_root(web_root: Path = WEB_ROOT) -> str:
    if not _SAFE_PATH.fullmatch(str(web_root)):
        raise ValueError(f"the drop page's directory {str(web_root)!r}: NGINX needs an absolute path of plain "
                         "characters (move the checkout)")
    return str(web_root)


def fill(template: str, vals: Mapping[str, str]) -> str:
    """Replace every ``{{NAME}}``; a placeholder without a value, or a value without a
    placeholder, is an error (the template and this module must agree)."""
    names = set(_PLACEHOLDER.findall(template))
    missing = names - set(vals)
    unused = set(vals) - names
    if missing or unused:
        raise ValueError(f"nginx.conf placeholders out of step: missing {sorted(missing)}, unused {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda m: vals[m.group(1)], template)


def render(settings: Settings, prefix: Path, *, listen: str | None = None, worker_processes: str = "auto",
           template: Path = TEMPLATE) -> Path:
    """Write ``prefix/nginx.conf`` and the directories it names; return the config's path."""
    prefix = Path(prefix).resolve()
    vals = values(settings, listen=listen, worker_processes=worker_processes)
    text = fill(template.read_text(encoding="utf-8"), vals)
    for d in PREFIX_DIRS:
        (prefix / d).mkdir(parents=True, exist_ok=True)
    # NGINX serves from here; it must exist before the first job is published.
    Path(vals["SMARTLINK_ROOT"]).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    tmp = prefix / ".nginx.conf.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, conf)
    return conf


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.nginx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="write PREFIX/nginx.conf (+ logs/, tmp/) from FILEDROP_* settings")
    r.add_argument("--prefix", required=True, type=Path, help="NGINX prefix directory (nginx -p)")
    r.add_argument("--listen", help="listen address (default: FILEDROP_HTTP_PORT on every address)")
    r.add_argument("--worker-processes", default="auto")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        conf = render(settings, args.prefix, listen=args.listen, worker_processes=args.worker_processes)
    except ValueError as e:
        print(f"filedrop: {e}", file=sys.stderr)
        return 2
    print(conf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
