"""``scripts/run`` end to end: set-up, then NGINX and the app under the supervisor (API and
smartlinks through NGINX); a killed app is restarted while NGINX serves on; a busy port is named;
Ctrl-C stops both."""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from server import nginx as ngx
from server.config import Settings
from tests.conftest import API_KEY
from tests.support.nginx import fetch, nginx_binary, wait_served
from tests.support.server import REPO
from tests.support.waiting import free_port, wait_until


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; /proc says which.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][:1] != "Z"


def end_run(proc: subprocess.Popen[bytes]) -> None:
    """Whatever state a failed test left scripts/run in: TERM (its trap stops both children),
    else KILL it and its children (each in its own session, so not in its process group)."""
    if proc.poll() is not None:
        return
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                              timeout=10).stdout.split()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait(timeout=10)


def run_env(tmp_path: Path, api_key: str | None = API_KEY, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(tmp_path / "var"), FILEDROP_HTTP_PORT=str(free_port()),
               FILEDROP_PAGE_PORT=str(free_port()), FILEDROP_APP_PORT=str(free_port()),
               FILEDROP_JANITOR_INTERVAL="0", FILEDROP_MIN_FREE_DISK="1M")
    if api_key is not None:
        env["FILEDROP_API_KEYS"] = api_key
    env.update({f"FILEDROP_{k.upper()}": v for k, v in extra.items()})
    return env


def start_run(tmp_path: Path, *, api_key: str | None = API_KEY, preexec: Callable[[], None] | None = None,
              **settings: str) -> tuple[subprocess.Popen[bytes], Path, Path, int, int]:
    """``scripts/run`` on free ports over ``tmp_path/var``, waited for until it says NGINX and the
    app are up; returns (process, data dir, log, http port, app port). ``api_key`` None: no
    keys configured (the script makes a dev key); ``preexec`` runs in the child before the
    script (e.g. to set a limit); ``settings``: more FILEDROP_* (lower-case names). The caller
    ends it with ``end_run``."""
    env = run_env(tmp_path, api_key, **settings)
    data, http_port, app_port = tmp_path / "var", int(env["FILEDROP_HTTP_PORT"]), int(env["FILEDROP_APP_PORT"])
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        # Its own session and process group, as a terminal would run it: Ctrl-C = SIGINT to the group.
        proc = subprocess.Popen([str(REPO / "scripts" / "run")], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"scripts/run exited {proc.returncode}: {log.read_text()[-3000:]}")
        # Ready once it says so (it says so only once both answer).
        return "Ctrl-C stops both" in log.read_text()

    try:
        # Generous: set-up may have to (re)install the package when pyproject.toml changed.
        wait_until(up, timeout=180, interval=0.1, what=f"scripts/run (log: {log})")
    except BaseException:
        end_run(proc)
        raise
    return proc, data, log, http_port, app_port


def test_run_starts_nginx_and_app_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    proc, data, log, http_port, app_port = start_run(tmp_path)
    try:
        r = fetch(http_port, "GET", "/api/v1/upload/handlers", {"X-API-Key": API_KEY})
        assert r.status == 200, r.body
        link = data / "smartlinks" / "b1" / "ref.0123456789abcdef.html"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_bytes(b"<p>hi</p>")
        r = fetch(http_port, "GET", "/b1/ref.0123456789abcdef.html")
        assert r.status == 200 and r.body == b"<p>hi</p>"
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        nginx_pid = int((data / "nginx" / "logs" / "nginx.pid").read_text())
        text = log.read_text()
        assert f"http://127.0.0.1:{http_port}" in text and f"dev key: {API_KEY}" in text
        said = re.search(r"and on http://127\.0\.0\.1:(\d+)/ \(the drop page", text)
        assert said, text
        page_port = int(said.group(1))
        assert page_port not in (http_port, app_port)
        assert fetch(page_port, "GET", "/").status == 200  # the drop page, on its own port
        assert fetch(page_port, "GET", "/b1/ref.0123456789abcdef.html").status == 404

        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) is not None
        wait_until(lambda: refuses(http_port) and refuses(app_port), timeout=10,
                   what="both ports closed after Ctrl-C")
        wait_until(lambda: not pid_alive(nginx_pid), timeout=10, what="the nginx master to exit")
        after = log.read_text()
        assert "filedrop: stopped" in after
        # One signal each: the app's graceful shutdown is not cut short by a second one.
        assert "Traceback" not in after
    finally:
        end_run(proc)


