"""The executor runs ``queries.py`` statements on a plain ``sqlite3`` connection: values are
passed by name and bound to the ``?`` placeholders in the statement's order."""

from __future__ import annotations

import sqlite3

import pytest

from orbiter.store import queries
from orbiter.store.executor import Db


@pytest.fixture
def db() -> Db:
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.execute("CREATE TABLE background_tasks (task_id TEXT PRIMARY KEY, status TEXT)")
    connection.execute(
        "CREATE TABLE pending_queue (seq INTEGER PRIMARY KEY, task_id TEXT UNIQUE, "
        "enqueued_at TEXT, claimed_by TEXT)"
    )
    return Db(connection)


def test_named_values_land_in_their_columns_whatever_their_order(db: Db) -> None:
    db.execute(queries.enqueue(), {"now": "T1", "task_id": "a"})  # not the SQL's order
    db.execute(queries.enqueue(), {"task_id": "b", "now": "T2"})
    rows = db.raw.execute("SELECT task_id, enqueued_at FROM pending_queue ORDER BY seq")
    assert rows.fetchall() == [("a", "T1"), ("b", "T2")]
    assert db.scalar(queries.max_pending_seq()) == 2  # a statement with no parameters


def test_a_statements_own_constants_are_bound_too(db: Db) -> None:
    db.raw.execute("INSERT INTO background_tasks VALUES ('a', 'running'), ('b', 'success')")
    assert db.scalar(queries.task_status(), {"id": "b"}) == "success"
    assert db.scalar(queries.task_status(), {"id": "nope"}) is None


def test_a_missing_value_is_named_in_the_error(db: Db) -> None:
    with pytest.raises(sqlite3.ProgrammingError, match=":now"):
        db.execute(queries.enqueue(), {"task_id": "a"})
    assert db.raw.execute("SELECT count(*) FROM pending_queue").fetchone() == (0,)
