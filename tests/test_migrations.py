"""Migrations: one head, no drift from schema.py, up/down round trips, the alembic CLI."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from orbiter import migrate
from orbiter._internal.background import BackgroundTaskHandler
from orbiter.errors import InvalidValueError, SchemaError
from orbiter.store.schema import HEAD_REVISION, KNOWN_REVISIONS, metadata

ROOT = Path(__file__).resolve().parents[1]


def script_directory() -> ScriptDirectory:
    return ScriptDirectory(str(migrate.migrations_path()))


def user_tables(db_path: Path) -> set[str]:
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
    return {row[0] for row in rows}


def stored_revision(db_path: Path) -> str | None:
    with sqlite3.connect(db_path) as connection:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    return None if row is None else str(row[0])


def test_single_head_matching_the_code() -> None:
    scripts = script_directory()
    assert scripts.get_heads() == [HEAD_REVISION]
    chain = [rev.revision for rev in scripts.walk_revisions("base", "heads")]
    assert tuple(reversed(chain)) == KNOWN_REVISIONS


def test_migration_files_are_named_by_revision() -> None:
    for path in (ROOT / "migrations" / "versions").glob("*.py"):
        revision = path.name.split("_", 1)[0]
        assert revision in KNOWN_REVISIONS, path.name


def test_upgrade_from_empty_matches_schema_py(db_path: Path) -> None:
    assert migrate.upgrade(str(db_path)) == HEAD_REVISION
    engine = create_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_handler_creates_the_same_schema_as_migrate(tmp_path: Path) -> None:
    by_handler, by_migrate = tmp_path / "a.db", tmp_path / "b.db"
    BackgroundTaskHandler(database=by_handler).close()
    migrate.upgrade(str(by_migrate))

    def schema(path: Path) -> list[tuple[str, str]]:
        with sqlite3.connect(path) as connection:
            return connection.execute(
                "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
            ).fetchall()

    assert schema(by_handler) == schema(by_migrate)


@pytest.mark.parametrize(
    ("change", "revision", "message"),
    [
        ("upgrade", "bogus", "unknown revision"),
        ("upgrade", "9999", "unknown revision"),
        ("upgrade", "base", "cannot upgrade to 'base'"),
        ("downgrade", "head", "cannot downgrade to 'head'"),
    ],
)
def test_an_unknown_revision_is_refused_before_a_file_is_made(
    db_path: Path, change: str, revision: str, message: str
) -> None:
    with pytest.raises(InvalidValueError, match=message):
        getattr(migrate, change)(str(db_path), revision)
    assert not db_path.exists()


def test_relative_steps_move_through_the_history(db_path: Path) -> None:
    assert migrate.upgrade(str(db_path), "+1") == KNOWN_REVISIONS[0]
    assert migrate.upgrade(str(db_path), "heads") == HEAD_REVISION
    assert migrate.downgrade(str(db_path), "-1") == KNOWN_REVISIONS[-2]
    with pytest.raises(InvalidValueError, match="Relative revision"):
        migrate.upgrade(str(db_path), "+9")
    assert migrate.upgrade(str(db_path)) == HEAD_REVISION


def test_downgrade_base_then_upgrade_round_trip(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run")
    assert migrate.downgrade(str(db_path), "base") is None
    assert user_tables(db_path) == {"alembic_version"}
    assert migrate.upgrade(str(db_path)) == HEAD_REVISION
    assert {"background_tasks", "pending_queue"} <= user_tables(db_path)
    with BackgroundTaskHandler(database=db_path) as handler:
        assert handler.list_tasks() == []


def test_each_step_down_and_up(db_path: Path) -> None:
    migrate.upgrade(str(db_path))
    for revision in reversed(KNOWN_REVISIONS[:-1]):
        assert migrate.downgrade(str(db_path), revision) == revision
    migrate.downgrade(str(db_path), "base")
    for revision in KNOWN_REVISIONS:
        assert migrate.upgrade(str(db_path), revision) == revision


@pytest.mark.skipif(len(KNOWN_REVISIONS) < 2, reason="needs an older revision to exist")
def test_older_schema_is_upgraded_or_refused(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("kept", "run", payload={"x": 1})
    older = KNOWN_REVISIONS[-2]
    migrate.downgrade(str(db_path), older)
    with pytest.raises(SchemaError, match=r"orbiter-bg migrate --db"):
        BackgroundTaskHandler(database=db_path, auto_migrate=False)
    assert stored_revision(db_path) == older
    with BackgroundTaskHandler(database=db_path) as handler:
        assert handler.get_task("kept").payload == {"x": 1}  # type: ignore[union-attr]
    assert stored_revision(db_path) == HEAD_REVISION


def run_alembic(database: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``alembic`` command from the project root with ``ORBITER_BG_DATABASE``
    set to ``database`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "ORBITER_BG_DATABASE"}
    if database is not None:
        env["ORBITER_BG_DATABASE"] = database
    alembic = Path(sys.executable).with_name("alembic")
    return subprocess.run(
        [str(alembic), *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def test_alembic_command_line_uses_the_environment_variable(db_path: Path) -> None:
    def run(*args: str, database: str = str(db_path)) -> None:
        completed = run_alembic(database, *args)
        assert completed.returncode == 0, completed.stderr

    run("upgrade", "head")
    assert stored_revision(db_path) == HEAD_REVISION
    assert {"background_tasks", "pending_queue"} <= user_tables(db_path)
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with BackgroundTaskHandler(database=db_path, auto_migrate=False) as handler:
        handler.submit("a", "run")
    run("downgrade", "base")
    assert user_tables(db_path) == {"alembic_version"}
    run("upgrade", "head", database=f"sqlite+aiosqlite:///{db_path}")
    assert stored_revision(db_path) == HEAD_REVISION


def test_alembic_without_database_says_what_to_set() -> None:
    completed = run_alembic(None, "upgrade", "head")
    assert completed.returncode != 0
    assert "ORBITER_BG_DATABASE" in completed.stderr + completed.stdout


@pytest.mark.skipif(len(KNOWN_REVISIONS) < 2, reason="needs an older revision to exist")
@pytest.mark.parametrize("way", ["migrate.upgrade", "alembic"])
def test_an_upgrade_that_would_keep_broken_foreign_keys_is_refused(db_path: Path, way: str) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("kept", "run")
    older = KNOWN_REVISIONS[-2]
    migrate.downgrade(str(db_path), older)
    with sqlite3.connect(db_path) as connection:  # foreign keys are off by default here
        connection.execute(
            "INSERT INTO pending_queue (task_id, enqueued_at) VALUES ('nowhere', '2026-01-01')"
        )
    if way == "alembic":
        completed = run_alembic(str(db_path), "upgrade", "head")
        assert completed.returncode != 0
        assert "broken foreign keys" in completed.stderr
    else:
        with pytest.raises(SchemaError, match="broken foreign keys"):
            migrate.upgrade(str(db_path))
    assert stored_revision(db_path) == older  # the whole upgrade was rolled back


def test_alembic_sql_mode_prints_every_revision_up_and_down(tmp_path: Path) -> None:
    # Offline there is no file: a revision must not ask the database anything.
    target = str(tmp_path / "never-made.db")
    up = run_alembic(target, "upgrade", "head", "--sql")
    assert up.returncode == 0, up.stderr
    down = run_alembic(target, "downgrade", f"{HEAD_REVISION}:base", "--sql")
    assert down.returncode == 0, down.stderr
    for revision in KNOWN_REVISIONS:
        assert f"'{revision}'" in up.stdout  # the INSERT or UPDATE of alembic_version
    assert "DROP TABLE background_tasks" in down.stdout
    assert not Path(target).exists()