def app_pid(run: subprocess.Popen[bytes]) -> int:
    """The app the supervisor runs (its child ``python -m server serve``)."""
    pids = subprocess.run(["pgrep", "-P", str(run.pid), "-f", "server serve"], capture_output=True, text=True,
                          timeout=10).stdout.split()
    assert len(pids) == 1, pids
    return int(pids[0])


def test_a_killed_app_is_restarted_with_a_backoff_while_nginx_keeps_serving(tmp_path: Path) -> None:
    proc, data, log, http_port, _app_port = start_run(tmp_path)
    try:
        link = data / "smartlinks" / "b1" / "ref.0123456789abcdef.html"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_bytes(b"<p>still here</p>")
        nginx_pid = int((data / "nginx" / "logs" / "nginx.pid").read_text())
        for restart, delay in ((1, "1"), (2, "2")):
            first = app_pid(proc)
            os.kill(first, signal.SIGKILL)
            wait_until(lambda pid=first: not pid_alive(pid), timeout=10, what="the app to die")
            # The links outlive the app: NGINX answers them (and the API says 503) meanwhile.
            r = fetch(http_port, "GET", "/b1/ref.0123456789abcdef.html")
            assert r.status == 200 and r.body == b"<p>still here</p>"
            assert fetch(http_port, "GET", "/api/v1/upload/handlers", {"X-API-Key": API_KEY}).status in (200, 503)
            wait_until(lambda n=restart: log.read_text().count("the app is back") == n, timeout=30,
                       what=f"restart {restart} (log: {log})")
            assert f"the app was killed by SIGKILL; restarting it in {delay} s" in log.read_text()
            r = fetch(http_port, "GET", "/api/v1/upload/handlers", {"X-API-Key": API_KEY})
            assert r.status == 200, r.body
            assert app_pid(proc) != first and proc.poll() is None
        assert pid_alive(nginx_pid)  # never restarted: it was serving all along
    finally:
        end_run(proc)


@pytest.mark.parametrize("busy", ["HTTP", "PAGE", "APP"])
def test_a_busy_port_is_named_with_its_holder_and_setting_before_anything_listens(tmp_path: Path, busy: str) -> None:
    env = run_env(tmp_path)
    port = int(env[f"FILEDROP_{busy}_PORT"])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = subprocess.run([str(REPO / "scripts" / "run")], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=180)
    assert r.returncode == 1, r.stderr
    who = "the app" if busy == "APP" else "NGINX"
    assert f"filedrop: {who} cannot listen on 127.0.0.1:{port}: the port is in use by pid {os.getpid()} " in r.stderr
    assert f"set FILEDROP_{busy}_PORT" in r.stderr
    assert "listening" not in r.stderr and "Traceback" not in r.stderr
    other = int(env["FILEDROP_APP_PORT" if busy == "HTTP" else "FILEDROP_HTTP_PORT"])
    assert refuses(other)  # nothing was left running


def test_nginx_listens_on_loopback_only_unless_told(tmp_path: Path) -> None:
    proc, _data, _log, http_port, _app_port = start_run(tmp_path)
    try:
        listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and line.split()[1].endswith(f":{http_port:04X}")]
        assert listening == [f"0100007F:{http_port:04X}"]  # 127.0.0.1, not 0.0.0.0
    finally:
        end_run(proc)


