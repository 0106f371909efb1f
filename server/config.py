"""Settings: one frozen dataclass, built once from ``FILEDROP_*`` environment variables.

Nothing reads the environment at import time: ``Settings.from_env()`` is called by the CLI
(and by tests with an explicit mapping). Every field maps 1:1 onto ``FILEDROP_<FIELD>``;
``SETTINGS_HELP`` documents each one and a test checks that the README lists them all.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.I)
DEFAULT_CHUNK_SIZE = 8 << 20  # the drop page's chunks when FILEDROP_CHUNK_SIZE is unset
# The longest duration any setting or option takes: 100 years. Longer ones (`99999999d`, or so
# many digits that the float is infinite) would overflow the date arithmetic of a cutoff
# (`now - retention`) with a traceback, in `filedrop cleanup` and in every janitor pass.
MAX_DURATION = 36500 * 86400.0
# The largest size any setting takes: 1 PiB. NGINX's client_max_body_size (an off_t) is given
# the sum of three (a job start's form limit), and RLIMIT_AS a C long: `9000000T` stopped
# scripts/run with NGINX's "invalid value" at a line of the rendered config, naming no setting.
MAX_SIZE = 1 << 50


def parse_duration(text: str, longest: float | None = MAX_DURATION) -> float:
    """'90' -> 90.0 s, '10m' -> 600.0, '24h', '7d'; at most ``longest`` (None: any, for a caller
    that checks a tighter limit itself and names it)."""
    m = _DURATION.match(text.lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 10m, 24h, 7d)")
    mult = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    seconds = float(m.group(1)) * mult
    if longest is not None and not seconds <= longest:
        raise ValueError(f"{text.strip()!r} is over the longest duration, 36500d (100 years)")
    return seconds


def parse_size(text: str) -> int:
    """'1048576' -> 1048576, '8MiB'/'8M'/'8MB' -> 8 MiB (binary units throughout); at most
    ``MAX_SIZE``."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 1048576, 64M, 2G)")
    unit = (m.group(2) or "b").lower()[:1]
    mult = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    size = int(m.group(1)) * mult
    if size > MAX_SIZE:
        raise ValueError(f"{text.strip()!r} is over the largest size, 1024T (1 PiB)")
    return size


def check_database_url(url: str) -> str:
    """A PostgreSQL URL the server can use, as given; ValueError saying what is wrong (the
    password never appears in the message)."""
    from server.db.urls import postgres_url

    postgres_url(url)  # raises ValueError
    return url


