"""Signed URLs that expire, as S3's presigned URLs: whoever holds one may make exactly that
request (method, path and query) until its expiry, without an API key.

A URL carries ``expires`` (Unix seconds), ``kid`` (the key that signed it) and ``signature``:
hex HMAC-SHA256 under that key of

    filedrop-url-v1 \\n METHOD \\n path \\n the other query parameters, sorted and percent-encoded \\n owner

where ``owner`` is the owner the URL acts for. The owner is not in the URL (it is the SHA-256 of
an API key: a weak key's hash must not be published); the verifier finds it from the resource the
path names (``server.api.signed.SIGNED_ROUTES``), so a URL stops working if its resource is gone
or changed hands.

Invariants:
* Keys live in the database (``signing_keys``: 0600 with the rest of it, shared by every process
  and host of the server), never only in a process's memory: one is made on first use, a
  rotation (``filedrop secrets rotate``) adds a new one and gives the old ones a grace period
  during which their URLs still verify. Processes cache the keys for ``CACHE_TTL`` seconds, so a
  rotation is seen everywhere within that time.
* Verification is constant-time on the signature (``hmac.compare_digest``) and answers the same
  ``ERR_URL_INVALID`` whatever was wrong (a changed path, query, expiry, signature, an unknown
  key, a resource that does not exist), so it tells a prober nothing. Only a URL whose signature
  is right gets ``ERR_URL_EXPIRED`` once its expiry (or its key's grace period) has passed.
* A query parameter given twice is refused: one URL has one meaning.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from sqlalchemy import delete, select, update

from server.db import Database, utcnow
from server.db.signing_models import SigningKey
from server.errors import Unprocessable, UrlExpired, UrlInvalid

EXPIRES, KID, SIGNATURE = "expires", "kid", "signature"  # the query parameters a signed URL adds
CACHE_TTL = 5.0  # seconds a process trusts the keys it read (a rotation takes effect within it)
UNKNOWN_KID_RELOAD = 1.0  # an unknown kid reloads the keys at most this often (random kids are cheap)
_VERSION = "filedrop-url-v1"
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_KID_RE = re.compile(r"[0-9a-f]{1,16}")
_EXPIRES_RE = re.compile(r"[0-9]{1,12}")
INVALID = ("this URL's signature does not match it: its path, query or expiry was changed, or it was "
           "not signed by this server")


@dataclass(frozen=True)
class Key:
    kid: str
    secret: bytes
    created_at: datetime
    retires_at: datetime | None  # None: current; else it verifies until then

    def retired(self, now: datetime) -> bool:
        return self.retires_at is not None and self.retires_at <= now


@dataclass(frozen=True)
class Link:
    url: str
    expires: datetime  # naive UTC, whole seconds


def to_unix(dt: datetime) -> int:
    return int(dt.replace(tzinfo=UTC).timestamp())


def expiry_after(seconds: float) -> datetime:
    """Naive UTC ``seconds`` from now, in whole seconds (what a URL's ``expires`` can say)."""
    return (utcnow() + timedelta(seconds=seconds)).replace(microsecond=0)


def parse_expires_in(raw: str | None, default: float, ceiling: float) -> float:
    """``expires_in`` as a client gives it: whole seconds, 1 up to ``ceiling``
    (``FILEDROP_MAX_URL_TTL``); None or blank: ``default``. Unprocessable naming the field."""
    if raw is None or not raw.strip():
        return default
    v = raw.strip()
    if not v.isascii() or not v.isdigit() or len(v) > 12 or int(v) < 1:
        raise Unprocessable("expires_in must be a whole number of seconds, at least 1", field="expires_in")
    if int(v) > ceiling:
        raise Unprocessable(f"expires_in ({v} s) is over the {ceiling:g}-second limit (FILEDROP_MAX_URL_TTL)",
                            field="expires_in")
    return float(v)


def message(method: str, path: str, params: Iterable[tuple[str, str]], owner: str) -> bytes:
    """The bytes a signature covers (see the module docstring)."""
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(params))
    return "\n".join((_VERSION, method.upper(), path, query, owner)).encode("utf-8")


def _mac(key: Key, data: bytes) -> str:
    return hmac.new(key.secret, data, hashlib.sha256).hexdigest()


