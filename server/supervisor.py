"""``scripts/run``'s supervisor: NGINX in front, the app behind it, both kept running.

``python -m server.supervisor`` (after ``scripts/setup``; settings from ``FILEDROP_*``):

1. renders ``nginx.conf`` into ``<data_dir>/nginx`` and has ``nginx -t`` check it;
2. starts NGINX and waits until it answers on ``FILEDROP_HTTP_HOST:FILEDROP_HTTP_PORT``, then
   the app (``filedrop serve``, which starts its own workers) until its ``/healthz`` answers.
   Only then does it print where they listen. A port that is taken is reported before anything
   starts: which process wanted it, which port, who holds it (when this user may see that),
   and the setting to change. A child that exits before it ever answered ends the run;
3. from then on, a child that exits (a crash, ``kill -9``) is restarted after a delay that
   doubles from 1 s up to 30 s (back to 1 s once it has run for a minute), each step logged.
   NGINX keeps serving the smartlinks while the app is down (it answers the API 503);
4. SIGINT/SIGTERM/SIGHUP stop everything: the app first (its graceful shutdown), then NGINX;
   whatever is left of a child's process group (its workers) after 15 s is killed.

Each child runs in its own session: the terminal's Ctrl-C reaches only the supervisor, so the
app's graceful shutdown is not cut short by a second signal, and a restart can kill whatever
a dead app left behind (workers) by process group.

``FILEDROP_APP_PROCESSES=N`` (over 1, PostgreSQL only): N app processes on ``FILEDROP_APP_PORT``
and the N-1 ports after it, each a child of its own, behind NGINX's ``upstream`` (round-robin);
they start no workers (``FILEDROP_WORKERS=0`` for them) and the supervisor runs the
``FILEDROP_WORKERS`` ``filedrop worker`` processes itself, each a child restarted like the
others. A child that dies is restarted alone: NGINX sends the API to the other app processes
meanwhile, and the workers hand a dead worker's rows back to the queue.

Production hosts use systemd instead (``python -m server.nginx units``): the same commands,
restarted by systemd.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from server import nginx as ngx
from server.config import Settings
from server.jobs.lifeline import death_signal

FIRST_DELAY = 1.0  # seconds before the first restart; doubles per failure
MAX_DELAY = 30.0
STABLE_AFTER = 60.0  # a child up this long is healthy again: its next restart waits FIRST_DELAY
START_TIMEOUT = 60.0  # seconds a child gets to answer at the first start
STOP_TIMEOUT = 15.0
TICK = 0.1  # the supervision loop's poll interval


def say(message: str) -> None:
    print(f"filedrop: {message}", file=sys.stderr, flush=True)


def port_holder(port: int) -> str | None:
    """``pid N (command)`` of a process listening on TCP ``port``, when /proc lets this user see
    it (root sees all); else None."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])  # state 0A = LISTEN
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                            errors="replace").strip()
                        return f"pid {pid} ({cmd[:80]})"
    return None