def test_nginx_needs_no_root(tmp_path: Path) -> None:
    """The rendered config runs as an ordinary user: every path NGINX writes is in its prefix."""
    if os.geteuid() != 0:
        pytest.skip("not root: every other NGINX test here already runs without root")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop to another user")
    nobody = pwd.getpwnam("nobody")
    # Under /tmp itself: pytest's tmp dirs are private to root, and nobody must reach this one.
    base = Path(tempfile.mkdtemp(prefix="filedrop-nonroot-"))
    proc = None
    try:
        link = base / "var" / "smartlinks" / "b1" / "ref.0123456789abcdef.html"
        link.parent.mkdir(parents=True)
        link.write_bytes(b"<p>no root</p>")
        port = free_port()
        conf = ngx.render(Settings(data_dir=base / "var", app_port=free_port()), base / "p",
                          listen=f"127.0.0.1:{port}")
        for d, dirs, files in os.walk(base):
            for name in [d, *(os.path.join(d, x) for x in dirs + files)]:
                os.chown(name, nobody.pw_uid, nobody.pw_gid)
                # As the server makes them: readable by their owner only (who NGINX runs as).
                os.chmod(name, 0o700 if os.path.isdir(name) else 0o600)
        proc = subprocess.Popen(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                                 "--clear-groups", nginx_binary(), "-p", str(base / "p"), "-c", str(conf),
                                 "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        wait_served(proc, port, "/b1/ref.0123456789abcdef.html", base / "p", "nginx started as nobody")
        uid_line = next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if x.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(nobody.pw_uid)}
        assert fetch(port, "GET", "/b1/ref.0123456789abcdef.html").body == b"<p>no root</p>"
        assert fetch(port, "GET", "/api/v1/upload/x").status == 503
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def test_run_makes_a_dev_key_only_its_user_can_read(tmp_path: Path) -> None:
    proc, data, _log, http_port, _app_port = start_run(tmp_path, api_key=None)
    try:
        keyfile = data / "dev-api-key"
        assert keyfile.stat().st_mode & 0o077 == 0, oct(keyfile.stat().st_mode)
        r = fetch(http_port, "GET", "/api/v1/upload/handlers", {"X-API-Key": keyfile.read_text().strip()})
        assert r.status == 200, r.body
    finally:
        end_run(proc)


