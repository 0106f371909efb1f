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
import contextlib
import ipaddress
import os
import re
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.config import Settings

TEMPLATE = Path(__file__).resolve().parents[1] / "nginx.conf"
# The drop page's static files (index.html and the /_/ assets), served from the repo itself.
WEB_ROOT = Path(__file__).resolve().parents[1] / "web"
UNITS_DIR = TEMPLATE.parent / "deploy" / "systemd"
UNITS = ("filedrop.service", "filedrop-worker.service", "filedrop-nginx.service")
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
# What a path may contain to be written into the config unquoted and uninterpreted.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/@+,=:~-]*")
_SAFE_HOST = re.compile(r"[A-Za-z0-9.:-]+")
# Directories under the prefix NGINX writes to; nginx.conf names each of them.
PREFIX_DIRS = ("logs", "tmp/client_body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi")
LOG_FILES = ("logs/access.log", "logs/error.log")


def upstream_address(host: str, port: int) -> str:
    """Where NGINX reaches the app: a wildcard bind is reached over loopback."""
    if host and not _SAFE_HOST.fullmatch(host):
        raise ValueError(f"FILEDROP_APP_HOST {host!r}: use a host name or an IP address")
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


def _check_resolves(host: str) -> None:
    """A host name in the ``upstream`` must resolve: else ``nginx -t`` stops with `host not found
    in upstream ... nginx.conf:81`, naming no setting."""
    if not host:
        return  # the wildcard: reached over loopback
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return  # an address: nothing to look up
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"FILEDROP_APP_HOST {host!r}: the name does not resolve (use an address of this "
                         "machine, e.g. 127.0.0.1)") from None


def listen_address(host: str, port: int) -> str:
    """NGINX's ``listen`` for ``host:port`` (an IPv6 address in brackets)."""
    if not _SAFE_HOST.fullmatch(host):
        raise ValueError(f"FILEDROP_HTTP_HOST {host!r}: use an IP address")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def data_too_large_message(settings: Settings) -> str:
    """What NGINX's 413 says for a job's data PUT: the app's own limit and setting."""
    return f"data is over the {settings.max_data_size}-byte limit (FILEDROP_MAX_DATA_SIZE)"


def too_large_messages(settings: Settings) -> tuple[str, str]:
    """What NGINX's 413 says for the upload API and for a job start: the limit and the
    setting(s) that make it, as the app's own 413s do."""
    chunk = f"request body over the {settings.max_chunk_size}-byte limit of one upload (FILEDROP_MAX_CHUNK_SIZE)"
    job_limit = job_body_limit(settings)
    if job_limit == settings.max_chunk_size:
        return chunk, chunk
    job = (f"request body over the {job_limit}-byte limit of a job start (FILEDROP_MAX_DATA_SIZE + "
           "FILEDROP_FETCH_MAX_BYTES + 1 MiB)")
    return chunk, job


def _checked_listen(listen: str) -> str:
    if not re.fullmatch(r"(?:[0-9.]+:|\[[0-9a-fA-F:]+\]:)?[0-9]{1,5}", listen):
        raise ValueError(f"listen {listen!r}: use PORT, ADDR:PORT or [ADDR6]:PORT")
    return listen


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[-1])


