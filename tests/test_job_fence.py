"""The publish fence of a worker's claim (``server.jobs.publish``, ``server.jobs.worker``): a
group is written and synced first, then renamed into place only while the worker's lease runs. A
worker that stalled past it (declared dead elsewhere meanwhile) leaves nothing visible: no page,
no temp. Real files in a real directory."""

from __future__ import annotations

import time
from pathlib import Path

from server.jobs import worker as worker_mod
from server.jobs.publish import Item, stage


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_staged_group_is_invisible_until_committed_then_renamed_whole(tmp_path: Path) -> None:
    staged = stage(tmp_path, [Item("a.html", b"A"), Item("b.html", b"B")], tag="w1")
    assert all(n.startswith(".") and n.endswith(".tmp") for n in _names(tmp_path))  # NGINX refuses these
    assert staged.commit(time.monotonic() + 60) == {}
    assert _names(tmp_path) == ["a.html", "b.html"]
    assert (tmp_path / "a.html").read_bytes() == b"A"


def test_nothing_is_renamed_once_the_lease_ran_out(tmp_path: Path) -> None:
    staged = stage(tmp_path, [Item("a.html", b"A"), Item("b.html", b"B")], tag="w1")
    errors = staged.commit(time.monotonic() - 0.001)
    assert set(errors) == {"a.html", "b.html"}
    assert all("the worker's claim on it ran out" in e for e in errors.values())
    assert _names(tmp_path) == []  # neither the pages nor their temps


def test_a_discarded_group_leaves_nothing(tmp_path: Path) -> None:
    stage(tmp_path, [Item("a.html", b"A")], tag="w1").discard()
    assert _names(tmp_path) == []


def test_the_lease_ends_before_anyone_may_declare_the_worker_dead() -> None:
    # Others hand a worker's rows back LOST_AFTER s after its last heartbeat (their clock, up to
    # MAX_SKEW off): it starts no publish after FENCE and renames nothing after PUBLISH_BY.
    assert worker_mod.FENCE < worker_mod.PUBLISH_BY < worker_mod.LOST_AFTER - worker_mod.MAX_SKEW
