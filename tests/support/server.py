"""The real server as a subprocess (``python -m server serve``), for clients that block
(the nuxeo client) and for crash tests (``kill -9``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.waiting import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = int(env["FILEDROP_APP_PORT"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115  (closed with the process)
        self.proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._healthy, timeout=timeout, what=f"server on {self.url} (log: {self.log_path})")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def server_env(data_dir: Path, api_key: str, **settings: str) -> dict[str, str]:
    """Environment for a server subprocess: this one minus FILEDROP_*, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update({
        "FILEDROP_DATA_DIR": str(data_dir),
        "FILEDROP_APP_PORT": str(free_port()),
        "FILEDROP_API_KEYS": api_key,
        "FILEDROP_MIN_FREE_DISK": "1M",
        "FILEDROP_JANITOR_INTERVAL": "0",
        "FILEDROP_FETCH_ALLOW": "127.0.0.1",
        "FILEDROP_ALLOW_HTTP_CALLBACKS": "1",
    })
    env.update({f"FILEDROP_{k.upper()}": v for k, v in settings.items()})
    return env