def _split(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _http_url(url: str) -> bool:
    """An http(s) URL with a host (and a valid port), no query, fragment or white space."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises ValueError when out of range or not a number)
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query
            and not parts.fragment and not any(c.isspace() for c in url))


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1/0, true/false)")


# name -> (default as the environment would spell it, help). Order is the README's order.
SETTINGS_HELP: dict[str, tuple[str, str]] = {
    "data_dir": ("./var", "Root of all server state: database, upload bytes, smartlinks."),
    "db_path": ("<data_dir>/filedrop.sqlite3", "SQLite database file."),
    "database_url": ("", "PostgreSQL instead of SQLite: `postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB` (or `postgresql://…`). "
                     "Unset: the SQLite file of `FILEDROP_DB_PATH`. Needed for more than one app process."),
    "database_pool": ("10", "PostgreSQL connections one process uses at most (a `filedrop worker` at most 3). All busy: "
                      "a request waits up to 30 s, then 503."),
    "app_processes": ("1", "App processes `scripts/run` starts, on `FILEDROP_APP_PORT` and the ports after it, behind "
                      "one NGINX `upstream` (round-robin). Over 1: needs `FILEDROP_DATABASE_URL`; the app processes "
                      "then start no workers and `scripts/run` starts the `FILEDROP_WORKERS` workers itself."),
    "app_host": ("127.0.0.1", "Address the Python app binds to (NGINX proxies to it)."),
    "app_port": ("8081", "Port of the Python app."),
    "http_host": ("127.0.0.1", "IP address NGINX listens on (scripts/run, the systemd site): 0.0.0.0 or a public address opens it to the network."),
    "http_port": ("8080", "Public NGINX port (scripts/run, tests): the smartlinks and the API."),
    "page_port": ("8079", "NGINX port of the drop page (and the API again): an origin of its own, so that no smartlink "
                  "can read the key a person typed into the page. `/` on `FILEDROP_HTTP_PORT` redirects here."),
    "public_url": ("http://127.0.0.1:<http_port>", "Base URL smartlinks are published under (result links): an `http(s)` URL with a host, no query or fragment (another is refused at start)."),
    "api_keys": ("", "Comma-separated API keys accepted besides those made by `filedrop keys create`."),
    "max_file_size": ("10G", "Largest file one upload may declare (X-File-Size). Over: 413."),
    "max_chunk_size": ("64M", "Largest request body of one upload/chunk. Over: 413. NGINX uses it too."),
    "chunk_size": ("8M", "Chunk size the drop page uploads in (`GET /api/limits`). Above `FILEDROP_MAX_CHUNK_SIZE`: "
                   "refused at start; unset: 8M, or `FILEDROP_MAX_CHUNK_SIZE` when that is smaller."),
    "max_files_per_batch": ("10000", "Most files one upload batch may hold. Over: 413."),
    "max_batch_bytes": ("50G", "Most declared bytes one upload batch may hold. Over: 413."),
    "max_chunks_per_file": ("10000", "Most chunks one file may be sent in (X-Upload-Chunk-Count), as S3 allows. Over: 413."),
    "min_free_disk": ("256M", "Free space the data dir must keep after a write. Under: 507."),
    "upload_sync_interval": ("1s", "Chunks answered 202 become power-loss durable within this (one sync for all)."),
    "batch_ttl": ("24h", "An upload batch idle this long expires (janitor removes it)."),
    "smartlink_root": ("<data_dir>/smartlinks", "Where smartlinks are written; NGINX's root."),
    "workers": ("<cores>", "`filedrop worker` processes `filedrop serve` runs (from its first job on); each renders in one limited child process. Default: the number of CPU cores (more contend for the disk: bench). 0: serve starts none (workers run elsewhere: `filedrop worker`, or `scripts/run` with `FILEDROP_APP_PROCESSES` over 1)."),
    "render_timeout": ("10s", "Wall time one row may take to render (and a template to compile at start). Over: the render process is killed; the row is tried once more, then errors."),
    "render_memory": ("512M", "Address space of each render process (RLIMIT_AS; at least 64M). Over: as for the time limit."),
    "check_processes": ("2", "Render processes that check a job start's template (compile it within `FILEDROP_RENDER_TIMEOUT` and `FILEDROP_RENDER_MEMORY`, each), started as needed and kept. An API key has one check running at a time, its other starts wait behind it (at most 8; more: 503 `ERR_SERVER_BUSY`), and a free process goes to the next key in turn: one key's slow templates do not hold up another key's starts."),
    "max_page_size": ("10M", "Largest page one row may publish. Over: the row errors."),
    "max_number_digits": ("4300", "Most decimal digits a number in a template may have (`**`, `*`, int/str conversion; at least 640, at most 2147483647). Over: the row errors. An integer of a job's JSON input (rows, `param.*`, the template) over it: 422 at start."),
    "job_asset_memory": ("16M", "Bytes of fetched assets a render process keeps in memory per job; all are stored under <data_dir>/assets/<job_id>/ until the job ends."),
    "max_data_size": ("50M", "Largest `data`/`data_file` a job accepts. Over: 413."),
    "min_suffix_length": ("16", "Shortest client-supplied smartlink suffix. Shorter: the row errors."),
    "fetch_allow": ("", "CIDRs/hosts outgoing fetches and callbacks may reach although internal: comma-separated networks, addresses or host names (a malformed address or network is refused at start)."),
    "fetch_timeout": ("20", "Seconds an outgoing asset/template fetch may take."),
    "fetch_max_bytes": ("20M", "Largest remote asset or template fetched."),
    "allow_http_callbacks": ("0", "Accept http:// callback URLs (local use and tests only)."),
    "callback_secret": ("", "HMAC-SHA256 secret for X-Filedrop-Signature (empty: a random one per start)."),
    "upload_url_ttl": ("8h", "How long a signed upload URL (a job's `upload_URL`, a presigned upload) lives unless `expires_in` says otherwise."),
    "download_url_ttl": ("1h", "How long a signed result download URL (`result?format=url`) lives unless `expires_in` says otherwise."),
    "max_url_ttl": ("7d", "Longest `expires_in` a signed URL may be given (and the ceiling of the two defaults above, and the life of a job e-mail's result link). Over: 422."),
    "callback_retries": ("5", "Attempts to deliver a job callback (and a job's e-mail) before giving up."),
    "callback_backoff": ("1", "First retry delay in seconds; doubles each attempt."),
    "smtp_host": ("127.0.0.1", "SMTP server for job e-mails."),
    "smtp_port": ("25", "SMTP port."),
    "smtp_from": ("filedrop@localhost", "From address of job e-mails (name@host, or Name <name@host>)."),
    "job_retention": ("30d", "Finished jobs older than this are removed by cleanup."),
    "janitor_interval": ("10m", "How often the in-server janitor runs (0 disables it)."),
    "janitor_smartlinks": ("0", "1: the in-server janitor also removes smartlinks, as `cleanup --smartlinks` does (an "
                           "expired job's own pages with its row; folders no job refers to). 0: pages stay until "
                           "`cleanup --smartlinks` or `drop --smartlinks`; with a server running, its janitor removes "
                           "an expired job's row first, so a later `cleanup --smartlinks` no longer knows that job's "
                           "pages (it still removes a folder no job refers to)."),
    "cleanup_grace": ("10m", "Cleanup never touches what was written more recently than this (uploads in flight, temp files); `cleanup --older-than` may not go below it."),
    "log_level": ("INFO", "Python logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case; another: exit 2 at start)."),
}


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./var")
    db_path: Path | None = None
    database_url: str = ""
    database_pool: int = 10
    app_processes: int = 1
    app_host: str = "127.0.0.1"
    app_port: int = 8081
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    page_port: int = 8079
    public_url: str = ""
    api_keys: tuple[str, ...] = ()
    max_file_size: int = 10 << 30
    max_chunk_size: int = 64 << 20
    chunk_size: int | None = None  # None (unset): see upload_chunk_size
    max_files_per_batch: int = 10000
    max_batch_bytes: int = 50 << 30
    max_chunks_per_file: int = 10000
    min_free_disk: int = 256 << 20
    upload_sync_interval: float = 1.0
    batch_ttl: float = 24 * 3600.0
    smartlink_root: Path | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    render_timeout: float = 10.0
    render_memory: int = 512 << 20
    check_processes: int = 2
    max_page_size: int = 10 << 20
    max_number_digits: int = 4300
    job_asset_memory: int = 16 << 20
    max_data_size: int = 50 << 20
    min_suffix_length: int = 16
    fetch_allow: tuple[str, ...] = ()
    fetch_timeout: float = 20.0
    fetch_max_bytes: int = 20 << 20
    allow_http_callbacks: bool = False
    callback_secret: str = ""
    callback_retries: int = 5
    callback_backoff: float = 1.0
    upload_url_ttl: float = 8 * 3600.0
    download_url_ttl: float = 3600.0
    max_url_ttl: float = 7 * 86400.0
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_from: str = "filedrop@localhost"
    job_retention: float = 30 * 86400.0
    janitor_interval: float = 600.0
    janitor_smartlinks: bool = False
    cleanup_grace: float = 600.0
    log_level: str = "INFO"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Derived paths are resolved once so every component agrees on them.
        data_dir = Path(self.data_dir).resolve()
        object.__setattr__(self, "data_dir", data_dir)
        object.__setattr__(
            self, "db_path", Path(self.db_path).resolve() if self.db_path else data_dir / "filedrop.sqlite3"
        )
        object.__setattr__(
            self,
            "smartlink_root",
            Path(self.smartlink_root).resolve() if self.smartlink_root else data_dir / "smartlinks",
        )
        if self.chunk_size is not None and not 1 <= self.chunk_size <= self.max_chunk_size:
            # Every chunk the page sends would be refused with 413: refuse the start instead.
            raise ValueError(f"FILEDROP_CHUNK_SIZE ({self.chunk_size} bytes) must be at least 1 byte and at most "
                             f"FILEDROP_MAX_CHUNK_SIZE ({self.max_chunk_size} bytes): lower FILEDROP_CHUNK_SIZE "
                             f"or raise FILEDROP_MAX_CHUNK_SIZE")
        if self.database_url:
            object.__setattr__(self, "database_url", check_database_url(self.database_url))
        if self.app_port + self.app_processes - 1 > 65535:
            raise ValueError(f"FILEDROP_APP_PORT {self.app_port} + FILEDROP_APP_PROCESSES {self.app_processes} "
                             "go past port 65535")
        if self.app_processes > 1 and not self.database_url:
            # SQLite serves one app process (its workers beside it); several share PostgreSQL.
            raise ValueError(f"FILEDROP_APP_PROCESSES={self.app_processes} needs PostgreSQL: set "
                             "FILEDROP_DATABASE_URL (postgresql+asyncpg://…), or FILEDROP_APP_PROCESSES=1 for SQLite")
        for name in ("upload_url_ttl", "download_url_ttl"):
            if getattr(self, name) > self.max_url_ttl:
                # Every URL made without expires_in would be refused: refuse the start instead.
                raise ValueError(f"FILEDROP_{name.upper()} ({getattr(self, name):g} s) is over FILEDROP_MAX_URL_TTL "
                                 f"({self.max_url_ttl:g} s): lower it or raise FILEDROP_MAX_URL_TTL")
        if not self.public_url:
            object.__setattr__(self, "public_url", f"http://127.0.0.1:{self.http_port}")
        if not self.callback_secret:
            object.__setattr__(self, "callback_secret", os.urandom(32).hex())

    @property
    def job_form_limit(self) -> int:
        """Largest job start form: the data rows (``max_data_size``), the master template
        (limited like a fetched one, ``fetch_max_bytes``) and small option parts; 1 MiB covers
        those and the multipart framing. The app and NGINX both enforce it."""
        return self.max_data_size + self.fetch_max_bytes + (1 << 20)

    @property
    def upload_chunk_size(self) -> int:
        """The chunk size clients are told to upload in (``GET /api/limits``): ``chunk_size`` when
        set (checked against ``max_chunk_size`` at construction), else 8 MiB, or ``max_chunk_size``
        when that is smaller (so lowering only the limit stays a valid configuration)."""
        return self.chunk_size if self.chunk_size is not None else min(DEFAULT_CHUNK_SIZE, self.max_chunk_size)

    # Paths the server derives itself: no client-supplied name ever becomes one of these.
    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def assets_dir(self) -> Path:
        """Fetched job assets, one directory per running job (removed when it ends)."""
        return self.data_dir / "assets"

    @property
    def app_ports(self) -> tuple[int, ...]:
        """The ports of the app processes behind NGINX: ``app_port`` and the ones after it."""
        return tuple(range(self.app_port, self.app_port + self.app_processes))

    @property
    def database(self) -> Path | str:
        """What the database layer opens (``server.db.Database``, the migrations): the PostgreSQL
        URL when one is set, else the SQLite file."""
        assert self.db_path is not None
        return self.database_url or self.db_path

    @property
    def results_dir(self) -> Path:
        """Result CSVs of finished jobs that signed download URLs serve (NGINX reads them through
        an internal location only)."""
        return self.data_dir / "results"

    @property
    def sync_db_url(self) -> str:
        """A synchronous SQLAlchemy URL of the same database (migrations, admin tools, tests)."""
        from server.db.urls import sync_url

        return sync_url(self.database)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """These settings as ``FILEDROP_*`` variables that ``from_env`` reads back to equal
        settings: how ``filedrop serve`` hands its own to the workers it starts."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None:
                continue  # unset (e.g. chunk_size): from_env leaves it unset too
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, tuple):
                text = ",".join(value)
            elif isinstance(value, float):
                text = format(value, "f")  # no exponent: parse_duration reads plain decimals
            else:
                text = str(value)
            env[f"FILEDROP_{f.name.upper()}"] = text
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``FILEDROP_*`` variables; raise ValueError naming a bad one."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"FILEDROP_{f.name.upper()}")
            if raw is None or (f.name in _PATHS and not raw):
                continue  # an empty path is unset, as scripts/run reads it (`FILEDROP_DATA_DIR=` was a TypeError)
            try:
                kwargs[f.name] = _convert(f.name, raw)
            except ValueError as e:
                raise ValueError(f"FILEDROP_{f.name.upper()}: {e}") from None
        kwargs.update(overrides)
        return cls(**kwargs)


