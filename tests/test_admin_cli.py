"""What a newcomer meets on the command line: one-line errors with an exit status (never a
traceback, SQL or a secret), no Alembic chatter, a wrong data dir named as such, and a private
data dir whatever the umask."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from server.db.migrate import head_revisions
from tests.conftest import API_KEY
from tests.support.server import REPO, server_env

HEAD = ", ".join(sorted(head_revisions(Path("unused"))))  # the revision a migrated database is at


def cli(env: dict[str, str], *args: str, cwd: Path = REPO, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: from another directory, `-m server` would import the venv's editable install,
    # which may be another checkout's (a git worktree sharing the main checkout's venv).
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = server_env(tmp_path / "data", API_KEY)
    assert cli(e, "migrate").returncode == 0
    return e


def test_keys_create_refuses_a_taken_or_revoked_name_in_one_line(env: dict[str, str]) -> None:
    first = cli(env, "keys", "create", "alice")
    assert first.returncode == 0
    key = first.stdout.strip()
    again = cli(env, "keys", "create", "alice")
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr == "filedrop: a key named 'alice' already exists: names are never reused, choose another\n"
    assert cli(env, "keys", "revoke", "alice").returncode == 0
    revoked = cli(env, "keys", "create", "alice")
    assert revoked.returncode == 2 and revoked.stdout == ""
    assert revoked.stderr == ("filedrop: a key named 'alice' already exists (revoked): names are never "
                              "reused, choose another\n")
    for r in (again, revoked):
        assert "Traceback" not in r.stderr and "INSERT" not in r.stderr and "sqlite" not in r.stderr.lower()
        assert key not in r.stderr and "fd_" not in r.stderr
    assert cli(env, "keys", "list").stdout.count("alice\t") == 1


@pytest.mark.parametrize("name", ["", "   ", "tab\there", "new\nline", "x" * 201])
def test_keys_create_refuses_a_blank_or_unprintable_name(env: dict[str, str], name: str) -> None:
    r = cli(env, "keys", "create", name)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("filedrop: a key name is 1-200 printable characters") and r.stderr.count("\n") == 1
    assert cli(env, "keys", "list").stdout == ""


def test_commands_print_no_alembic_lines_unless_asked(env: dict[str, str]) -> None:
    for args in (["migrate"], ["keys", "list"], ["cleanup", "--dry-run"]):
        r = cli(env, *args)
        assert r.returncode == 0, r.stderr
        assert r.stderr == "", (args, r.stderr)  # not one Alembic INFO line (nine were printed)
    migrated = cli(env, "migrate")
    assert migrated.stdout.strip().endswith(f"at revision {HEAD} (unchanged)")
    debug = cli({**env, "FILEDROP_LOG_LEVEL": "DEBUG"}, "migrate")
    assert "alembic.runtime.migration" in debug.stderr


def test_a_new_database_says_it_was_made(tmp_path: Path) -> None:
    e = server_env(tmp_path / "new", API_KEY)
    r = cli(e, "migrate")
    assert r.returncode == 0 and r.stdout.strip().endswith(f"at revision {HEAD} (new database)") and r.stderr == ""


@pytest.mark.parametrize(("name", "value", "says"), [
    ("FILEDROP_MAX_FILE_SIZE", "ten gigs", "FILEDROP_MAX_FILE_SIZE: not a size: 'ten gigs'"),
    ("FILEDROP_LOG_LEVEL", "verbose", "FILEDROP_LOG_LEVEL: 'verbose' is not a log level (use one of DEBUG, INFO"),
])
@pytest.mark.parametrize("command", [["serve"], ["keys", "list"], ["migrate"]])
def test_a_bad_setting_is_one_line_and_exit_2(env: dict[str, str], command: list[str], name: str, value: str,
                                              says: str) -> None:
    """As the README says: 2 for bad arguments or settings, one line, no traceback (a bad log
    level was logging's own traceback, and a bad setting exited 1)."""
    r = cli({**env, name: value}, *command)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"filedrop: bad setting: {says}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_log_level_is_read_in_any_case(env: dict[str, str]) -> None:
    r = cli({**env, "FILEDROP_LOG_LEVEL": "debug"}, "keys", "list")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("command", [["serve"], ["keys", "list"], ["cleanup"], ["drop", "b"]])
def test_a_wrong_data_dir_is_named_and_migrate_is_not_the_first_advice(tmp_path: Path, command: list[str]) -> None:
    wrong = tmp_path / "typo"
    r = cli(server_env(wrong, API_KEY), *command)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.startswith(f"filedrop: no database at {wrong / 'filedrop.sqlite3'} (from FILEDROP_DATA_DIR): "
                           "point FILEDROP_DATA_DIR at the server's data dir"), line
    assert "only for a new installation run `filedrop migrate`" in line
    assert not wrong.exists()  # nothing was made at the wrong place


def test_without_a_data_dir_setting_the_message_says_where_it_looked(tmp_path: Path) -> None:
    e = server_env(tmp_path / "unused", API_KEY)
    del e["FILEDROP_DATA_DIR"]
    r = cli(e, "keys", "list", cwd=tmp_path)
    assert r.returncode == 2
    assert (f"no database at {tmp_path / 'var' / 'filedrop.sqlite3'} (FILEDROP_DATA_DIR is not set: ./var of "
            "the current directory)") in r.stderr


def test_migrate_makes_the_data_dir_and_database_private_whatever_the_umask(tmp_path: Path) -> None:
    e = server_env(tmp_path / "open", API_KEY)
    r = cli(e, "migrate", umask=0o022)
    assert r.returncode == 0, r.stderr
    data = tmp_path / "open"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for p in data.glob("filedrop.sqlite3*"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # An existing database made open (e.g. by an older version) is closed at the next command.
    (data / "filedrop.sqlite3").chmod(0o644)
    data.chmod(0o755)
    assert cli(e, "keys", "list", umask=0o022).returncode == 0
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "filedrop.sqlite3").stat().st_mode) == 0o600


