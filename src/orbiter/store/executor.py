"""Runs the Core statements of ``queries.py`` straight on the driver connection.

The commit worker executes thousands of small statements a second; going through
SQLAlchemy's ``Connection.execute`` for each costs more than SQLite does. So each
statement is compiled once, to SQL text with positional (``?``) parameters, and executed
by the ``sqlite3`` connection itself; callers still pass parameters by name, and the
executor puts them in order (``sqlite3`` binds a ``?`` about four times faster than a
``:name``, which it looks up in the dict by a newly made string each time). The SQL
still comes only from ``queries.py``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter
from typing import Any, NamedTuple

from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from orbiter.store.codec import utc_now_text

__all__ = ["Db"]

_DIALECT = sqlite.dialect(paramstyle="qmark")


class _Compiled(NamedTuple):
    sql: str
    defaults: dict[str, Any]  # values of the statement's constant parameters
    order: Callable[[Mapping[str, Any]], tuple[Any, ...]]  # named values -> the ``?``s'

    def bind(self, params: Mapping[str, Any] | None) -> tuple[Any, ...]:
        """The statement's parameter values in ``?`` order, taken from ``params`` by name."""
        if not params:
            named: Mapping[str, Any] = self.defaults
        elif self.defaults:
            named = {**self.defaults, **params}
        else:
            named = params
        try:
            return self.order(named)
        except KeyError as exc:
            raise _missing(exc) from None

    def bind_many(self, many: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """:meth:`bind` for each mapping of ``many`` (in C when the statement has no
        constants of its own: no Python call per row)."""
        if self.defaults:
            return [self.bind(params) for params in many]
        try:
            return list(map(self.order, many))
        except KeyError as exc:
            raise _missing(exc) from None


def _missing(exc: KeyError) -> sqlite3.ProgrammingError:
    """The error for a parameter given no value (``exc`` names it)."""
    return sqlite3.ProgrammingError(f"no value for parameter :{exc.args[0]}")


def _orderer(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """A function picking ``names``' values out of a mapping, as a tuple (in C)."""
    if not names:
        return lambda _: ()
    if len(names) == 1:
        only = names[0]
        return lambda named: (named[only],)
    return itemgetter(*names)


_compiled: dict[int, tuple[ClauseElement, _Compiled]] = {}


def compile_statement(statement: ClauseElement) -> _Compiled:
    """SQL text and constant parameters of a statement (cached; statements are singletons)."""
    entry = _compiled.get(id(statement))
    if entry is not None and entry[0] is statement:
        return entry[1]
    compiled = statement.compile(dialect=_DIALECT)
    if "__[POSTCOMPILE_" in str(compiled):
        # Expanding (``in_([...])`` of a bindparam) or literal-execute parameters are
        # rendered per execution by SQLAlchemy, which this executor bypasses.
        raise ValueError(f"statement needs SQLAlchemy's per-execution rendering: {compiled}")
    defaults = {
        name: bind.effective_value
        for bind, name in compiled.bind_names.items()  # type: ignore[attr-defined]
        if not bind.required
    }
    names = tuple(compiled.positiontup or ()) if isinstance(compiled, SQLCompiler) else ()
    result = _Compiled(str(compiled), defaults, _orderer(names))
    _compiled[id(statement)] = (statement, result)  # keeps the statement alive: id stays unique
    return result


class Db:
    """What an operation gets: the worker's ``sqlite3`` connection, inside a transaction,
    and ``now``, the transaction's timestamp (as stored; taken on first use, then the
    same for every operation of the transaction)."""

    __slots__ = ("_now", "raw")

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw
        self._now: str | None = None

    def begin(self, sql: str) -> None:
        """Start a transaction (``sql`` is its ``BEGIN``), with a new ``now``."""
        self._now = None
        self.raw.execute(sql)

    @property
    def now(self) -> str:
        """The transaction's timestamp: the UTC time of its first use."""
        now = self._now
        if now is None:
            now = self._now = utc_now_text()
        return now

    def execute(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> sqlite3.Cursor:
        """Execute ``statement`` with ``params`` bound by name."""
        compiled = compile_statement(statement)
        return self.raw.execute(compiled.sql, compiled.bind(params))

    def all(self, statement: ClauseElement, params: dict[str, Any] | None = None) -> list[Any]:
        """Every row, as tuples."""
        return self.execute(statement, params).fetchall()

    def first(self, statement: ClauseElement, params: dict[str, Any] | None = None) -> Any:
        """The first row, or None (reads every row, so RETURNING statements finish)."""
        rows = self.all(statement, params)
        return rows[0] if rows else None

    def scalar(self, statement: ClauseElement, params: dict[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        row = self.first(statement, params)
        return None if row is None else row[0]

    def changes(self, statement: ClauseElement, params: dict[str, Any] | None = None) -> int:
        """Rows changed by a statement without RETURNING."""
        return self.execute(statement, params).rowcount

    def changes_many(self, statement: ClauseElement, many: Iterable[Mapping[str, Any]]) -> int:
        """Execute ``statement`` once for each set of values in ``many``, all in one call
        (``executemany``); return the rows changed in all."""
        compiled = compile_statement(statement)
        return self.raw.executemany(compiled.sql, compiled.bind_many(many)).rowcount

    def all_or_nothing(self, run: Callable[[], bool]) -> bool:
        """Call ``run`` in a savepoint: what it wrote is undone if it returns False (or
        raises)."""
        raw = self.raw
        raw.execute("SAVEPOINT all_or_nothing")
        try:
            kept = run()
        except BaseException:
            # The error is what the caller must see; undoing may fail too (SQLite may
            # have rolled the whole transaction back), and the transaction's own
            # rollback then ends the savepoint.
            with contextlib.suppress(sqlite3.Error):
                if raw.in_transaction:
                    raw.execute("ROLLBACK TO all_or_nothing")
                    raw.execute("RELEASE all_or_nothing")
            raise
        if not kept:
            raw.execute("ROLLBACK TO all_or_nothing")
        raw.execute("RELEASE all_or_nothing")
        return kept

    def mappings(
        self, statement: ClauseElement, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Every row, as dicts keyed by column name."""
        cursor = self.execute(statement, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
