"""The fetch guard: every outgoing request a client can steer (remote assets, master templates,
callbacks) goes through here.

Invariants:
* only ``http``/``https`` URLs; one that does not parse (a port that is not a number 0-65535, an
  unbalanced or bad ``[...]`` host, a host name the idna codec refuses, a control character
  anywhere) is refused like any other, as ``FetchRefused``: nothing here raises a bare
  ValueError for a client's URL;
* the host is resolved and every address it resolves to must be public (global, and not loopback,
  private, shared, link-local, multicast, reserved or unspecified) unless ``settings.fetch_allow`` admits it
  (a CIDR, an address, or a host name);
* the connection goes to an address that passed the check: names are resolved through
  ``GuardedResolver`` (so a DNS answer that changes between check and connect is checked
  again), IP literals are checked before the request, redirects are followed by hand (at most
  ``MAX_REDIRECTS``) and each hop is checked;
* bodies are read up to ``max_bytes`` (a callback's answer: not at all, its status is all) and the
  whole exchange is bounded by ``fetch_timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

MAX_REDIRECTS = 5
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# C0 and DEL are in no URL (RFC 3986). urlsplit drops tab, CR and LF without a word (the URL
# checked would not be the one given, nor the one aiohttp sends), and PostgreSQL refuses a NUL
# in a stored callback_url.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FetchError(Exception):
    """A fetch that was refused or failed; the message is safe to show to the job's owner."""


class FetchRefused(FetchError):
    """The guard refuses the URL itself (scheme, an internal address, a URL that does not
    parse): trying again later cannot help, so a start refuses such a ``callback_url`` at once."""


@dataclass(frozen=True)
class AllowList:
    networks: tuple[IPNetwork, ...]
    hosts: frozenset[str]

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> AllowList:
        nets: list[IPNetwork] = []
        hosts: set[str] = set()
        for e in entries:
            try:
                nets.append(ipaddress.ip_network(e, strict=False))
            except ValueError:
                hosts.add(e.lower().rstrip("."))
        return cls(tuple(nets), frozenset(hosts))

    def admits_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def admits(self, addr: IPAddress) -> bool:
        return any(addr in n for n in self.networks if n.version == addr.version)


