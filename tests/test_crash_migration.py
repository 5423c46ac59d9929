"""An upgrade of an older file is one transaction, whoever runs it: a handler opening the
file, ``orbiter-bg migrate`` or ``alembic upgrade head``, SIGKILLed at its first change,
after its first revision, or at its commit, leaves the old schema and data as they were
(a fresh connection sees nothing half done), and the next handler upgrades it and sees
everything."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orbiter import migrate
from orbiter.store.schema import HEAD_REVISION, KNOWN_REVISIONS
from tests.helpers.crash_common import integrity, kill, queued, sql, start
from tests.test_crash import inspect, read_until

OLDEST = KNOWN_REVISIONS[0]
KILL_POINTS = {
    "first-change": "after:1:CREATE VIEW",  # the first statement of the next revision
    "first-revision-stamped": "after:1:UPDATE alembic_version",
    # 0006 edits the table's text in sqlite_schema: killed with the edit made, and with
    # the schema version raised, both still uncommitted.
    "status-check-respelled": "after:1:UPDATE sqlite_schema",
    "schema-version-raised": "after:1:PRAGMA schema_version=",
    "at-commit": f"commit:{len(KNOWN_REVISIONS) - 1}:UPDATE alembic_version",
}


def make_old_file(db: Path) -> None:
    """A file at the oldest revision: old0..old3 finished and queued, old4..5 running."""
    migrate.upgrade(str(db), OLDEST)
    connection = sqlite3.connect(db)
    with connection:
        for index in range(6):
            done = index < 4
            connection.execute(
                "INSERT INTO background_tasks (task_id, parent_task_id, status, merge_mode, "
                "payload, result, created_at, updated_at) VALUES (?, 'run', ?, ?, '{}', ?, "
                "'2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000')",
                (
                    f"old{index}",
                    "success" if done else "running",
                    "wakeup" if done else None,
                    f'"r{index}"' if done else None,
                ),
            )
            if done:
                connection.execute(
                    "INSERT INTO pending_queue (task_id, enqueued_at) "
                    "VALUES (?, '2026-01-01 00:00:00.000000')",
                    (f"old{index}",),
                )
    connection.close()


@pytest.mark.parametrize("how", ["handler", "cli", "alembic"])
@pytest.mark.parametrize("hook", KILL_POINTS.values(), ids=KILL_POINTS.keys())
def test_an_upgrade_killed_midway_leaves_the_old_schema_and_data(
    db_path: Path, how: str, hook: str
) -> None:
    make_old_file(db_path)
    old_schema = sql(db_path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    child = start("upgrade", str(db_path), how, hook)
    read_until(child, "hanging")
    kill(child)
    assert sql(db_path, "SELECT version_num FROM alembic_version") == [(OLDEST,)]
    assert sql(db_path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == old_schema
    assert sql(db_path, "SELECT count(*) FROM background_tasks") == [(6,)]
    assert queued(db_path) == [f"old{index}" for index in range(4)]
    assert integrity(db_path) == "ok"
    # The next handler upgrades the file and sees everything.
    seen = inspect(db_path, "--drain")
    assert seen["drained"] == [f"old{index}" for index in range(4)]
    assert {task_id: task["status"] for task_id, task in seen["tasks"].items()} == {
        f"old{index}": "success" if index < 4 else "running" for index in range(6)
    }
    assert sql(db_path, "SELECT version_num FROM alembic_version") == [(HEAD_REVISION,)]