_SIZES = {"max_file_size", "max_chunk_size", "chunk_size", "max_batch_bytes", "min_free_disk", "max_data_size",
          "fetch_max_bytes", "render_memory", "max_page_size", "job_asset_memory"}
_DURATIONS = {"upload_sync_interval", "batch_ttl", "job_retention", "janitor_interval", "fetch_timeout",
              "callback_backoff", "cleanup_grace", "render_timeout", "upload_url_ttl", "download_url_ttl",
              "max_url_ttl"}
_INTS = {"app_port", "http_port", "page_port", "max_files_per_batch", "max_chunks_per_file", "workers", "min_suffix_length",
         "callback_retries", "smtp_port", "max_number_digits", "database_pool", "app_processes",
         "check_processes"}
_INT_MIN = {"app_port": 1, "http_port": 1, "page_port": 1, "smtp_port": 1, "workers": 0, "max_files_per_batch": 1,
            "max_chunks_per_file": 1, "callback_retries": 1, "database_pool": 2, "app_processes": 1,
            "max_number_digits": 640, "check_processes": 1}  # 640: Python's own floor for int/str digits
# Upper bounds where one is needed: ports; processes behind one NGINX on consecutive ports; the
# digits a render process gives sys.set_int_max_str_digits (a C int: over it, every job start
# was a 500 with an OverflowError).
_INT_MAX = {"app_port": 65535, "http_port": 65535, "page_port": 65535, "smtp_port": 65535, "app_processes": 64,
            "check_processes": 64, "max_number_digits": 2**31 - 1}
