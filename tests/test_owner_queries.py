"""The queries by owner (orphan recovery, ``orbiter-bg orphans``) must not walk every
active task: with a backlog of 100,000 running tasks, recovering after a hundred closed
handlers took 2.2 s without the owner index (all of it inside the write transaction,
so every writer waited) against 23 ms with it. Their plans are pinned here."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import ClauseElement

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.store import admin_queries, queries
from orbiter.store.executor import compile_statement

STATUS_INDEX = "ix_background_tasks_status_created_at"
OWNER_INDEX = "ix_background_tasks_owner_id"

#: Each query by owner, and the index it must be planned on.
BY_OWNER: dict[str, tuple[ClauseElement, str]] = {
    "owner_has_active_tasks": (queries.owner_has_active_tasks(), OWNER_INDEX),
    "settle_orphans(failed)": (queries.settle_orphans("failed"), OWNER_INDEX),
    "settle_orphans(adopt)": (queries.settle_orphans("adopt"), OWNER_INDEX),
    "owners_of_active_tasks": (queries.owners_of_active_tasks(), STATUS_INDEX),
    "active_tasks_with_owner": (admin_queries.active_tasks_with_owner(), STATUS_INDEX),
}


def plan(db: Path, statement: ClauseElement) -> str:
    try:
        sql = compile_statement(statement).sql
    except ValueError:  # an expanding IN (the CLI's queries): render its values inline
        inline = {"literal_binds": True}
        sql = str(statement.compile(dialect=sqlite.dialect(), compile_kwargs=inline))
    with sqlite3.connect(db) as connection:
        rows = connection.execute(f"EXPLAIN QUERY PLAN {sql}", [None] * sql.count("?"))
        return " | ".join(row[3] for row in rows)


@pytest.mark.parametrize("name", sorted(BY_OWNER))
def test_queries_by_owner_use_an_index_and_never_scan_the_tasks(db_path: Path, name: str) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        for index in range(50):
            handler.submit(f"t{index}", "run")
            if index % 5:
                handler.handle_error(f"t{index}", "done")
    statement, index_name = BY_OWNER[name]
    text = plan(db_path, statement)
    assert f"USING INDEX {index_name}" in text, text
    assert "SCAN background_tasks" not in text, text