def test_serve_on_a_busy_port_names_the_port_its_holder_and_the_setting(env: dict[str, str]) -> None:
    port = int(env["FILEDROP_APP_PORT"])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = cli(env, "serve")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"filedrop: the app cannot listen on 127.0.0.1:{port}: address already in use "
                           f"(held by pid {os.getpid()} ("), last  # this test's process holds it
    assert last.endswith("): set FILEDROP_APP_PORT to a free port"), last
    assert "listening" not in r.stdout + r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("args", "variables", "message"), [
    (["cleanup", "--older-than", "99999999999d"], {}, "'99999999999d' is over the longest duration, 36500d"),
    (["cleanup", "--older-than", "9" * 400], {}, "is over the longest duration, 36500d"),
    (["cleanup"], {"FILEDROP_JOB_RETENTION": "1000000d"},
     "bad setting: FILEDROP_JOB_RETENTION: '1000000d' is over the longest duration, 36500d"),
    (["cleanup"], {"FILEDROP_BATCH_TTL": "1000000d"}, "bad setting: FILEDROP_BATCH_TTL: '1000000d' is over"),
    (["keys", "list"], {"FILEDROP_WORKERS": "abc"}, "bad setting: FILEDROP_WORKERS: not a whole number: 'abc'"),
    # Taken, then every job start was a 500 with an OverflowError traceback (a C int's digits).
    (["serve"], {"FILEDROP_MAX_NUMBER_DIGITS": "99999999999"},
     "bad setting: FILEDROP_MAX_NUMBER_DIGITS: 99999999999 is out of range (at least 640, at most 2147483647)"),
    (["serve", "--port", "99999"], {}, "argument --port: 99999 is not a port number (1-65535)"),
    (["serve", "--port", "-1"], {}, "argument --port: -1 is not a port number (1-65535)"),
    (["serve", "--port", "0"], {}, "argument --port: 0 is not a port number (1-65535)"),
])
def test_a_bad_argument_or_setting_is_one_line_and_exit_2(env: dict[str, str], args: list[str],
                                                          variables: dict[str, str], message: str) -> None:
    # A duration past what dates can hold (`now - retention`) was an OverflowError traceback of
    # cleanup (and of every janitor pass); a port out of range one of serve; a bad setting exited 1.
    r = cli({**env, **variables}, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].count(message) == 1


def test_serve_on_an_address_not_of_this_machine_names_the_host_setting(env: dict[str, str]) -> None:
    port = env["FILEDROP_APP_PORT"]
    for host in ("nonexistent.invalid", "192.0.2.1"):  # a name that does not resolve; TEST-NET-1
        r = cli(env, "serve", "--host", host)
        assert r.returncode == 2
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"filedrop: the app cannot listen on {host}:{port}: "), r.stderr
        assert last.endswith(": set --host to an address of this machine"), r.stderr
        assert "Traceback" not in r.stderr and "unknown error" not in r.stderr.lower(), r.stderr


@pytest.mark.parametrize(("command", "variable", "under"), [
    (["migrate"], "FILEDROP_DATA_DIR", ""),
    (["migrate"], "FILEDROP_DATA_DIR", "sub"),
    (["migrate"], "FILEDROP_DB_PATH", "x.sqlite3"),
    (["keys", "list"], "FILEDROP_DATA_DIR", ""),
    (["serve"], "FILEDROP_SMARTLINK_ROOT", ""),
])
def test_a_file_where_a_directory_belongs_is_named_in_one_line(tmp_path: Path, command: list[str], variable: str,
                                                               under: str) -> None:
    """A data dir (or the database's directory, or the smartlink root) that is a file: one line
    naming the setting, exit 2, nothing made (``migrate``, so ``scripts/run``, was a
    FileExistsError traceback; ``serve`` started with a smartlink root no job could write)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    e = server_env(tmp_path / "data", API_KEY)
    assert cli(e, "migrate").returncode == 0
    e[variable] = str(a_file / under) if under else str(a_file)
    r = cli(e, *command)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"filedrop: {variable}: {a_file} is not a directory"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and "listening" not in r.stdout
    assert a_file.read_text() == "not a directory"


def test_an_empty_data_dir_setting_means_the_default(tmp_path: Path) -> None:
    """`FILEDROP_DATA_DIR=` (say `export FILEDROP_DATA_DIR=$DIR` with DIR unset) was a TypeError
    traceback of every command; scripts/run and scripts/filedrop already read it as unset. Now
    the commands do too: ./var of the current directory."""
    e = {**server_env(tmp_path / "unused", API_KEY), "FILEDROP_DATA_DIR": ""}
    r = cli(e, "migrate", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip() == f"filedrop: {tmp_path / 'var' / 'filedrop.sqlite3'} at revision {HEAD} (new database)"
    assert cli(e, "keys", "list", cwd=tmp_path).returncode == 0