def port_taken(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound right now because something listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as NGINX and asyncio bind
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def http_ok(host: str, port: int, path: str, expect: Callable[[int], bool]) -> bool:
    """One GET with a 1 s timeout; True when the status satisfies ``expect``."""
    conn = http.client.HTTPConnection(host, port, timeout=1)  # with a port given, an IPv6 host takes no brackets
    try:
        conn.request("GET", path)
        return expect(conn.getresponse().status)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass
class Child:
    """One supervised process (its own session and process group)."""

    name: str  # as the messages say it: "NGINX", "the app", "app process 2", "worker 1"
    argv: list[str]
    host: str
    port: int | None  # None: listens nowhere (a worker)
    setting: str  # what to change when the port is taken
    probe: Callable[[], bool]  # answers?
    env: dict[str, str] | None = None  # None: the supervisor's own
    more_ports: tuple[tuple[int, str], ...] = ()  # (port, its setting): other ports it listens on (host's)
    note: str = ""  # said when it is restarted
    proc: subprocess.Popen[bytes] | None = None
    up_since: float | None = None  # when the probe first answered, this start
    delay: float = FIRST_DELAY
    restart_at: float | None = None
    restarts: int = 0

    def start(self) -> None:
        self.kill_group()  # whatever a dead predecessor left (NGINX workers, app workers)
        # SIGTERM (a graceful stop) when the supervisor dies, even by SIGKILL: each child is in a
        # session of its own, and orphans would hold the ports and be found by the next run.
        self.proc = subprocess.Popen(self.argv, start_new_session=True, env=self.env,
                                     preexec_fn=death_signal(signal.SIGTERM))
        self.up_since = None
        self.restart_at = None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def alive_group(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


class Supervisor:
    def __init__(self, children: Sequence[Child]) -> None:
        self.children = list(children)
        self.stop_signal: int | None = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum

    def run(self, on_ready: Callable[[], None]) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            for child in self.children:
                ports = ((child.port, child.setting), *child.more_ports) if child.port is not None else ()
                for port, setting in ports:
                    if port_taken(child.host, port):
                        holder = port_holder(port)
                        say(f"{child.name} cannot listen on {child.host}:{port}: the port is in use"
                            f"{f' by {holder}' if holder else ''}; set {setting} to a free port")
                        return 1
            for child in self.children:
                if not self._first_start(child):
                    return 1 if self.stop_signal is None else 128 + self.stop_signal
            on_ready()
            self._supervise()
            return 128 + (self.stop_signal or 0)
        finally:
            self.stop()

    def _first_start(self, child: Child) -> bool:
        child.start()
        assert child.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while self.stop_signal is None:
            code = child.proc.poll()
            where = f" on {child.host}:{child.port}" if child.port is not None else ""
            if code is not None:
                say(f"{child.name} exited with status {code} before it answered{where} (see its messages above)")
                return False
            if child.probe():
                child.up_since = time.monotonic()
                return True
            if time.monotonic() > deadline:
                say(f"{child.name} did not answer{where} within {START_TIMEOUT:.0f} s")
                return False
            time.sleep(TICK)
        return False

    def _supervise(self) -> None:
        while self.stop_signal is None:
            now = time.monotonic()
            for child in self.children:
                self._check(child, now)
            time.sleep(TICK)

    def _check(self, child: Child, now: float) -> None:
        assert child.proc is not None
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restarts += 1
                say(f"restarting {child.name} (restart {child.restarts})")
                child.start()
            return
        code = child.proc.poll()
        if code is not None:
            if child.up_since is not None and now - child.up_since >= STABLE_AFTER:
                child.delay = FIRST_DELAY
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            say(f"{child.name} {how}; restarting it in {child.delay:g} s" + child.note)
            child.restart_at = now + child.delay
            child.delay = min(child.delay * 2, MAX_DELAY)
            child.kill_group()
            return
        if child.up_since is None and child.probe():
            child.up_since = now
            if child.restarts:
                say(f"{child.name} is back (pid {child.proc.pid})")

    def stop(self) -> None:
        """The app(s) first, then NGINX: one TERM each, then whatever is left of each process
        group is killed once STOP_TIMEOUT has passed."""
        running = [c for c in reversed(self.children) if c.proc is not None]
        if not running:
            return
        say("stopping " + ", ".join(c.name for c in running))
        for child in running:
            assert child.proc is not None
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while (child.proc.poll() is None or child.alive_group()) and time.monotonic() < deadline:
                time.sleep(TICK)
            child.kill_group()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
        say("stopped")


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise SystemExit("filedrop: nginx is not installed: as root, scripts/setup installs it; otherwise "
                         "run 'sudo apt-get install nginx-light' and re-run")
    return found


def children(settings: Settings, prefix: Path, conf: Path) -> list[Child]:
    """NGINX over ``prefix``, then the app (``filedrop serve`` from this interpreter's venv), or
    with ``app_processes`` over 1 the app processes on consecutive ports and the workers."""
    nginx = Child("NGINX", [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                  settings.http_host, settings.http_port, "FILEDROP_HTTP_PORT (or FILEDROP_HTTP_HOST)",
                  lambda: http_ok(settings.http_host, settings.page_port, "/", lambda s: s == 200),  # the drop page
                  more_ports=((settings.page_port, "FILEDROP_PAGE_PORT (or FILEDROP_HTTP_HOST)"),))
    app_host = ngx.upstream_address(settings.app_host, settings.app_port).rsplit(":", 1)[0].strip("[]")
    serve = [sys.executable, "-m", "server", "serve"]
    if settings.app_processes == 1:
        return [nginx, Child("the app", serve, settings.app_host or "0.0.0.0", settings.app_port, "FILEDROP_APP_PORT",
                             lambda: http_ok(app_host, settings.app_port, "/healthz", lambda s: s == 200),
                             note=" (NGINX keeps serving the smartlinks)")]
    env = {**os.environ, "FILEDROP_WORKERS": "0"}  # the workers are children of their own

    def app(n: int, port: int) -> Child:
        return Child(f"app process {n} (port {port})", serve, settings.app_host or "0.0.0.0", port,
                     f"FILEDROP_APP_PORT (app processes use {settings.app_port}-{settings.app_ports[-1]})",
                     lambda: http_ok(app_host, port, "/healthz", lambda s: s == 200),
                     env={**env, "FILEDROP_APP_PORT": str(port)}, note=" (NGINX sends the API to the others)")

    apps = [app(n, port) for n, port in enumerate(settings.app_ports, 1)]
    workers = [Child(f"worker {n}", [sys.executable, "-m", "server", "worker"], "", None, "",
                     lambda: True, note=" (its rows go back to the queue)")
               for n in range(1, settings.workers + 1)]
    return [nginx, *apps, *workers]


def main() -> int:
    os.umask(0o077)  # as `filedrop` itself: what the children make is this user's only
    try:
        settings = Settings.from_env()
    except ValueError as e:
        say(f"bad setting: {e}")
        return 2
    prefix = settings.data_dir / "nginx"
    try:
        conf = ngx.render(settings, prefix)
    except ValueError as e:
        say(str(e))
        return 2
    binary = nginx_binary()
    test = subprocess.run([binary, "-t", "-q", "-p", str(prefix), "-c", str(conf)])
    if test.returncode != 0:
        say(f"nginx refused {conf} (see above)")
        return 1
    kids = children(settings, prefix, conf)
    host = settings.http_host if ":" not in settings.http_host else f"[{settings.http_host}]"
    key = settings.api_keys[0] if settings.api_keys else "(none: FILEDROP_API_KEYS is empty)"

    def ready() -> None:
        say(f"NGINX listening on http://{host}:{settings.http_port} (smartlinks + API) and on "
            f"http://{host}:{settings.page_port}/ (the drop page + API; logs in {prefix}/logs)")
        if settings.app_processes == 1:
            say(f"app on http://{settings.app_host}:{settings.app_port}  dev key: {key}")
            say("Ctrl-C stops both; a crashed app is restarted")
            return
        say(f"{settings.app_processes} app processes on http://{settings.app_host}:{settings.app_port}-"
            f"{settings.app_ports[-1]} and {settings.workers} worker(s)  dev key: {key}")
        say("Ctrl-C stops them all; a crashed process is restarted")

    return Supervisor(kids).run(ready)


if __name__ == "__main__":
    raise SystemExit(main())
