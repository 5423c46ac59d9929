"""Migration 0007 dropped the index on ``background_tasks.owner_id``: every query by owner
also asks for active tasks, and must find them through the status index (which holds the
few active tasks apart from the many finished ones), never by scanning the table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import ClauseElement

from orbiter import migrate
from orbiter._internal.background import BackgroundTaskHandler
from orbiter.store import admin_queries, queries
from orbiter.store.executor import compile_statement

STATUS_INDEX = "ix_background_tasks_status_created_at"
OWNER_INDEX = "ix_background_tasks_owner_id"

BY_OWNER: dict[str, ClauseElement] = {
    "owners_of_active_tasks": queries.owners_of_active_tasks(),
    "owner_has_active_tasks": queries.owner_has_active_tasks(),
    "settle_orphans(failed)": queries.settle_orphans("failed"),
    "settle_orphans(adopt)": queries.settle_orphans("adopt"),
    "active_tasks_with_owner": admin_queries.active_tasks_with_owner(),
}


def indexes(db: Path) -> set[str]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")
        return {row[0] for row in rows}


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
def test_queries_by_owner_use_the_status_index(db_path: Path, name: str) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        for index in range(50):
            handler.submit(f"t{index}", "run")
            if index % 5:
                handler.handle_error(f"t{index}", "done")
    text = plan(db_path, BY_OWNER[name])
    assert f"USING INDEX {STATUS_INDEX}" in text, text
    assert "SCAN background_tasks" not in text, text


def test_the_owner_index_is_gone_and_comes_back_on_downgrade(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run")
    assert OWNER_INDEX not in indexes(db_path)
    migrate.downgrade(str(db_path), "0006")
    assert OWNER_INDEX in indexes(db_path)
    migrate.upgrade(str(db_path))
    assert OWNER_INDEX not in indexes(db_path)
    with BackgroundTaskHandler(database=db_path) as handler:
        assert handler.get_task("a") is not None
