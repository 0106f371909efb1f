"""systemd units for a production host, rendered by the code that renders nginx.conf: every
placeholder filled, commands that exist, the NGINX unit's own command serving the smartlinks as
the unit's user, and ``systemd-analyze verify`` content with them."""

from __future__ import annotations

import configparser
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server import nginx as ngx
from tests.support.nginx import fetch, wait_served
from tests.support.server import REPO
from tests.support.waiting import free_port


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_units_are_filled_from_the_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(tmp_path / "var"), FILEDROP_HTTP_PORT="18180", FILEDROP_API_KEYS="k1")
    me = pwd.getpwuid(os.geteuid()).pw_name
    r = subprocess.run([sys.executable, "-m", "server.nginx", "units", "--prefix", str(tmp_path / "var" / "nginx"),
                        "--out", str(tmp_path / "units"), "--user", me], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    written = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in written] == [*ngx.UNITS, "filedrop.env"]
    for p in written[:3]:
        text = p.read_text()
        assert "{{" not in text and "}}" not in text, p
        svc = unit(p)["Service"]
        assert svc["User"] == me and svc["UMask"] == "0077" and svc["Restart"] == "always"
        exe = shlex.split(svc["ExecStart"])[0]
        assert os.access(exe, os.X_OK), exe
    app, worker, front = (unit(p)["Service"] for p in written[:3])
    assert shlex.split(app["ExecStart"])[1:] == ["serve"] and shlex.split(worker["ExecStart"])[1:] == ["worker"]
    assert Path(shlex.split(app["ExecStart"])[0]) == Path(sys.prefix) / "bin" / "filedrop"
    assert app["EnvironmentFile"] == str(tmp_path / "units" / "filedrop.env")
    assert app["ReadWritePaths"] == str(tmp_path / "var")
    # The NGINX unit runs the config rendered beside it, which NGINX accepts.
    cmd = shlex.split(front["ExecStart"])
    conf = Path(cmd[cmd.index("-c") + 1])
    assert conf == tmp_path / "var" / "nginx" / "nginx.conf" and "listen 127.0.0.1:18180" in conf.read_text()
    check = subprocess.run(shlex.split(front["ExecStartPre"]), capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    # The settings file: this environment's FILEDROP_* (it may hold keys: 0600).
    envfile = tmp_path / "units" / "filedrop.env"
    assert stat.S_IMODE(envfile.stat().st_mode) == 0o600
    lines = envfile.read_text().splitlines()
    assert f"FILEDROP_DATA_DIR={tmp_path / 'var'}" in lines and "FILEDROP_API_KEYS=k1" in lines
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", *map(str, written[:3])], capture_output=True,
                           text=True, timeout=60)
        assert v.returncode == 0, v.stderr


