"""Helpers for the signed-URL tests: a start that waits for its data, a URL taken apart and
changed, a real receiver of GET notifications on 127.0.0.1 (stdlib server in a thread, for
tests that drive a real server with blocking clients), and the notification's signature as a
receiver checks it."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests.support.waiting import free_port

NOTIFIED = ("batch_id", "job_id", "status", "succeededCount", "erroredCount")


def path_of(url: str) -> str:
    """``/path?query`` of an absolute URL."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def params_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def with_param(url: str, name: str, value: str) -> str:
    """``url`` with the query parameter ``name`` set to ``value`` (the others kept, in order)."""
    parts = urlsplit(url)
    q = [(k, value if k == name else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return parts._replace(query=urlencode(q)).geturl()


def flip_last(hex_text: str) -> str:
    return hex_text[:-1] + ("0" if hex_text[-1] != "0" else "1")


def valid_get_notification(query: str, secret: str) -> dict[str, str]:
    """A GET notification's parameters, once its signature (over the five parameters,
    form-encoded in order, as the README tells a receiver to check) is found valid."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    signed = urlencode([(k, params[k]) for k in NOTIFIED])
    expected = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()
    assert hmac.compare_digest(params["signature"], expected), (query, signed)
    return params


@dataclass
class GetReceiver:
    """Records every request (method, path?query, headers); answers 204."""

    port: int = 0
    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    got: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/batch-file?token=abc"


@contextmanager
def get_receiver() -> Iterator[GetReceiver]:
    rcv = GetReceiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            rcv.calls.append((self.command, self.path, dict(self.headers)))
            self.send_response(204)
            self.end_headers()
            rcv.got.set()

        do_GET = do_POST = _record  # noqa: N815 (http.server's names)

        def log_message(self, *args: Any) -> None:
            pass

    rcv.port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", rcv.port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="get-receiver", daemon=True)
    thread.start()
    try:
        yield rcv
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def app_and_front(server_factory: Any, nginx_factory: Any, data_dir: Any, api_key: str,
                  **settings: str) -> tuple[Any, Any]:
    """A real ``filedrop serve`` behind NGINX, both with ``settings`` (the NGINX limits too:
    ``tests.support.nginx.app_behind_nginx`` renders NGINX with the defaults)."""
    from server.config import Settings
    from tests.support.waiting import free_port

    http_port = free_port()
    srv = server_factory(data_dir, public_url=f"http://127.0.0.1:{http_port}", **settings)
    env = {f"FILEDROP_{k.upper()}": v for k, v in settings.items()}
    front = nginx_factory(Settings.from_env(env, data_dir=data_dir, api_keys=(api_key,)), app_port=srv.port,
                          http_port=http_port)
    return srv, front
