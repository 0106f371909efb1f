"""How the job queries name a set of rows (``queries._among``): on a real SQLite table, the
conditions select exactly the rows asked for, each once, and none binds more than ``BATCH``
parameters; a run of consecutive rows costs one range, not a parameter per row."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, select

from server.db.job_models import JobRow
from server.jobs import queries

ROWS = JobRow.__table__
N = 3000


def _table():  # type: ignore[no-untyped-def]
    engine = create_engine("sqlite://")
    ROWS.create(engine)  # (the foreign key to jobs is not enforced by SQLite without the pragma)
    with engine.begin() as c:
        c.execute(insert(ROWS), [{"job_id": "j", "idx": i, "reference_id": f"r{i}", "suffix": "s", "data": "{}",
                                  "status": "claimed", "attempts": 0} for i in range(N)])
    return engine


ENGINE = _table()


def selected(ids: list[int]) -> tuple[list[list[int]], list[int]]:
    """The rows each condition selects, and each condition's number of bound parameters."""
    rows, params = [], []
    with ENGINE.connect() as c:
        for cond in queries._among(ids):
            stmt = select(ROWS.c.idx).where(ROWS.c.job_id == "j", cond)
            compiled = stmt.compile(ENGINE, compile_kwargs={"render_postcompile": True})
            params.append(len(compiled.params) - 1)  # less the job id
            rows.append([r for (r,) in c.execute(stmt)])
    return rows, params


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, N - 1), max_size=1500))
def test_the_conditions_select_exactly_the_rows_each_once(ids: list[int]) -> None:
    rows, params = selected(ids)
    got = [i for part in rows for i in part]
    assert sorted(got) == sorted(set(ids))  # all of them, and each once
    assert all(0 < p <= queries.BATCH for p in params)


def test_consecutive_rows_are_one_range_and_loose_ones_an_in_list() -> None:
    rows, params = selected(list(range(2000)))
    assert (len(rows), params) == (1, [2])
    ids = list(range(100, 600)) + [700, 702, 704] + list(range(900, 903))
    rows, params = selected(ids)
    assert (len(rows), params) == (1, [2 + 3 + 2])
    rows, params = selected(list(range(10)) + list(range(20, 1022, 2)))  # a range and 501 loose rows
    assert params == [2, 500, 1]
    assert selected([]) == ([], [])


MID_JOB = {**{i: "done" for i in range(90)}, **{i: "claimed" for i in range(90, 100)},
           **{i: "pending" for i in range(100, 120)}}  # a job mid-way: its claim cursor at 100


def _mid_job(tmp_path, *job_ids: str):  # type: ignore[no-untyped-def]
    """A migrated SQLite file with these jobs mid-way (``MID_JOB``); its path and an engine."""
    from server.db.migrate import upgrade

    db_path = tmp_path / "q.sqlite3"
    upgrade(db_path)
    engine = create_engine(f"sqlite:///{db_path}")
    with engine.begin() as c:
        for job_id in job_ids:
            _add_job(c, job_id, "In progress", len(MID_JOB), claim_from=100)
            c.execute(insert(ROWS), [{"job_id": job_id, "idx": i, "reference_id": f"r{i}", "suffix": "s" * 16,
                                      "data": "{}", "status": st, "claimed_by": "w" if st == "claimed" else None,
                                      "attempts": 0} for i, st in MID_JOB.items()])
    return db_path, engine


def _plan(engine, stmt) -> list[str]:  # type: ignore[no-untyped-def]
    """SQLite's query plan of ``stmt``, a step a line."""
    with engine.connect() as c:
        sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
        return [r[-1] for r in c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]


def _add_job(c, job_id: str, status: str, total: int, claim_from: int = 0) -> None:  # type: ignore[no-untyped-def]
    c.exec_driver_sql(
        "INSERT INTO jobs (job_id, batch_id, owner, status, strategy, inputs_hash, template, params, "
        "total_count, succeeded_count, errored_count, cancel_requested, created_at, callback_state, "
        "email_state, claim_from, notification_method) VALUES (?, 'b', 'o', ?, 'smallest', 'h', '{}', "
        "'{}', ?, 0, 0, 0, '2026-01-01', 'none', 'none', ?, 'POST')", (job_id, status, total, claim_from))


