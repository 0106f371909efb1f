"""API keys: ``X-API-Key``, Nuxeo's ``X-Authentication-Token``, the password of HTTP Basic, or a Bearer token.

Keys come from ``FILEDROP_API_KEYS`` and from ``filedrop keys create NAME`` (stored as SHA-256).
A request's owner is the SHA-256 of its key, so a batch belongs to the key that created it.
No valid key: 401 with an empty body and ``WWW-Authenticate: Basic realm="filedrop"`` (as Nuxeo
answers), except to a browser (``from_browser``), which is never challenged: the login its dialog
takes is kept for the origin and sent with every later request there, tenants' smartlinks'
included (they share the public port with the API), so no browser may ever hold one.
``Authorization: Bearer KEY`` is accepted too.

A signed URL (``server.signing``) takes the place of a key on the routes of ``SIGNED_ROUTES``
only, and for exactly the method (a HEAD: GET), path and query it was signed for: a request
there with a ``signature`` parameter is judged by it alone (403 ``ERR_URL_INVALID`` /
``ERR_URL_EXPIRED``, one INFO line), and acts for the owner of the resource the path names,
while that owner's key is accepted: a revoked key's URLs stop with it (``ERR_URL_INVALID``,
within the 5 s a lookup is trusted).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from server.db import Database, utcnow
from server.db.models import ApiKey
from server.errors import Forbidden, KeyNameInvalid, KeyNameTaken, UrlInvalid
from server.keys import KEYSTORE, OWNER, SIGNED, SIGNED_ROUTES, SIGNER, OwnerLookup
from server.signing import SIGNATURE

log = logging.getLogger("filedrop.auth")

# Paths answered without a key: the nuxeo client's reachability/version probes, health, and the
# API's description (it holds no data, only the routes and this server's limits).
PUBLIC_PATHS = frozenset({"/runningstatus", "/nuxeo/runningstatus", "/json/cmis", "/nuxeo/json/cmis", "/healthz",
                          "/api/openapi.json"})
_MAX_NAME = 200  # characters of a key name (the column's size)
_CACHE_TTL = 5.0  # seconds a database key lookup is trusted (revocation takes effect within it)


def hash_key(key: str) -> str:
    # surrogateescape: a header's bytes that are not UTF-8 reach us as lone surrogates (aiohttp);
    # such a key is hashed as the bytes it was, and matches no key.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    return "fd_" + secrets.token_urlsafe(32)


class KeyStore:
    def __init__(self, db: Database, env_keys: tuple[str, ...]) -> None:
        self.db = db
        self.env_hashes = frozenset(hash_key(k) for k in env_keys)
        self._cache: dict[str, tuple[bool, float]] = {}

    async def owner_for(self, key: str) -> str | None:
        """The owner id of a valid key, else None."""
        if not key:
            return None
        h = hash_key(key)
        return h if await self.live(h) else None

    async def live(self, h: str) -> bool:
        """Whether the key of owner id ``h`` is accepted now (configured, or made and not revoked)."""
        if any(hmac.compare_digest(h, e) for e in self.env_hashes):
            return True
        hit = self._cache.get(h)
        now = time.monotonic()
        if hit is None or hit[1] < now:
            async with self.db.read() as s:
                row = await s.scalar(select(ApiKey.id).where(ApiKey.key_hash == h, ApiKey.revoked_at.is_(None)))
            hit = (row is not None, now + _CACHE_TTL)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[h] = hit
        return hit[0]

    async def create(self, name: str) -> str:
        """Make a key, store its hash, return the key (shown once). Names are unique for good,
        revoked keys' included (a name in a log must mean one key): KeyNameTaken, and
        KeyNameInvalid for a blank name, one with control characters or over 200 characters."""
        if not name.strip() or not name.isprintable() or len(name) > _MAX_NAME:
            raise KeyNameInvalid(f"a key name is 1-{_MAX_NAME} printable characters, not only spaces: {name!r}")
        key = new_key()
        try:
            async with self.db.write() as s:
                taken = await s.scalar(select(ApiKey.revoked_at.is_not(None)).where(ApiKey.name == name))
                if taken is not None:
                    raise KeyNameTaken(f"a key named {name!r} already exists{' (revoked)' if taken else ''}: "
                                       "names are never reused, choose another")
                s.add(ApiKey(name=name, key_hash=hash_key(key), created_at=utcnow()))
        except IntegrityError:  # made by another process since the check
            raise KeyNameTaken(f"a key named {name!r} already exists: choose another name") from None
        return key


def credential_from(request: web.Request) -> str:
    for header in ("X-API-Key", "X-Authentication-Token"):
        value = request.headers.get(header)
        if value:
            return value.strip()
    auth = request.headers.get("Authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
        except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 (UnicodeDecodeError)
            return ""
        _user, _, password = decoded.partition(":")
        return password
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return ""


def from_browser(request: web.Request) -> bool:
    """Whether a browser sent the request: it carries a ``Sec-Fetch-*`` header (set by browsers
    only; a page's script cannot), or its User-Agent starts with ``Mozilla/`` (every browser's
    does: Chrome sends ``Sec-Fetch-*`` to https and localhost origins only; the nuxeo client's,
    curl's, urllib's and requests' do not)."""
    return request.headers.get("User-Agent", "").startswith("Mozilla/") or \
        any(name.lower().startswith("sec-fetch-") for name in request.headers)


def unauthorized(request: web.Request) -> web.Response:
    """401 with an empty body; the Basic challenge only to a program (urllib's
    HTTPBasicAuthHandler sends its password only in answer to one), never to a browser."""
    if from_browser(request):
        return web.Response(status=401)
    return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="filedrop"'})


def signed_method(request: web.Request) -> str:
    """The method a signed URL must have been made for to allow this request: HEAD is GET without
    the body (RFC 9110, 9.3.2), so a URL signed for GET allows HEAD too (and GET's alone does)."""
    return "GET" if request.method == "HEAD" else request.method


def signed_route(request: web.Request) -> OwnerLookup | None:
    """The owner lookup of the request's route when it takes signed URLs (else None)."""
    if SIGNATURE not in request.query:
        return None
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return request.app[SIGNED_ROUTES].get((signed_method(request), resource.canonical))


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    lookup = signed_route(request)
    if lookup is not None:
        owner = await lookup(request.app, request.match_info)
        try:
            await request.app[SIGNER].verify(signed_method(request), request.rel_url.raw_path, request.query.items(),
                                             owner)
        except Forbidden as e:
            log.info("signed URL refused: %s %s: %s", request.method, request.path, e.message)
            raise
        assert owner is not None  # verify refuses a URL whose resource has no owner
        if not await request.app[KEYSTORE].live(owner):  # revoked (or unconfigured) since it signed
            log.info("signed URL refused: %s %s: its key was revoked", request.method, request.path)
            raise UrlInvalid("the API key this URL was made with was revoked; ask its holder for a new URL")
        request[OWNER] = owner
        request[SIGNED] = True
        return await handler(request)
    owner = await request.app[KEYSTORE].owner_for(credential_from(request))
    if owner is None:
        return unauthorized(request)
    request[OWNER] = owner
    return await handler(request)
