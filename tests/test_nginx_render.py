"""Rendering the top-level nginx.conf: every placeholder filled from Settings, the result accepted
by the real ``nginx -t``, unsafe values refused, and the CLI that scripts/run calls."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server import nginx as ngx
from server.config import Settings
from tests.support.nginx import nginx_binary
from tests.support.server import REPO


def directive(conf: str, name: str) -> list[str]:
    return [m.strip() for m in re.findall(rf"^[ \t]*{name}[ \t]+([^;{{]*);", conf, re.M)]


def test_rendered_config_is_accepted_by_nginx(tmp_path: Path) -> None:
    conf = ngx.render(Settings(data_dir=tmp_path / "var"), tmp_path / "p", listen="127.0.0.1:1")
    text = conf.read_text()
    assert "{{" not in text and "}}" not in text
    r = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path / "p"), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "warn" not in r.stderr.replace("[warn] the \"user\" directive", "")


def test_defaults_follow_settings(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "var")
    text = ngx.render(s, tmp_path / "p").read_text()
    # Loopback unless FILEDROP_HTTP_HOST opens it (scripts/run says 127.0.0.1: it is).
    assert directive(text, "listen") == ["127.0.0.1:8080 default_server", "127.0.0.1:8079 default_server"]
    assert directive(text, "server") == ["127.0.0.1:8081"]
    assert directive(text, "worker_processes") == ["auto"]
    assert directive(text, "root") == [str(tmp_path / "var" / "smartlinks")]
    limits = directive(text, "client_max_body_size")
    assert str(64 << 20) in limits and str(ngx.job_body_limit(s)) in limits


def test_settings_change_ports_root_and_body_limit(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "var", http_port=18080, page_port=18079, app_host="0.0.0.0", app_port=18081,
                 smartlink_root=tmp_path / "links", max_chunk_size=3 << 20)
    text = ngx.render(s, tmp_path / "p").read_text()
    assert directive(text, "listen") == ["127.0.0.1:18080 default_server", "127.0.0.1:18079 default_server"]
    assert directive(text, "server") == ["127.0.0.1:18081"]  # a wildcard bind is reached on loopback
    assert directive(text, "root") == [str(tmp_path / "links")]
    assert str(3 << 20) in directive(text, "client_max_body_size")
    assert (tmp_path / "links").is_dir()


@pytest.mark.parametrize("host,port,expected", [
    ("127.0.0.1", 1, "127.0.0.1:1"), ("0.0.0.0", 2, "127.0.0.1:2"), ("", 3, "127.0.0.1:3"),
    ("::", 4, "[::1]:4"), ("::1", 5, "[::1]:5"), ("localhost", 6, "localhost:6"),
])
def test_upstream_address(host: str, port: int, expected: str) -> None:
    assert ngx.upstream_address(host, port) == expected


@pytest.mark.parametrize("host", ["127.0.0.1; include /etc/passwd", "a b", "h\n", "x{"])
def test_unsafe_app_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="FILEDROP_APP_HOST"):
        ngx.upstream_address(host, 1)


def test_the_front_door_directives_are_there(tmp_path: Path) -> None:
    text = ngx.render(Settings(data_dir=tmp_path / "var"), tmp_path / "p").read_text()
    for d, v in [("sendfile", "on"), ("autoindex", "off"), ("gzip", "on"), ("server_tokens", "off"),
                 ("proxy_request_buffering", "off"), ("proxy_http_version", "1.1"), ("etag", "on"),
                 ("open_file_cache", "off"),
                 ("charset", "utf-8")]:
        assert v in directive(text, d), d


def test_render_makes_the_prefix_and_is_idempotent(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "var")
    first = ngx.render(s, tmp_path / "p").read_bytes()
    for d in ngx.PREFIX_DIRS:
        assert (tmp_path / "p" / d).is_dir()
    assert ngx.render(s, tmp_path / "p").read_bytes() == first
    assert [p.name for p in (tmp_path / "p").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("root", ["/tmp/with space", "/tmp/semi;colon", "/tmp/$document_root", "/tmp/q\"uote",
                                  "/tmp/brace{x}", "/tmp/back\\slash", "/tmp/new\nline", "/tmp/trailing\n"])
def test_unsafe_smartlink_root_is_refused(tmp_path: Path, root: str) -> None:
    s = Settings(data_dir=tmp_path / "var", smartlink_root=Path(root))
    with pytest.raises(ValueError, match="smartlink_root"):
        ngx.render(s, tmp_path / "p")
    assert not (tmp_path / "p" / "nginx.conf").exists()


@pytest.mark.parametrize("listen", ["80; include /etc/passwd", "a:b", ""])
def test_bad_listen_is_refused(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ValueError):
        ngx.values(Settings(data_dir=tmp_path / "var", http_port=1), listen=listen or "x")


@pytest.mark.parametrize("page_port,app_processes", [(18080, 1), (18081, 1), (18083, 3)])
def test_the_page_port_must_be_its_own(tmp_path: Path, page_port: int, app_processes: int) -> None:
    """The drop page's origin is a port no one else has: FILEDROP_PAGE_PORT is named."""
    s = Settings(data_dir=tmp_path / "var", http_port=18080, app_port=18081, page_port=page_port,
                 app_processes=app_processes, database_url="postgresql://u@127.0.0.1/d" if app_processes > 1 else "")
    with pytest.raises(ValueError, match="FILEDROP_PAGE_PORT"):
        ngx.values(s)


