"""Real NGINX for tests: the project's own nginx.conf rendered into a tmp prefix on free ports,
started as a normal process (``nginx -p PREFIX -c PREFIX/nginx.conf -g 'daemon off;'``), stopped
at teardown. Every wait is bounded.

``fetch()`` speaks raw HTTP/1.1 through ``http.client`` so a test can send a path exactly as
written (``/b/%2e%2e/x``, ``//x``, a backslash): higher-level clients normalise those away.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import subprocess
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from server import nginx as nginx_conf
from server.config import Settings
from tests.support.waiting import free_port, wait_until


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise AssertionError("nginx is not installed: scripts/setup installs it (apt-get install nginx-light)")
    return found


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def fetch(port: int, method: str, path: str, headers: dict[str, str] | None = None,
          body: bytes | None = None, timeout: float = 10.0) -> Reply:
    """One request on a fresh connection; ``path`` goes on the request line unchanged."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True,
                        skip_host=any(k.lower() == "host" for k in (headers or {})))
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return Reply(r.status, r.headers, r.read())
    finally:
        conn.close()


class NginxProcess:
    """One NGINX master (+ workers) over a rendered prefix."""

    def __init__(self, prefix: Path, settings: Settings, port: int, page_port: int | None = None) -> None:
        self.prefix = prefix
        self.settings = settings
        self.port = port
        self.page_port = page_port or free_port(port, *settings.app_ports)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = nginx_conf.render(settings, prefix, listen=f"127.0.0.1:{port}",
                                      page_listen=f"127.0.0.1:{self.page_port}")

    @property
    def url(self) -> str:
        """The public port's origin: smartlinks and the API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def page_url(self) -> str:
        """The drop page's origin (and the API again)."""
        return f"http://127.0.0.1:{self.page_port}"

    @property
    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start(self, timeout: float = 10.0) -> NginxProcess:
        cmd = [nginx_binary(), "-p", str(self.prefix), "-c", str(self.conf), "-g", "daemon off;"]
        test = subprocess.run([*cmd[:5], "-t", "-q"], capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise AssertionError(f"nginx -t refused the rendered config: {test.stderr}")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=timeout, what=f"nginx on {self.url} ({self.prefix})")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise NginxExited(self.proc.returncode, self.error_log)
        try:
            # Any HTTP answer means a worker is up (the drop page, or a 404 if web/ were missing),
            # on both ports (the public one redirects `/` to the page's).
            return (fetch(self.page_port, "GET", "/", timeout=1).status in (200, 404)
                    and fetch(self.port, "GET", "/", timeout=1).status == 302)
        except (OSError, http.client.HTTPException):
            return False

    def fetch(self, method: str, path: str, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> Reply:
        return fetch(self.port, method, path, headers, body)

    def fetch_page(self, method: str, path: str, headers: dict[str, str] | None = None,
                   body: bytes | None = None) -> Reply:
        """A request to the drop page's port."""
        return fetch(self.page_port, method, path, headers, body)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown: master and workers exit
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class NginxExited(AssertionError):
    def __init__(self, code: int, log: str) -> None:
        super().__init__(f"nginx exited with {code}: {log}")
        self.log = log


class NginxFactory:
    """Starts NGINX processes under ``base``; ``stop_all()`` at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[NginxProcess] = []

    def start(self, settings: Settings, *, app_port: int | None = None, http_port: int | None = None) -> NginxProcess:
        """NGINX in front of ``settings.smartlink_root`` and an app on ``app_port`` (default: a
        free port where nothing listens, i.e. the app is down), on ``http_port`` (default: free;
        give one when the app must know it beforehand, e.g. for FILEDROP_PUBLIC_URL)."""
        for _attempt in range(1 if http_port else 3):
            port = http_port or free_port()
            s = settings.replace(http_port=port, app_host="127.0.0.1", app_port=app_port or free_port(port))
            proc = NginxProcess(self.base / f"nginx-{len(self.started)}", s, port)
            self.started.append(proc)
            try:
                return proc.start()
            except NginxExited as e:
                # Another process took the free port between probe and bind: try another.
                if "Address already in use" not in e.log:
                    raise
        raise AssertionError(f"could not bind nginx to a free port ({http_port or 'tried 3'})")

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()


def wait_served(proc: subprocess.Popen[bytes], port: int, path: str, prefix: Path, what: str) -> None:
    """Wait (bounded) until an NGINX started by hand answers ``path`` with 200; fail with its
    error log if it exits first."""

    def served() -> bool:
        assert proc.poll() is None, (prefix / "logs" / "error.log").read_text()
        try:
            return fetch(port, "GET", path, timeout=1).status == 200
        except OSError:
            return False

    wait_until(served, timeout=10, what=what)


def app_behind_nginx(server_factory: Any, nginx_factory: Any, data_dir: Path, api_key: str,
                     **settings: str) -> tuple[Any, NginxProcess]:
    """A real ``filedrop serve`` (``server_factory``, its data in ``data_dir``) behind NGINX
    (``nginx_factory``), the app publishing links under NGINX's address."""
    http_port = free_port()
    srv = server_factory(data_dir, public_url=f"http://127.0.0.1:{http_port}", **settings)
    front = nginx_factory(Settings(data_dir=data_dir, api_keys=(api_key,)), app_port=srv.port, http_port=http_port)
    return srv, front
