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