def test_units_rendered_by_root_leave_nginx_to_its_user_who_serves_private_smartlinks() -> None:
    """README's ``sudo ... units --user U``: NGINX's prefix (config, logs, temp dirs) and the
    smartlink root it made are U's, so what systemd runs as U (``nginx -t``, then the unit's
    ExecStart, under UMask=0077) reads its config and serves the 0600 pages U publishes there;
    the units and the settings file stay root's, not writable by U. Nothing here is chowned
    after rendering: U's data dir is made by U, as ``filedrop migrate`` would."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the unit's command as another user")
    nobody = pwd.getpwnam("nobody")
    as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="filedrop-unit-"))
    os.chmod(base, 0o755)  # root's, like / : nobody reaches srv/ through it
    proc = None
    try:
        home = base / "srv"  # the service user's home, like the README's /srv/filedrop
        home.mkdir(mode=0o700)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        data = home / "var"
        subprocess.run([*as_nobody, "mkdir", "-m", "700", str(data)], check=True, timeout=30)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
        env.update(FILEDROP_DATA_DIR=str(data), FILEDROP_HTTP_PORT=str(port), FILEDROP_APP_PORT=str(free_port()),
                   FILEDROP_PAGE_PORT=str(free_port()))
        cmd = [sys.executable, "-m", "server.nginx", "units", "--prefix", str(data / "nginx"),
               "--out", str(base / "etc"), "--user", "nobody"]
        for _ in range(2):  # a second run (new settings, say) over the first run's files is the same
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        written = [Path(p) for p in r.stdout.split()]
        prefix = data / "nginx"
        for p in [prefix, prefix / "tmp", *(prefix / d for d in ngx.PREFIX_DIRS), *(prefix / f for f in ngx.LOG_FILES),
                  prefix / "nginx.conf", data / "smartlinks"]:
            st = p.stat()
            assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), p
            assert stat.S_IMODE(st.st_mode) == (0o700 if p.is_dir() else 0o600), p
        for p in [base / "etc", *written]:
            st = p.stat()
            assert st.st_uid == 0 and not st.st_mode & 0o022, p
        svc = unit(written[2])["Service"]
        assert not re.search(r"^user ", (prefix / "nginx.conf").read_text(), re.M)  # not root: none
        check = subprocess.run([*as_nobody, *shlex.split(svc["ExecStartPre"])], capture_output=True, text=True,
                               timeout=30, preexec_fn=lambda: os.umask(0o077))
        assert check.returncode == 0, check.stderr
        # What `filedrop serve` as nobody does on a job's first page: a batch folder in the root.
        publish = subprocess.run([*as_nobody, "sh", "-c", 'mkdir "$1" && printf "<p>from the unit</p>" > "$1/$2"',
                                  "sh", str(data / "smartlinks" / "b1"), "ref.0123456789abcdef.html"],
                                 capture_output=True, text=True, timeout=30, preexec_fn=lambda: os.umask(0o077))
        assert publish.returncode == 0, publish.stderr
        proc = subprocess.Popen([*as_nobody, *shlex.split(svc["ExecStart"])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0o077))

        wait_served(proc, port, "/b1/ref.0123456789abcdef.html", prefix, "the NGINX unit serving as nobody")
        assert fetch(port, "GET", "/b1/ref.0123456789abcdef.html").body == b"<p>from the unit</p>"
        assert fetch(port, "GET", "/api/v1/upload/x").status == 503  # no app: NGINX still answers
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def test_units_refuse_a_smartlink_root_their_user_does_not_own(tmp_path: Path) -> None:
    """A smartlink root of another user (root's, from an earlier run) would keep NGINX, as the
    units' user, from reading the pages: refused in one line naming it, before anything is written."""
    if os.geteuid() != 0:
        pytest.skip("needs root to render units for another user")
    (tmp_path / "var" / "smartlinks").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(tmp_path / "var"))
    r = subprocess.run([sys.executable, "-m", "server.nginx", "units", "--prefix", str(tmp_path / "var" / "nginx"),
                        "--out", str(tmp_path / "units"), "--user", "nobody"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"filedrop: smartlink root '{tmp_path / 'var' / 'smartlinks'}' belongs to uid 0, ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "var" / "nginx").exists() and not (tmp_path / "units").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--env-file", "missing.env"], "filedrop: --env-file {t}/missing.env: no such file (leave it out to write "
                                    "OUT/filedrop.env from this environment's FILEDROP_* variables)"),
    (["--out", "a-file/units"], "filedrop: cannot write {t}/a-file/units: Not a directory"),
])
def test_units_with_a_wrong_path_say_so_in_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    """A missing --env-file was written into the units (systemd then refused to start them); an
    --out under a file was a NotADirectoryError traceback."""
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(tmp_path / "var"))
    r = subprocess.run([sys.executable, "-m", "server.nginx", "units", "--prefix", str(tmp_path / "var" / "nginx"),
                        "--out", str(tmp_path / "units"), "--user", pwd.getpwuid(os.geteuid()).pw_name, *args],
                       cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr == says.format(t=tmp_path) + "\n"
    assert not (tmp_path / "units").exists()
