"""Migration 0006: the check on ``background_tasks.status`` spelled without an IN list.

SQLite builds a temporary b-tree for a CHECK's IN list of more than two constants every
time the check runs (``OpenEphemeral`` in the statement's program), which made every
``submit`` and every status change pay for it. The migration respells the constraint in
place; these tests check that the respelled constraint refuses what the old one did,
that no write statement of the handler builds a temporary b-tree any more, and that the
change keeps every row, survives a new connection and goes back down cleanly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event

from orbiter import migrate
from orbiter._internal.background import BackgroundTaskHandler
from orbiter.store import queries
from orbiter.store.executor import compile_statement
from orbiter.store.schema import HEAD_REVISION

IN_LIST = "CHECK (status IN ('init', 'running', 'success', 'failed', 'timeout'))"
ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = (
    "CHECK (status = 'init' OR status = 'running' OR status = 'success' "
    "OR status = 'failed' OR status = 'timeout')"
)


def table_sql(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        row = connection.execute(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'background_tasks'"
        ).fetchone()
    return str(row[0])


def temporary_btrees(connection: sqlite3.Connection, sql: str) -> int:
    """How many temporary b-trees the program of ``sql`` opens."""
    program = connection.execute(f"EXPLAIN {sql}", [None] * sql.count("?")).fetchall()
    return sum(1 for step in program if step[1] == "OpenEphemeral")


WRITES = {
    "submit": queries.insert_task(),
    "handle_result": queries.complete_task(False),
    "handle_error": queries.fail_task(False),
}


def test_a_new_file_gets_the_comparisons(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    assert COMPARISONS in table_sql(db_path)
    assert "IN ('init'" not in table_sql(db_path)


@pytest.mark.parametrize("call", sorted(WRITES))
def test_no_write_builds_a_temporary_btree(db_path: Path, call: str) -> None:
    BackgroundTaskHandler(database=db_path).close()
    sql = compile_statement(WRITES[call]).sql
    with sqlite3.connect(db_path) as connection:
        assert temporary_btrees(connection, sql) == 0
    migrate.downgrade(str(db_path), "0005")  # the old spelling did build one
    with sqlite3.connect(db_path) as connection:
        assert temporary_btrees(connection, sql) == 1


@pytest.mark.parametrize("revision", ["0005", HEAD_REVISION])
def test_the_check_refuses_an_unknown_status_either_way(db_path: Path, revision: str) -> None:
    migrate.upgrade(str(db_path), revision)
    with sqlite3.connect(db_path) as connection:
        insert = (
            "INSERT INTO background_tasks (task_id, parent_task_id, status, payload, "
            "created_at, updated_at) VALUES (?, 'run', ?, 'null', 'now', 'now')"
        )
        for status in ("init", "running", "success", "failed", "timeout"):
            connection.execute(insert, (status, status))
        for bad in ("bogus", "RUNNING", "", None):
            with pytest.raises(sqlite3.IntegrityError):
                connection.execute(insert, (f"bad-{bad}", bad))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            connection.execute("UPDATE background_tasks SET status = 'done'")


def test_upgrade_keeps_every_row_and_the_file_whole(db_path: Path) -> None:
    migrate.upgrade(str(db_path), "0005")
    with sqlite3.connect(db_path) as connection:
        before = connection.execute("SELECT * FROM background_tasks ORDER BY task_id").fetchall()
        version = connection.execute("PRAGMA schema_version").fetchone()[0]
    assert IN_LIST in table_sql(db_path)
    with BackgroundTaskHandler(database=db_path) as handler:  # upgrades to 0006
        handler.submit("after", "run", payload={"n": 1})
    assert COMPARISONS in table_sql(db_path)
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # Open connections see the change: SQLite reads the schema again.
        assert connection.execute("PRAGMA schema_version").fetchone()[0] > version
        after = connection.execute(
            "SELECT * FROM background_tasks WHERE task_id != 'after' ORDER BY task_id"
        ).fetchall()
    assert after == before


def test_a_connection_open_across_the_upgrade_uses_the_new_check(db_path: Path) -> None:
    migrate.upgrade(str(db_path), "0005")
    # (No statement cache: a cached EXPLAIN would show the program it was compiled to.)
    with sqlite3.connect(db_path, cached_statements=0) as connection:
        sql = compile_statement(WRITES["handle_result"]).sql
        assert temporary_btrees(connection, sql) == 1
        migrate.upgrade(str(db_path))
        # Its next read finds the schema version raised and reads the schema again
        # (EXPLAIN alone reads nothing, so it would still show the cached schema).
        connection.execute("SELECT count(*) FROM background_tasks").fetchall()
        assert temporary_btrees(connection, sql) == 0


def test_up_down_up_round_trip_with_data(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run", payload=[1])
        handler.handle_error("a", "boom")
    migrate.downgrade(str(db_path), "0005")
    assert IN_LIST in table_sql(db_path)
    assert COMPARISONS not in table_sql(db_path)
    migrate.upgrade(str(db_path))
    assert COMPARISONS in table_sql(db_path)
    with BackgroundTaskHandler(database=db_path) as handler:
        task = handler.get_task("a")
        assert task is not None and task.error == "boom"


def test_a_table_changed_by_hand_is_left_as_it_is(db_path: Path) -> None:
    migrate.upgrade(str(db_path), "0005")
    with sqlite3.connect(db_path) as connection:  # someone spelled the check their own way
        version = connection.execute("PRAGMA schema_version").fetchone()[0]
        connection.execute("PRAGMA writable_schema=ON")
        connection.execute(
            "UPDATE sqlite_schema SET sql = replace(sql, ?, ?) WHERE name = 'background_tasks'",
            (IN_LIST, "CHECK (status IN ('running', 'init', 'success', 'failed', 'timeout'))"),
        )
        connection.execute(f"PRAGMA schema_version={version + 1}")
        connection.execute("PRAGMA writable_schema=OFF")
        connection.commit()
    hand_made = table_sql(db_path)
    assert migrate.upgrade(str(db_path)) == HEAD_REVISION
    assert table_sql(db_path) == hand_made
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("works", "run")


SQLITE_DBCONFIG_DEFENSIVE = 1010


def make_defensive(connection: sqlite3.Connection) -> None:
    """Turn on SQLite's defensive mode (no edits of sqlite_schema), as some builds do by
    default: ``setconfig`` on Python 3.12+, else ``sqlite3_db_config`` through ctypes
    on the ``sqlite3*`` that CPython keeps right after the object header."""
    setconfig = getattr(connection, "setconfig", None)
    if setconfig is not None:
        setconfig(SQLITE_DBCONFIG_DEFENSIVE, True)
        return
    library = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    handle = ctypes.c_void_p.from_address(id(connection) + 2 * ctypes.sizeof(ctypes.c_void_p))
    now_on = ctypes.c_int(-1)
    library.sqlite3_db_config(
        handle, SQLITE_DBCONFIG_DEFENSIVE, ctypes.c_int(1), ctypes.byref(now_on)
    )
    assert now_on.value == 1


@pytest.fixture
def defensive_connections() -> Iterator[None]:
    """Every SQLAlchemy connection opened meanwhile is in defensive mode."""
    probe = sqlite3.connect(":memory:")
    try:
        make_defensive(probe)
        probe.execute("CREATE TABLE t (x)")
        probe.execute("PRAGMA writable_schema=ON")
        with pytest.raises(sqlite3.Error):
            probe.execute("UPDATE sqlite_schema SET sql = sql")
    except (OSError, AttributeError, AssertionError) as exc:  # pragma: no cover
        pytest.skip(f"cannot turn on SQLite's defensive mode here: {exc!r}")
    finally:
        probe.close()

    def defensive(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        make_defensive(dbapi_connection)

    event.listen(Engine, "connect", defensive)
    try:
        yield
    finally:
        event.remove(Engine, "connect", defensive)


@pytest.mark.usefixtures("defensive_connections")
def test_where_sqlite_refuses_schema_edits_the_upgrade_keeps_the_in_list(db_path: Path) -> None:
    migrate.upgrade(str(db_path), "0005")
    with sqlite3.connect(db_path) as connection:
        connection.execute(
            "INSERT INTO background_tasks (task_id, parent_task_id, status, payload, "
            "created_at, updated_at) VALUES ('kept', 'run', 'running', 'null', 'now', 'now')"
        )
    connection.close()
    with BackgroundTaskHandler(database=db_path) as handler:  # upgrades to 0006
        assert handler.get_task("kept") is not None
        handler.submit("new", "run")
    assert IN_LIST in table_sql(db_path)
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (HEAD_REVISION,)
        ]
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.usefixtures("defensive_connections")
def test_where_sqlite_refuses_schema_edits_a_new_file_still_works(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run")
    with BackgroundTaskHandler(database=db_path) as handler:
        assert handler.get_task("a") is not None


def test_alembic_sql_mode_writes_a_comment_for_the_respelling(tmp_path: Path) -> None:
    env = {**os.environ, "ORBITER_BG_DATABASE": str(tmp_path / "never-made.db")}
    alembic = Path(sys.executable).with_name("alembic")
    done = subprocess.run(
        [str(alembic), "upgrade", "head", "--sql"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "-- 0006: the check stays" in done.stdout
    assert "UPDATE alembic_version SET version_num='0006'" in done.stdout
    assert not (tmp_path / "never-made.db").exists()


def test_where_an_authorizer_refuses_schema_edits_the_upgrade_keeps_the_in_list(
    db_path: Path,
) -> None:
    # An application may guard its connections with an authorizer; SQLite then words
    # the refusal "not authorized".
    def no_schema_edits(action: int, table: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_UPDATE and table == "sqlite_master":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def guard(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.set_authorizer(no_schema_edits)

    migrate.upgrade(str(db_path), "0005")
    event.listen(Engine, "connect", guard)
    try:
        assert migrate.upgrade(str(db_path)) == HEAD_REVISION
    finally:
        event.remove(Engine, "connect", guard)
    assert IN_LIST in table_sql(db_path)
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("works", "run")
