"""The executor runs ``queries.py`` statements on a plain ``sqlite3`` connection: values are
passed by name and bound to the ``?`` placeholders in the statement's order, together with
the statement's own constants."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import bindparam, select

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.store import queries
from orbiter.store.executor import Db, compile_statement
from orbiter.store.schema import background_tasks


@pytest.fixture
def db(db_path: Path) -> Iterator[Db]:
    """The handler's real schema, on a plain connection."""
    BackgroundTaskHandler(database=db_path).close()
    connection = sqlite3.connect(db_path, isolation_level=None)
    yield Db(connection)
    connection.close()


def row(db: Db, task_id: str) -> tuple[object, ...]:
    sql = "SELECT status, merge_mode, result, created_at, updated_at FROM background_tasks "
    return tuple(db.raw.execute(sql + "WHERE task_id = ?", (task_id,)).fetchone())


def submit(db: Db, task_id: str, now: str) -> int:
    params = {"owner_id": None, "payload": "{}", "status": "running", "parent_task_id": "run"}
    return db.changes(queries.insert_task(), {**params, "task_id": task_id, "now": now})


def test_named_values_land_in_their_columns_whatever_their_order(db: Db) -> None:
    assert submit(db, "a", "T1") == 1
    # ``:now`` fills two columns (``created_at`` and ``updated_at``).
    assert row(db, "a") == ("running", None, None, "T1", "T1")
    db.execute(queries.enqueue(), {"now": "T2", "task_id": "a"})  # not the SQL's order
    rows = db.raw.execute("SELECT task_id, enqueued_at FROM pending_queue").fetchall()
    assert rows == [("a", "T2")]
    assert db.scalar(queries.max_pending_seq()) == 1  # a statement with no parameters


def test_a_statements_own_constants_are_bound_too(db: Db) -> None:
    # The active statuses, bound as parameters so the query is planned on the owner index.
    statement = queries.owner_has_active_tasks()
    assert compile_statement(statement).defaults
    db.changes(
        queries.insert_task(),
        {"owner_id": "o", "payload": "{}", "status": "running", "parent_task_id": "run"}
        | {"task_id": "a", "now": "T1"},
    )
    assert db.scalar(statement, {"id": "o"}) == 1
    params = {"result": "7", "merge_mode": "hot", "now": "T2", "id": "a"}
    assert db.changes(queries.complete_task(False), params) == 1
    assert db.scalar(statement, {"id": "o"}) == 0


def test_a_missing_value_is_named_in_the_error(db: Db) -> None:
    with pytest.raises(sqlite3.ProgrammingError, match=":now"):
        db.execute(queries.enqueue(), {"task_id": "a"})
    assert db.raw.execute("SELECT count(*) FROM pending_queue").fetchone() == (0,)


def test_a_missing_value_in_a_group_is_named_and_nothing_is_written(db: Db) -> None:
    submit(db, "a", "T1")
    submit(db, "b", "T1")
    with pytest.raises(sqlite3.ProgrammingError, match=":now"):
        db.changes_many(queries.enqueue(), [{"task_id": "a", "now": "T2"}, {"task_id": "b"}])
    assert db.raw.execute("SELECT count(*) FROM pending_queue").fetchone() == (0,)
    rows = [{"task_id": "a", "now": "T2"}, {"now": "T3", "task_id": "b"}]  # any key order
    assert db.changes_many(queries.enqueue(), rows) == 2
    queued = db.raw.execute("SELECT task_id, enqueued_at FROM pending_queue ORDER BY seq")
    assert queued.fetchall() == [("a", "T2"), ("b", "T3")]


def test_a_statement_rendered_per_execution_is_refused_when_compiled() -> None:
    expanding = select(background_tasks.c.task_id).where(
        background_tasks.c.task_id.in_(bindparam("ids", expanding=True))
    )
    with pytest.raises(ValueError, match="per-execution"):
        compile_statement(expanding)


def test_now_is_one_timestamp_per_transaction_taken_at_first_use(db: Db) -> None:
    db.begin("BEGIN IMMEDIATE")
    first = db.now
    time.sleep(0.002)
    assert db.now == first  # every operation of a transaction stores the same time
    db.raw.execute("COMMIT")
    time.sleep(0.002)
    db.begin("BEGIN")
    second = db.now
    db.raw.execute("COMMIT")
    assert second > first  # a new transaction, a new time (the stored text sorts by time)
    assert datetime.strptime(second, "%Y-%m-%d %H:%M:%S.%f")