def is_internal(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_site_local:  # fec0::/10: deprecated, yet IPv6's 10.0.0.0/8 where still in use
            return True
        # An IPv6 address that carries an IPv4 one (mapped, 6to4) is judged by that address.
        addr = addr.ipv4_mapped or addr.sixtofour or addr
    # not is_global: also the ranges that are neither private nor public, e.g. shared address
    # space 100.64.0.0/10 (carrier NAT; some clouds' metadata service lives at 100.100.100.200).
    return (not addr.is_global or addr.is_loopback or addr.is_private or addr.is_link_local
            or addr.is_multicast or addr.is_reserved or addr.is_unspecified)


def check_address(allow: AllowList, host: str, address: str) -> None:
    addr = ipaddress.ip_address(address.split("%", 1)[0])
    if is_internal(addr) and not allow.admits(addr) and not allow.admits_host(host):
        raise FetchRefused(f"refused: {host} resolves to the internal address {addr}")


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses internal addresses."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self.inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for r in results:
            try:
                check_address(self.allow, host, r["host"])
            except FetchError as e:
                # OSError so that aiohttp reports it as a connection error.
                raise OSError(str(e)) from None
        return results

    async def close(self) -> None:
        await self.inner.close()


class Fetcher:
    """An aiohttp session behind the guard. Create and ``close()`` inside a running loop."""

    def __init__(self, allow: tuple[str, ...], timeout: float, max_bytes: int) -> None:
        self.allow = AllowList.parse(allow)
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.allow), limit=32),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def close(self) -> None:
        await self.session.close()

    async def check_url(self, url: str) -> None:
        """Raise FetchRefused if the guard refuses ``url`` now (FetchError if its host does
        not resolve). A URL that cannot be parsed is refused too (never a ValueError): it
        cannot become valid later, and a fetch that raised anything else was taken for a fault
        of ours and tried again."""
        control = _CONTROL.search(url)
        if control:
            raise FetchRefused(f"refused: {url!r} is not a valid URL: it holds the control character "
                               f"U+{ord(control.group()):04X}")
        try:
            parts = urlsplit(url)  # ValueError: an unbalanced [, a [...] that is no IPv6 address
            host, port = parts.hostname, parts.port  # ValueError: a port not a number 0-65535
        except ValueError as e:
            raise FetchRefused(f"refused: {url!r} is not a valid URL: {e}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise FetchRefused(f"refused: {url!r} is not an http(s) URL")
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            # A name: checked now for a clear message, and again by GuardedResolver at connect.
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
            except UnicodeError as e:  # the idna codec (a label empty or over 63 characters): not an OSError
                raise FetchRefused(f"refused: {url!r} is not a valid URL: the host name {host!r} "
                                   f"cannot be encoded ({e.__cause__ or e})") from None
            except OSError as e:
                raise FetchError(f"cannot resolve {host}: {e}") from None
            for info in infos:
                check_address(self.allow, host, str(info[4][0]))
        else:
            check_address(self.allow, host, host)

    async def get(self, url: str, max_bytes: int | None = None) -> bytes:
        """GET ``url`` (following checked redirects); the body, at most ``max_bytes`` long."""
        buf = bytearray()
        await self._get(url, buf.extend, max_bytes)
        return bytes(buf)

    async def download(self, url: str, out: BinaryIO, max_bytes: int | None = None) -> int:
        """GET ``url`` into the open file ``out`` (never whole in memory); the bytes written.
        Writes are small (64 KiB) and go to the page cache: not worth a thread each."""
        size = 0

        def write(chunk: bytes) -> None:
            nonlocal size
            out.write(chunk)
            size += len(chunk)

        await self._get(url, write, max_bytes)
        return size

    async def _get(self, url: str, sink: Callable[[bytes], object], max_bytes: int | None) -> None:
        limit = self.max_bytes if max_bytes is None else max_bytes
        which = " (FILEDROP_FETCH_MAX_BYTES)" if max_bytes is None else ""  # every limit's error names it
        try:
            async with asyncio.timeout(self.timeout):
                for _hop in range(MAX_REDIRECTS + 1):
                    await self.check_url(url)
                    async with self.session.get(url, allow_redirects=False) as resp:
                        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                            url = _redirect(url, resp.headers["Location"])
                            continue
                        if resp.status != 200:
                            raise FetchError(f"GET {url} answered {resp.status}")
                        if (resp.content_length or 0) > limit:
                            raise FetchError(f"GET {url}: {resp.content_length} bytes is over the {limit}-byte limit{which}")
                        got = 0
                        async for chunk in resp.content.iter_chunked(1 << 16):
                            got += len(chunk)
                            if got > limit:
                                raise FetchError(f"GET {url}: over the {limit}-byte limit{which}")
                            sink(chunk)
                        return
                raise FetchError(f"GET {url}: more than {MAX_REDIRECTS} redirects")
        except TimeoutError:
            raise FetchError(f"GET {url}: no answer within {self.timeout:g} s (FILEDROP_FETCH_TIMEOUT)") from None
        except aiohttp.ClientError as e:
            raise FetchError(f"GET {url}: {e.__class__.__name__}: {e}") from None

    async def post(self, url: str, body: bytes, headers: dict[str, Any]) -> int:
        """POST ``body`` to ``url`` (no redirects); the response status."""
        return await self.send("POST", url, headers, body)

    async def send(self, method: str, url: str, headers: dict[str, Any], body: bytes | None = None) -> int:
        """``method`` ``url`` with ``body`` (no redirects: a callback is called where it says);
        the response status. The response's body is not read: the status is the answer, and a
        body that is huge, endless or slow to come would fill memory or run into the timeout
        (the connection, its body unread, is closed rather than reused)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.check_url(url)
                async with self.session.request(method, url, data=body, headers=headers,
                                                allow_redirects=False) as resp:
                    return resp.status
        except TimeoutError:
            raise FetchError(f"{method} {url}: no answer within {self.timeout:g} s (FILEDROP_FETCH_TIMEOUT)") from None
        except aiohttp.ClientError as e:
            raise FetchError(f"{method} {url}: {e.__class__.__name__}: {e}") from None


def _redirect(url: str, location: str) -> str:
    """Where a redirect from ``url`` leads; FetchRefused if ``location`` cannot be parsed."""
    try:
        return urljoin(url, location)  # ValueError: an unbalanced [ (check_url sees the rest)
    except ValueError as e:
        raise FetchRefused(f"refused: GET {url} redirects to {location!r}, which is not a valid URL: {e}") from None
