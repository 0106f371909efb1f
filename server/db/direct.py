"""Core statements run on SQLite's own cursor, for the upload recorder's transaction.

A statement stays a SQLAlchemy Core statement on the mapped tables; what this skips is
SQLAlchemy's work around each execution (cache key, parameter and result objects, events):
about 120 us a statement on this machine against 15 us for the same SQL on the ``sqlite3``
cursor (one batch row and three file rows), and the recorder runs three or four a group.

``Direct(stmt)`` compiles the statement with SQLite's dialect once per length of each
expanding ``IN`` list (and, for an INSERT, per set of columns given), keeps the bind processors
of its parameters and the result processors of its columns (SQLite stores a DateTime as text,
for one), and runs it on the DBAPI connection under the SQLAlchemy ``Connection`` given, inside
its transaction. A driver error is raised as SQLAlchemy raises it (``IntegrityError``,
``OperationalError`` with the driver's error as ``orig``). Any dialect but SQLite's ``pysqlite``
goes through ``Connection.execute`` as before.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Delete, Insert, Select, Update, exc

_Processor = Callable[[Any], Any] | None


class _Plan:
    """One compiled form: its SQL, where each positional parameter comes from and how it is
    converted, and how a result row is made."""

    def __init__(self, sql: str, slots: list[tuple[str, int | None, _Processor]],
                 row: Any | None, results: list[_Processor]) -> None:
        self.sql = sql
        self.slots = slots  # (parameter name, index in its list or None, bind processor)
        self.row = row  # named tuple class of the result rows (None: no result)
        self.results = results
        self.converts = any(p is not None for p in results)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        out = []
        for name, i, proc in self.slots:
            v = params[name] if i is None else params[name][i]
            out.append(v if proc is None else proc(v))
        return out

    def make(self, raw: Sequence[Any]) -> Any:
        if self.converts:
            raw = [v if p is None else p(v) for p, v in zip(self.results, raw, strict=True)]
        return self.row._make(raw)


class Direct:
    """A Core statement and its compiled forms; ``all``, ``one_each`` and ``run`` take the
    ``Connection`` of the caller's transaction and the statement's parameters by name."""

    def __init__(self, stmt: Select[Any] | Insert | Update | Delete) -> None:
        self.stmt = stmt
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._expanding = sorted(k for k, b in stmt.compile().binds.items() if b.expanding)

    @staticmethod
    def direct(conn: Connection) -> bool:
        return conn.dialect.name == "sqlite" and conn.dialect.driver == "pysqlite"

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """The result rows (named tuples; SQLAlchemy Rows on other dialects)."""
        if not self.direct(conn):
            return list(conn.execute(self.stmt, params))
        plan = self._plan(conn, params)
        assert plan.row is not None, "the statement returns no rows"
        return [plan.make(r) for r in self._run(conn, plan, params).fetchall()]

    def one_each(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Run once per parameter set, in order; the first column of each one's single result
        row (an INSERT ... RETURNING id: the ids, in the order of ``params``)."""
        if not params:
            return []
        if not self.direct(conn):
            return list(conn.execute(self.stmt, list(params)).scalars())
        out = []
        for p in params:
            plan = self._plan(conn, p)
            assert plan.row is not None, "the statement returns no rows"
            out.append(plan.make(self._run(conn, plan, p).fetchone())[0])
        return out

    def run(self, conn: Connection, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Execute for one parameter set, or for each of a list of them (executemany; none for
        an empty list)."""
        if not isinstance(params, Mapping) and not params:
            return
        if not self.direct(conn):
            conn.execute(self.stmt, params if isinstance(params, Mapping) else list(params))
            return
        if isinstance(params, Mapping):
            self._run(conn, self._plan(conn, params), params)
            return
        plan = self._plan(conn, params[0])
        try:
            conn.connection.driver_connection.executemany(plan.sql, [plan.args(p) for p in params])
        except conn.dialect.loaded_dbapi.Error as e:
            raise _wrapped(conn, plan, e) from e

    def _run(self, conn: Connection, plan: _Plan, params: Mapping[str, Any]) -> Any:
        try:
            return conn.connection.driver_connection.execute(plan.sql, plan.args(params))
        except conn.dialect.loaded_dbapi.Error as e:
            raise _wrapped(conn, plan, e) from e

    def _plan(self, conn: Connection, params: Mapping[str, Any]) -> _Plan:
        lengths = tuple(len(params[k]) for k in self._expanding)
        columns = tuple(params) if isinstance(self.stmt, Insert) else ()
        key = (lengths, columns)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._compile(conn, lengths, columns)
        return plan

    def _compile(self, conn: Connection, lengths: tuple[int, ...], columns: tuple[str, ...]) -> _Plan:
        dialect = conn.dialect
        compiled = self.stmt.compile(dialect=dialect, column_keys=list(columns) or None)
        # The SQL for lists of these lengths (SQLAlchemy's own expansion of ``IN``, run once).
        shape: dict[str, Any] = {k: None for k in compiled.binds}
        shape.update({k: [None] * n for k, n in zip(self._expanding, lengths, strict=True)})
        state = compiled.construct_expanded_state(shape)
        expanded = {name: (k, i) for k, names in state.parameter_expansion.items() for i, name in enumerate(names)}
        slots: list[tuple[str, int | None, _Processor]] = []
        for name in state.positiontup or ():
            base, i = expanded.get(name, (name, None))
            if columns and base not in columns:  # a column default SQLAlchemy would compute
                raise ValueError(f"an INSERT run by Direct takes every column it writes: {base!r} is missing")
            impl = compiled.binds[base].type.dialect_impl(dialect)
            slots.append((base, i, impl.bind_processor(dialect)))
        # What a row holds: a SELECT's columns, a DML statement's RETURNING columns.
        stmt = self.stmt
        cols = stmt.selected_columns if isinstance(stmt, Select) else stmt.exported_columns
        row, results = None, []
        if len(cols):
            row = namedtuple("DirectRow", list(cols.keys()), rename=True)  # type: ignore[misc]
            results = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in cols]
        return _Plan(state.statement, slots, row, results)


def _wrapped(conn: Connection, plan: _Plan, e: Exception) -> BaseException:
    """The driver's error as SQLAlchemy raises it (its class for the error, ``orig``)."""
    return exc.DBAPIError.instance(plan.sql, None, e, conn.dialect.loaded_dbapi.Error,
                                   dialect=conn.dialect)