class SigningKeys:
    """The keyring: read from the database, cached for ``CACHE_TTL`` s."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._keys: dict[str, Key] = {}
        self._loaded = float("-inf")  # time.monotonic() of the last read

    async def _load(self) -> None:
        async with self.db.read() as s:
            rows = (await s.execute(select(SigningKey.kid, SigningKey.secret, SigningKey.created_at,
                                           SigningKey.retires_at))).all()
        self._keys = {r.kid: Key(r.kid, bytes.fromhex(r.secret), r.created_at, r.retires_at) for r in rows}
        self._loaded = time.monotonic()

    async def _fresh(self, max_age: float = CACHE_TTL) -> None:
        if time.monotonic() - self._loaded > max_age:
            await self._load()

    def _newest(self) -> Key | None:
        current = [k for k in self._keys.values() if k.retires_at is None]
        return max(current, key=lambda k: (k.created_at, k.kid)) if current else None

    async def current(self) -> Key:
        """The key that signs now: the newest one not rotated out, made on first use. Two
        processes making one at once both succeed; each key verifies its own URLs."""
        await self._fresh()
        key = self._newest()
        if key is None:
            async with self.db.write() as s:
                if await s.scalar(select(SigningKey.kid).where(SigningKey.retires_at.is_(None)).limit(1)) is None:
                    s.add(SigningKey(kid=secrets.token_hex(4), secret=secrets.token_hex(32), created_at=utcnow()))
            await self._load()
            key = self._newest()
            assert key is not None
        return key

    async def find(self, kid: str) -> Key | None:
        await self._fresh()
        if kid not in self._keys:
            await self._fresh(UNKNOWN_KID_RELOAD)  # made by another process since our last read?
        return self._keys.get(kid)

    async def all(self) -> list[Key]:
        await self._load()
        return sorted(self._keys.values(), key=lambda k: (k.created_at, k.kid))

    async def rotate(self, grace: float, forget_after: float) -> tuple[Key, list[Key]]:
        """A new current key; every older one keeps verifying for ``grace`` seconds from now (a
        grace shorter than one given before shortens that one too: ``--grace 0`` after a leak
        stops every old URL at once). Keys retired more than ``forget_after`` s ago are deleted
        (their URLs are then invalid rather than expired). Returns (new key, the older ones kept)."""
        now = utcnow()
        until = now + timedelta(seconds=grace)
        new = SigningKey(kid=secrets.token_hex(4), secret=secrets.token_hex(32), created_at=now)
        async with self.db.write() as s:
            await s.execute(delete(SigningKey).where(SigningKey.retires_at < now - timedelta(seconds=forget_after)))
            await s.execute(update(SigningKey).where(SigningKey.retires_at.is_(None)).values(retires_at=until))
            await s.execute(update(SigningKey).where(SigningKey.retires_at > until).values(retires_at=until))
            s.add(new)
        await self._load()
        return self._keys[new.kid], sorted((k for k in self._keys.values() if k.kid != new.kid),
                                           key=lambda k: (k.created_at, k.kid))


RESULT_PATH = "/api/batch/{batch_id}/{job_id}/result"  # a job's result; its signed link takes format=csv


class Signer:
    """Makes and checks signed URLs under ``public_url`` (``FILEDROP_PUBLIC_URL``)."""

    def __init__(self, keys: SigningKeys, public_url: str) -> None:
        self.keys = keys
        self.public_url = public_url.rstrip("/")

    async def result_link(self, batch_id: str, job_id: str, owner: str, expires: datetime) -> Link:
        """The signed download of a job's result as CSV: ``?format=url``'s answer and the job
        e-mail's link."""
        return await self.link("GET", RESULT_PATH.format(batch_id=batch_id, job_id=job_id), owner, expires,
                               {"format": "csv"})

    async def link(self, method: str, path: str, owner: str, expires: datetime,
                   params: dict[str, str] | None = None) -> Link:
        """A URL for ``method`` on ``path`` (``params`` are part of what is signed), acting for
        ``owner``, valid until ``expires`` (naive UTC, whole seconds)."""
        key = await self.keys.current()
        signed = {**(params or {}), EXPIRES: str(to_unix(expires)), KID: key.kid}
        sig = _mac(key, message(method, path, signed.items(), owner))
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(signed.items()))
        return Link(f"{self.public_url}{path}?{query}&{SIGNATURE}={sig}", expires)

    async def verify(self, method: str, path: str, query: Iterable[tuple[str, str]], owner: str | None) -> None:
        """Return if the request (``path`` as it arrived, undecoded; every query parameter) is one
        a live key signed for ``owner`` and its expiry is ahead; else raise UrlInvalid or
        UrlExpired. ``owner`` None: the URL's resource does not exist (invalid)."""
        items = list(query)
        names = [k for k, _ in items]
        if len(names) != len(set(names)):
            raise UrlInvalid("a signed URL names each query parameter once")
        params = dict(items)
        sig, kid, expires = params.pop(SIGNATURE, ""), params.get(KID, ""), params.get(EXPIRES, "")
        if not (_SIGNATURE_RE.fullmatch(sig) and _KID_RE.fullmatch(kid) and _EXPIRES_RE.fullmatch(expires)):
            raise UrlInvalid(f"a signed URL carries {EXPIRES}, {KID} and {SIGNATURE} as this server made them")
        key = await self.keys.find(kid)
        if owner is None or key is None:
            raise UrlInvalid(INVALID)
        if not hmac.compare_digest(_mac(key, message(method, path, params.items(), owner)), sig):
            raise UrlInvalid(INVALID)
        if int(expires) <= time.time():
            raise UrlExpired(f"this URL expired at {datetime.fromtimestamp(int(expires), UTC):%Y-%m-%dT%H:%M:%SZ}")
        if key.retired(utcnow()):
            raise UrlExpired(f"this URL was signed with key {kid}, rotated out at "
                             f"{key.retires_at:%Y-%m-%dT%H:%M:%SZ} (`filedrop secrets rotate`): ask for a new one")
