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
from server.config import Settings
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


def test_the_nginx_unit_serves_private_smartlinks_as_its_user() -> None:
    """What systemd would run (the unit's ExecStart, as its User=, under UMask=0077) serves the
    0600 smartlinks of the data dir that user owns."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the unit's command as another user")
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="filedrop-unit-"))
    proc = None
    try:
        data = base / "var"
        link = data / "smartlinks" / "b1" / "ref.0123456789abcdef.html"
        link.parent.mkdir(parents=True)
        link.write_bytes(b"<p>from the unit</p>")
        port = free_port()
        settings = Settings(data_dir=data, http_port=port, app_port=free_port())
        written = ngx.render_units(settings, data / "nginx", base / "units", user="nobody", environ={})
        for d, dirs, files in os.walk(base):
            for p in [d, *(os.path.join(d, x) for x in dirs + files)]:
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
                os.chmod(p, 0o700 if os.path.isdir(p) else 0o600)
        svc = unit(written[2])["Service"]
        assert not re.search(r"^user ", (data / "nginx" / "nginx.conf").read_text(), re.M)  # not root: none
        proc = subprocess.Popen(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                                 "--clear-groups", *shlex.split(svc["ExecStart"])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.umask(0o077))

        wait_served(proc, port, "/b1/ref.0123456789abcdef.html", data / "nginx", "the NGINX unit serving as nobody")
        assert fetch(port, "GET", "/b1/ref.0123456789abcdef.html").body == b"<p>from the unit</p>"
        assert fetch(port, "GET", "/api/v1/upload/x").status == 503  # no app: NGINX still answers
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