def test_placeholders_and_values_must_agree() -> None:
    assert ngx.fill("a {{X}} b", {"X": "1"}) == "a 1 b"
    with pytest.raises(ValueError, match="missing"):
        ngx.fill("{{X}} {{Y}}", {"X": "1"})
    with pytest.raises(ValueError, match="unused"):
        ngx.fill("{{X}}", {"X": "1", "Z": "2"})


def test_user_directive_only_as_root(tmp_path: Path) -> None:
    text = ngx.render(Settings(data_dir=tmp_path / "var"), tmp_path / "p").read_text()
    users = directive(text, "user")
    if os.geteuid() == 0:
        # Workers run as whoever owns the smartlink root, not as nobody (who could not read it).
        import pwd
        owner = pwd.getpwuid((tmp_path / "var" / "smartlinks").stat().st_uid).pw_name
        assert len(users) == 1 and users[0].split()[0] == owner
    else:
        assert users == []


def test_cli_renders_from_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(tmp_path / "var"), FILEDROP_HTTP_PORT="18123", FILEDROP_PAGE_PORT="18122",
               FILEDROP_APP_PORT="18124", FILEDROP_MAX_CHUNK_SIZE="5M")
    r = subprocess.run([sys.executable, "-m", "server.nginx", "render", "--prefix", str(tmp_path / "p")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    conf = Path(r.stdout.strip())
    assert conf == tmp_path / "p" / "nginx.conf"
    text = conf.read_text()
    assert directive(text, "listen") == ["127.0.0.1:18123 default_server", "127.0.0.1:18122 default_server"]
    assert directive(text, "server") == ["127.0.0.1:18124"]
    assert str(5 << 20) in directive(text, "client_max_body_size")
    env["FILEDROP_SMARTLINK_ROOT"] = "/tmp/bad root"
    r = subprocess.run([sys.executable, "-m", "server.nginx", "render", "--prefix", str(tmp_path / "q")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "smartlink_root" in r.stderr


def test_every_answer_nginx_writes_itself_has_the_apps_error_shape() -> None:
    from server.errors import error_body

    bodies = re.findall(r"return (\d{3}) '(.*)';", ngx.TEMPLATE.read_text())
    assert {int(code) for code, _ in bodies} == {400, 404, 405, 413, 414, 431, 501, 503, 504, 505}
    for code, raw in bodies:
        body = json.loads(raw.replace("\\n", "\n"))
        assert body == error_body(int(code), body["code"], body["message"])
        assert re.fullmatch(r"ERR_[A-Z_]+", body["code"]) and body["message"]


@pytest.mark.parametrize("host", ["localhost", "example.com", "fe80::1%eth0", "::ffff:127.0.0.1", "1.2.3"])
def test_a_host_name_for_the_listen_address_is_refused_naming_its_setting(tmp_path: Path, host: str) -> None:
    """NGINX listens on an address (and scripts/run checks the port on it first): anything else
    in FILEDROP_HTTP_HOST is refused as that setting, not as a `listen` the user never wrote."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(tmp_path / "var"), FILEDROP_HTTP_HOST=host)
    r = subprocess.run([sys.executable, "-m", "server.nginx", "render", "--prefix", str(tmp_path / "p")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"filedrop: FILEDROP_HTTP_HOST: {host!r} is not an IP address"), r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "p").exists()


@pytest.mark.parametrize("host,listen", [(" 0.0.0.0 ", "0.0.0.0:18123"), ("::1", "[::1]:18123"),
                                         ("::", "[::]:18123")])
def test_an_ip_address_for_the_listen_address_is_taken(tmp_path: Path, host: str, listen: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDROP_")}
    env.update(FILEDROP_DATA_DIR=str(tmp_path / "var"), FILEDROP_HTTP_HOST=host, FILEDROP_HTTP_PORT="18123")
    r = subprocess.run([sys.executable, "-m", "server.nginx", "render", "--prefix", str(tmp_path / "p")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert directive(Path(r.stdout.strip()).read_text(), "listen")[0] == f"{listen} default_server"