def test_handing_back_reads_only_the_rows_of_running_jobs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Which rows a worker's start, stop or death hands back is asked of the running jobs' rows
    only, through their primary key (job_id, idx): ``job_rows`` keeps every finished job's rows for the
    retention, and scanning them all held the writer for 1.7 s at a million rows."""
    from server.db.migrate import upgrade

    db_path = tmp_path / "q.sqlite3"
    upgrade(db_path)
    engine = create_engine(f"sqlite:///{db_path}")
    with engine.begin() as c:
        for job_id, status in (("running", "In progress"), ("done", "Completed"), ("queued", "Queued")):
            _add_job(c, job_id, status, 2)
            c.execute(insert(ROWS), [{"job_id": job_id, "idx": i, "reference_id": f"r{i}", "suffix": "s" * 16,
                                      "data": "{}", "status": "claimed", "claimed_by": "w" if i else "v",
                                      "attempts": 0} for i in range(2)])
    stmt = queries.claimed_in_running_jobs(ROWS.c.claimed_by == "w")
    with engine.connect() as c:
        assert sorted(c.execute(stmt).scalars()) == ["queued", "running"]  # not the finished job's
    plan = _plan(engine, stmt)
    assert not [step for step in plan if step.startswith("SCAN job_rows")], plan
    assert [step for step in plan if step.startswith("SEARCH job_rows USING") and "(job_id=?)" in step], plan
    engine.dispose()


async def test_a_job_mid_way_is_told_unfinished_from_its_claim_cursor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker ends each claim by asking whether the job is done. Mid-job the answer (not yet:
    rows are pending) comes from the claim cursor on, through the primary key, not from a look
    through every row done so far (0.35 s in the writer at 500,000 of a million). The job still
    waits for its claimed rows once none is pending, and ends when none is left."""
    from server.db import Database

    db_path, engine = _mid_job(tmp_path, "j")
    plan = _plan(engine, queries.pending_left("j", 100))
    assert [step for step in plan if step.startswith("SEARCH job_rows USING") and "idx>?" in step], plan
    db = Database(db_path)
    try:
        assert await queries.finish(db, "j") is None  # pending rows
        with engine.begin() as c:
            c.exec_driver_sql("UPDATE job_rows SET status = 'done' WHERE status = 'pending'")
            c.exec_driver_sql("UPDATE jobs SET claim_from = 120")
        assert await queries.finish(db, "j") is None  # none pending, ten still claimed
        with engine.begin() as c:
            c.exec_driver_sql("UPDATE job_rows SET status = 'done', claimed_by = NULL WHERE status = 'claimed'")
        done = await queries.finish(db, "j")
        assert done is not None and done.status == "Completed", done
    finally:
        await db.dispose()
        engine.dispose()


async def test_a_cancel_skips_the_pending_rows_from_the_claim_cursor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A cancel skips the job's pending rows as claims find them: from the claim cursor on,
    through the primary key, not through every row done below it. Done and claimed rows stay
    as they are (the claimed ones are their workers' to settle); another job's rows too."""
    from server.db import Database

    db_path, engine = _mid_job(tmp_path, "j", "other")
    plan = _plan(engine, queries.skip_pending("j", 100))
    assert [step for step in plan if step.startswith("SEARCH job_rows USING") and "idx>?" in step], plan
    db = Database(db_path)
    try:
        assert await queries.request_cancel(db, ["j", "nope"], "asked") == ["j"]
        assert await queries.request_cancel(db, ["j"], "again") == []  # cancelled once
    finally:
        await db.dispose()
    with engine.connect() as c:
        rows = c.exec_driver_sql("SELECT job_id, status, count(*) FROM job_rows GROUP BY 1, 2 ORDER BY 1, 2").all()
        cancelled = c.exec_driver_sql("SELECT job_id, cancel_requested, reason FROM jobs ORDER BY 1").all()
    assert [tuple(r) for r in rows] == [("j", "claimed", 10), ("j", "done", 90), ("j", "skipped", 20),
                                        ("other", "claimed", 10), ("other", "done", 90), ("other", "pending", 20)]
    assert [tuple(r) for r in cancelled] == [("j", 1, "asked"), ("other", 0, None)]
    engine.dispose()


async def test_a_cancelled_job_ends_with_its_open_rows_skipped_and_counted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The finish of a cancelled job skips what is still pending (rows handed back after the
    cancel included: they reset the claim cursor) and its last log line counts every row once:
    done, errored and skipped add up to the job's rows."""
    from server.db import Database

    db_path, engine = _mid_job(tmp_path, "j")
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE jobs SET succeeded_count = 90")  # its 90 done rows
    db = Database(db_path)
    try:
        assert await queries.request_cancel(db, ["j"], "asked") == ["j"]  # rows 100-119 skipped
        assert await queries.finish(db, "j") is None  # rows 90-99 still claimed
        # The worker settles them: five done, one errored, four handed back (it is stopping).
        out = queries.Outcome(done=list(range(90, 95)), errors=[(95, "r95", "boom")], retry=[],
                              release=list(range(96, 100)), skip=[])
        assert await queries.record(db, "j", "w", out) == queries.Counts(95, 1, None)
        done = await queries.finish(db, "j")
        assert done is not None and done.status == "Cancelled", done
        assert done.summary == "Cancelled: 95 succeeded, 1 errored, 24 skipped of 120 (asked)"
    finally:
        await db.dispose()
    with engine.connect() as c:
        rows = c.exec_driver_sql("SELECT status, count(*) FROM job_rows GROUP BY 1 ORDER BY 1").all()
    assert [tuple(r) for r in rows] == [("done", 95), ("error", 1), ("skipped", 24)]
    engine.dispose()