# Floors of sizes and durations: a render process needs ~40 MB before any template runs; a row
# needs some time.
_SIZE_MIN = {"render_memory": 64 << 20, "max_page_size": 1,
             "max_chunk_size": 1}  # 0 refused every upload, and GET /api/limits told the page chunks of 0 bytes
_DURATION_MIN = {"render_timeout": 0.1, "upload_url_ttl": 1, "download_url_ttl": 1, "max_url_ttl": 1}
_PATHS = {"data_dir", "db_path", "smartlink_root"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _convert(name: str, raw: str) -> Any:
    if name in _SIZES:
        size = parse_size(raw)
        if size < _SIZE_MIN.get(name, 0):
            raise ValueError(f"{raw} is under the minimum {_SIZE_MIN[name]} bytes")
        return size
    if name in _DURATIONS:
        seconds = parse_duration(raw)
        if seconds < _DURATION_MIN.get(name, 0):
            raise ValueError(f"{raw} is under the minimum {_DURATION_MIN[name]:g} s")
        return seconds
    if name in _INTS:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"not a whole number: {raw!r}") from None
        low = _INT_MIN.get(name, 0)
        high = _INT_MAX.get(name)
        if value < low or (high is not None and value > high):
            raise ValueError(f"{value} is out of range (at least {low}{f', at most {high}' if high else ''})")
        return value
    if name in _PATHS:
        return Path(raw) if raw else None
    if name == "http_host":
        # NGINX's `listen` (and scripts/run's check that the port is free) takes an address; the
        # forms nginx.py writes unquoted: dotted IPv4, or IPv6 in hex (no zone, no embedded IPv4).
        host = raw.strip()
        try:
            ipaddress.ip_address(host)
        except ValueError:
            host = ""
        if not re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", host):
            raise ValueError(f"{raw!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0 or ::): NGINX listens on an "
                             "address, not a host name")
        return host
    if name == "smtp_from":
        # One address (a display name allowed): it becomes the From header and the envelope's
        # sender; a line break in it cut every message's headers short (or every send failed).
        if any(c in raw for c in "\r\n") or "@" not in parseaddr(raw.strip())[1]:
            raise ValueError(f"{raw!r} is not an e-mail address (name@host, or Name <name@host>)")
        return raw.strip()
    if name == "database_url":
        return check_database_url(raw.strip()) if raw.strip() else ""
    if name == "public_url":
        # Every result link and signed URL starts with it: without a scheme and a host (`foo`,
        # `links.example.com`) each one the server handed out was broken, and nothing said so.
        url = raw.strip()
        if url and not _http_url(url):
            raise ValueError(f"{raw!r} is not an http(s) URL (e.g. https://links.example.com, no query)")
        return url
    if name == "fetch_allow":
        entries = _split(raw)
        for e in entries:
            # Meant as an address or a network (digits and dots only are no host name): a typo
            # (`10.0.0.0/33`) was kept as a host name no fetch matches, so it let nothing through.
            if "/" in e or ":" in e or re.fullmatch(r"[0-9.]+", e):
                try:
                    ipaddress.ip_network(e, strict=False)
                except ValueError:
                    raise ValueError(f"{e!r} is not an IP address or network (e.g. 10.0.0.0/8, fd00::/8)") from None
            elif not re.fullmatch(r"[A-Za-z0-9_.-]+", e):
                raise ValueError(f"{e!r} is not a host name, an IP address or a network (separate entries with commas)")
        return entries
    if name == "api_keys":
        return _split(raw)
    if name in ("allow_http_callbacks", "janitor_smartlinks"):
        return _bool(raw)
    if name == "log_level":
        # logging.basicConfig takes only the upper-case names: `debug` would be a traceback.
        level = raw.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"{raw!r} is not a log level (use one of {', '.join(_LOG_LEVELS)})")
        return level
    return raw