def values(settings: Settings, *, listen: str | None = None, page_listen: str | None = None,
           worker_processes: str = "auto", app_ports: Sequence[int] | None = None,
           unprivileged: bool = False) -> dict[str, str]:
    """The placeholder values for ``settings``. ``listen`` defaults to ``http_host:http_port``
    (127.0.0.1 unless FILEDROP_HTTP_HOST opens it), ``page_listen`` (the drop page's origin) to
    ``http_host:page_port``; ``app_ports`` (default: ``app_port`` and,
    with ``FILEDROP_APP_PROCESSES``, the ports after it) are the app processes behind the
    upstream (round-robin); ``unprivileged``: NGINX will not run as root (a
    systemd unit with ``User=``), so no ``user`` directive."""
    root = Path(settings.smartlink_root or settings.data_dir / "smartlinks")
    if not _SAFE_PATH.fullmatch(str(root)):
        raise ValueError(f"smartlink_root {str(root)!r}: NGINX needs an absolute path of plain characters")
    listen = _checked_listen(listen or listen_address(settings.http_host, settings.http_port))
    page_listen = _checked_listen(page_listen or listen_address(settings.http_host, settings.page_port))
    app_ports = app_ports or settings.app_ports
    if _port(page_listen) == _port(listen) or _port(page_listen) in app_ports:
        raise ValueError(f"FILEDROP_PAGE_PORT {_port(page_listen)}: the drop page needs a port of its own, not "
                         "FILEDROP_HTTP_PORT's or an app process's (FILEDROP_APP_PORT and the ports after it)")
    if _port(listen) in app_ports:
        # NGINX would take it first, and the app then find its port in use.
        raise ValueError(f"FILEDROP_HTTP_PORT {_port(listen)}: NGINX needs a port of its own, not an app "
                         "process's (FILEDROP_APP_PORT and the ports after it)")
    _check_resolves(settings.app_host)
    if not re.fullmatch(r"auto|[1-9][0-9]{0,2}", worker_processes):
        raise ValueError(f"worker_processes {worker_processes!r}: use auto or a count")
    chunk_too_large, job_too_large = too_large_messages(settings)
    results = Path(settings.results_dir)
    if not _SAFE_PATH.fullmatch(str(results)):
        raise ValueError(f"data_dir {str(settings.data_dir)!r}: NGINX needs an absolute path of plain characters")
    servers = [upstream_address(settings.app_host, p) for p in app_ports]
    return {
        "USER_DIRECTIVE": "" if unprivileged else _user_directive(root),
        "WORKER_PROCESSES": worker_processes,
        "LISTEN": listen,
        "PAGE_LISTEN": page_listen,
        "PAGE_PORT": str(_port(page_listen)),
        "APP_SERVERS": "\n        ".join(f"server {a};" for a in servers),
        "SMARTLINK_ROOT": str(root),
        "CHUNK_BODY_LIMIT": str(settings.max_chunk_size),
        "JOB_BODY_LIMIT": str(job_body_limit(settings)),
        "WEB_ROOT": _web_root(),
        "CHUNK_TOO_LARGE": chunk_too_large,
        "JOB_TOO_LARGE": job_too_large,
        "DATA_BODY_LIMIT": str(settings.max_data_size),
        "DATA_TOO_LARGE": data_too_large_message(settings),
        "RESULTS_ROOT": str(results),
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


def _make_dirs(path: Path, owner: tuple[int, int] | None) -> None:
    """``path`` and its missing parents, 0700; with ``owner`` (uid, gid), those made here are
    its: a directory root made on the way would lock that user out of everything below it."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(p, *owner)


def render(settings: Settings, prefix: Path, *, listen: str | None = None, page_listen: str | None = None,
           worker_processes: str = "auto", template: Path = TEMPLATE, app_ports: Sequence[int] | None = None,
           unprivileged: bool = False, owner: tuple[int, int] | None = None) -> Path:
    """Write ``prefix/nginx.conf`` and the directories it names; return the config's path.
    Everything made here is its user's only (0700 directories, 0600 files): the logs hold the
    smartlink URLs, which are secrets. ``owner`` (uid, gid): the user NGINX runs as when that is
    not who renders (root writing systemd units): the prefix and NGINX's files in it are then
    that user's, and so is the smartlink root if it is made here; an existing smartlink root of
    another user is refused (NGINX could not read its 0600 pages), before anything is written."""
    prefix = Path(prefix).resolve()
    vals = values(settings, listen=listen, page_listen=page_listen, worker_processes=worker_processes,
                  app_ports=app_ports, unprivileged=unprivileged)
    text = fill(template.read_text(encoding="utf-8"), vals)
    root = Path(vals["SMARTLINK_ROOT"])
    if owner is not None and root.exists() and root.stat().st_uid != owner[0]:
        raise ValueError(f"smartlink root {str(root)!r} belongs to uid {root.stat().st_uid}, not to the services' "
                         f"user (uid {owner[0]}), who must write and serve its pages: chown -R it to that user")
    for d in PREFIX_DIRS:
        _make_dirs(prefix / d, owner)
    if owner is not None:
        # The prefix is NGINX's own: an earlier run (or mkdir) may have left these to root.
        for d in {prefix, prefix / "tmp", *(prefix / d for d in PREFIX_DIRS)}:
            os.chown(d, *owner)
    for log in LOG_FILES:
        # NGINX appends to an existing log and keeps its mode; made here, it is 0600 whatever
        # the umask NGINX starts under (it creates files 0644 minus the umask).
        fd = os.open(prefix / log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            if owner is not None or os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    # NGINX serves from here; it must exist before the first job is published.
    _make_dirs(root, owner)
    conf = prefix / "nginx.conf"
    tmp = prefix / ".nginx.conf.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        if owner is not None:
            os.fchown(f.fileno(), *owner)  # before the rename: the config is never root's only
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, conf)
    return conf


def _safe_path(p: Path, what: str) -> str:
    if not _SAFE_PATH.fullmatch(str(p)):
        raise ValueError(f"{what} {str(p)!r}: use an absolute path of plain characters")
    return str(p)


def unit_values(settings: Settings, prefix: Path, *, user: str, env_file: Path) -> dict[str, str]:
    """The placeholder values of ``deploy/systemd/*.service`` for ``settings``."""
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"user {user!r} does not exist") from None
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", user):
        raise ValueError(f"user {user!r}: not a plain user name")
    assert settings.db_path is not None and settings.smartlink_root is not None
    prefix = Path(prefix).resolve()
    data = settings.data_dir
    writable = [data] + [p for p in (settings.db_path.parent, settings.smartlink_root, prefix)
                         if data not in (p, *p.parents)]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return {
        "USER": user,
        "GROUP": grp.getgrgid(pw.pw_gid).gr_name,
        "ENV_FILE": _safe_path(Path(env_file).resolve(), "env file"),
        "REPO": _safe_path(TEMPLATE.parent, "checkout"),
        "FILEDROP": _safe_path(Path(sys.prefix) / "bin" / "filedrop", "filedrop command"),
        "NGINX": _safe_path(Path(nginx), "nginx"),
        "PREFIX": _safe_path(prefix, "NGINX prefix"),
        "WRITABLE": " ".join(_safe_path(p, "data path") for p in dict.fromkeys(writable)),
    }


def render_units(settings: Settings, prefix: Path, out: Path, *, user: str | None = None,
                 env_file: Path | None = None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """systemd units for the app, a worker and NGINX (``deploy/systemd``) into ``out``, NGINX's
    config into ``prefix`` (for a NGINX that runs as ``user``, so without a ``user`` directive
    unless that is root), and ``out/filedrop.env`` with the
    ``FILEDROP_*`` variables of ``environ`` (0600: it may hold keys) unless ``env_file`` names
    another. ``user`` defaults to the owner of the data dir, else this user. Run as root for
    another ``user``, NGINX's prefix (and a smartlink root made here) is that user's; the units
    and the env file stay root's. Not root, ``user`` must be this user."""
    import pwd

    out = Path(out).resolve()
    if user is None:
        owner = settings.data_dir.stat().st_uid if settings.data_dir.exists() else os.geteuid()
        user = pwd.getpwuid(owner).pw_name
    if env_file is not None and not Path(env_file).is_file():
        # systemd would refuse to start every unit that names it ("Failed to load environment files").
        raise ValueError(f"--env-file {Path(env_file).resolve()}: no such file (leave it out to write "
                         "OUT/filedrop.env from this environment's FILEDROP_* variables)")
    env_path = Path(env_file) if env_file else out / "filedrop.env"
    vals = unit_values(settings, prefix, user=user, env_file=env_path)
    pw = pwd.getpwnam(user)
    nginx_owner = None
    if pw.pw_uid != os.geteuid():
        if os.geteuid() != 0:
            raise ValueError(f"--user {user}: only root can leave NGINX's files to another user (run this as "
                             f"{user}, or with sudo)")
        nginx_owner = (pw.pw_uid, pw.pw_gid)
    # Run as root, NGINX's workers would drop to `nobody` without the `user` directive. The units
    # and the env file stay root's (systemd reads them as root): a services' user that could
    # rewrite them would choose what systemd runs.
    render(settings, prefix, unprivileged=pw.pw_uid != 0, owner=nginx_owner)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNITS:
        text = (UNITS_DIR / name).read_text(encoding="utf-8")
        used = set(_PLACEHOLDER.findall(text))  # each unit uses some of the values; none may be missing
        path = out / name
        path.write_text(fill(text, {k: v for k, v in vals.items() if k in used}), encoding="utf-8")
        written.append(path)
    if env_file is None:
        env = dict(os.environ if environ is None else environ)
        env["FILEDROP_DATA_DIR"] = str(settings.data_dir)
        lines = [f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("FILEDROP_") and "\n" not in v]
        fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            f.write("# filedrop settings for its systemd units (README: Settings)\n" + "\n".join(lines) + "\n")
        written.append(env_path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.nginx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="write PREFIX/nginx.conf (+ logs/, tmp/) from FILEDROP_* settings")
    r.add_argument("--prefix", required=True, type=Path, help="NGINX prefix directory (nginx -p)")
    r.add_argument("--listen", help="listen address (default: FILEDROP_HTTP_HOST:FILEDROP_HTTP_PORT)")
    r.add_argument("--page-listen", help="the drop page's listen address (default: "
                   "FILEDROP_HTTP_HOST:FILEDROP_PAGE_PORT)")
    r.add_argument("--worker-processes", default="auto")
    u = sub.add_parser("units", help="write systemd units (app, worker, NGINX) into OUT and NGINX's config "
                       "into PREFIX, from FILEDROP_* settings")
    u.add_argument("--prefix", required=True, type=Path, help="NGINX prefix directory (e.g. DATA_DIR/nginx)")
    u.add_argument("--out", required=True, type=Path, help="where the .service files (and filedrop.env) go")
    u.add_argument("--user", help="the user the services run as (default: the owner of the data dir); "
                   "NGINX's prefix (and a smartlink root made here) is theirs, the units stay root's")
    u.add_argument("--env-file", type=Path, help="an existing settings file for the units (default: write "
                   "OUT/filedrop.env from this environment's FILEDROP_* variables)")
    args = parser.parse_args(argv)
    os.umask(0o077)
    try:
        settings = Settings.from_env()
        if args.command == "units":
            for path in render_units(settings, args.prefix, args.out, user=args.user, env_file=args.env_file):
                print(path)
            return 0
        conf = render(settings, args.prefix, listen=args.listen, page_listen=args.page_listen,
                      worker_processes=args.worker_processes)
    except ValueError as e:
        print(f"filedrop: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a prefix or --out under a file, or where this user may not write
        print(f"filedrop: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    print(conf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