def test_a_second_run_on_the_same_data_dir_is_refused_before_it_touches_the_first(tmp_path: Path) -> None:
    """Told that the port is taken, an operator may start scripts/run again on other ports: it
    rendered its nginx.conf over the running one's, its NGINX shared (then removed) the first
    one's pid file, and its app was a second one on the same SQLite database. Now it stops
    first, naming the running one."""
    proc, data, _log, _http_port, _app_port = start_run(tmp_path)
    try:
        conf = (data / "nginx" / "nginx.conf").read_text()
        pid_file = data / "nginx" / "logs" / "nginx.pid"
        nginx_pid = pid_file.read_text()
        again = run_env(tmp_path)  # same data dir, other free ports
        r = subprocess.run([str(REPO / "scripts" / "run")], cwd=REPO, env=again, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last == (f"filedrop: scripts/run is already running on {data} (pid {proc.pid}): stop it first "
                        f"(Ctrl-C in its terminal, or kill {proc.pid}), or set FILEDROP_DATA_DIR to another "
                        "directory"), r.stderr
        assert "Traceback" not in r.stderr and "listening" not in r.stderr
        assert refuses(int(again["FILEDROP_HTTP_PORT"])) and refuses(int(again["FILEDROP_APP_PORT"]))
        assert (data / "nginx" / "nginx.conf").read_text() == conf and pid_file.read_text() == nginx_pid
        assert proc.poll() is None
    finally:
        end_run(proc)


def test_nginx_is_not_held_to_a_login_shells_open_file_limit(tmp_path: Path) -> None:
    """A login shell's (and a systemd unit's) soft limit is 1024 open files: NGINX warned at each
    start that its 4096 worker_connections exceed it, and a worker stopped accepting at about
    1,000 descriptors (a proxied request holds two). Its workers now raise their own limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 8192:
        pytest.skip(f"the hard limit of open files here is {hard}: NGINX cannot raise its own to 8192")
    proc, data, log, _http_port, _app_port = start_run(
        tmp_path, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    try:
        nginx_pid = int((data / "nginx" / "logs" / "nginx.pid").read_text())
        workers = subprocess.run(["pgrep", "-P", str(nginx_pid)], capture_output=True, text=True,
                                 timeout=10).stdout.split()
        assert workers
        for pid in workers:
            limit = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines()
                         if x.startswith("Max open files"))
            assert limit.split()[3] == "8192", limit  # the soft limit
        assert "exceed open file resource limit" not in log.read_text()
    finally:
        end_run(proc)


@pytest.mark.parametrize("name", ["FILEDROP_MAX_CHUNK_SIZE", "FILEDROP_MAX_DATA_SIZE"])
def test_a_size_too_large_for_nginx_is_refused_naming_the_setting(tmp_path: Path, name: str) -> None:
    """9000000T is over what NGINX's client_max_body_size takes (an off_t): scripts/run printed
    NGINX's `"client_max_body_size" directive invalid value in .../nginx.conf:179`, naming no
    setting, and exited 1. Sizes now have a ceiling, checked with the other settings."""
    r = subprocess.run([str(REPO / "scripts" / "run")], cwd=REPO, env={**run_env(tmp_path), name: "9000000T"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"filedrop: bad setting: {name}: '9000000T' is over the largest size, 1024T (1 PiB)\n"
    assert not (tmp_path / "var" / "nginx").exists()


@pytest.mark.parametrize(("setting", "says"), [
    ("FILEDROP_APP_HOST", "filedrop: FILEDROP_APP_HOST 'nonexistent.invalid': the name does not resolve "
                          "(use an address of this machine, e.g. 127.0.0.1)"),
    ("FILEDROP_APP_PORT", "filedrop: FILEDROP_HTTP_PORT {port}: NGINX needs a port of its own, not an app "
                          "process's (FILEDROP_APP_PORT and the ports after it)"),
])
def test_an_app_address_nginx_cannot_use_is_named_before_anything_starts(tmp_path: Path, setting: str,
                                                                         says: str) -> None:
    """An app host that does not resolve stopped scripts/run with NGINX's `host not found in
    upstream ... nginx.conf:81` (no setting named, exit 1); an app port equal to NGINX's started
    NGINX, then the app, which found its port taken by NGINX."""
    env = run_env(tmp_path)
    env[setting] = "nonexistent.invalid" if setting == "FILEDROP_APP_HOST" else env["FILEDROP_HTTP_PORT"]
    r = subprocess.run([str(REPO / "scripts" / "run")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == says.format(port=env["FILEDROP_HTTP_PORT"]), r.stderr
    assert "emerg" not in r.stderr and "listening" not in r.stderr and "Traceback" not in r.stderr


def test_nginx_on_an_ipv6_address_comes_up(tmp_path: Path) -> None:
    """FILEDROP_HTTP_HOST may be an IPv6 address (README: `::` opens NGINX to the network). NGINX
    listened, but the supervisor's probe asked for the host `[::1]` (http.client keeps the
    brackets when given a port), never got an answer, and stopped the run after 60 s."""
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 here")
    proc, _data, log, http_port, _app_port = start_run(tmp_path, http_host="::1")
    try:
        assert f"NGINX listening on http://[::1]:{http_port} (smartlinks + API)" in log.read_text()
        conn = http.client.HTTPConnection("::1", http_port, timeout=10)
        try:
            conn.request("GET", "/api/v1/upload/handlers", headers={"X-API-Key": API_KEY})
            assert conn.getresponse().status == 200
        finally:
            conn.close()
    finally:
        end_run(proc)


def test_a_killed_supervisor_takes_nginx_and_the_app_with_it(tmp_path: Path) -> None:
    """scripts/run killed with -9 (or by the OOM killer) left NGINX and the app running as
    orphans, holding the ports and the data dir: the next scripts/run was refused ("the port is in
    use by pid N") until they were found and killed by hand. Now they get SIGTERM when it dies."""
    proc, data, _log, http_port, app_port = start_run(tmp_path)
    children = [int((data / "nginx" / "logs" / "nginx.pid").read_text()), app_pid(proc)]
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until(lambda: not any(map(pid_alive, children)), timeout=20,
                   what="NGINX and the app to stop after their supervisor died")
        assert refuses(http_port) and refuses(app_port)
    finally:
        end_run(proc)
        for pid in filter(pid_alive, children):  # what a failed test would leave running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
