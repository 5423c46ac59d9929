"""Schema state and migrations, callable from code, the CLI and the tests.

The top-level ``migrations/`` folder is the single source of Alembic revisions; wheels
carry a copy as ``orbiter/_migrations``. A handler opening a file checks the stored
revision cheaply (one query, no Alembic import) and only loads Alembic to change it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text

from orbiter.errors import InvalidValueError, SchemaError
from orbiter.store.engine import (
    create_sync_engine,
    enable_wal,
    guarded_open,
    ready_file,
    resolve_database,
    run_pragma,
)
from orbiter.store.schema import HEAD_REVISION, KNOWN_REVISIONS

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "check_foreign_keys",
    "current_revision",
    "downgrade",
    "ensure_schema",
    "migrations_path",
    "upgrade",
]

logger = logging.getLogger(__name__)


def migrations_path() -> Path:
    """The Alembic script folder: inside the installed package, else the source tree's."""
    packaged = resources.files("orbiter") / "_migrations"
    if packaged.is_dir() and (packaged / "env.py").is_file():
        return Path(str(packaged))
    source_tree = Path(__file__).resolve().parents[2] / "migrations"
    if (source_tree / "env.py").is_file():
        return source_tree
    raise SchemaError(
        "the orbiter-background migrations are missing from this installation "
        "(expected orbiter/_migrations in the package)"
    )


def alembic_config(connection: Connection) -> Config:
    """An Alembic config that runs on ``connection`` (no ini file, no URL)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes["connection"] = connection
    return config


def current_revision(connection: Connection) -> str | None:
    """The stored schema revision, or None if the database has no ``alembic_version``."""
    has_table = connection.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
    ).first()
    if has_table is None:
        return None
    rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    if not rows:
        return None  # downgraded to base: no schema
    if len(rows) != 1:
        raise SchemaError(
            f"the alembic_version table holds {len(rows)} revisions; expected exactly one"
        )
    return str(rows[0][0])


def _user_tables(connection: Connection) -> list[str]:
    """Names of the tables, views and triggers in the file (SQLite's own excepted)."""
    rows = connection.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view', 'trigger') "
        "AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).all()
    return [str(row[0]) for row in rows]


def _upgrade_command(where: str) -> str:
    return f"orbiter-bg migrate --db {where}"


def schema_problem(connection: Connection, where: str, *, auto_migrate: bool) -> str | None:
    """Why the schema cannot be used as it is, or None if it is at head.

    Returns the string ``"upgrade"`` when an upgrade is needed and allowed.

    Raises:
        SchemaError: for a foreign, newer or (with ``auto_migrate=False``) older schema.
    """
    revision = current_revision(connection)
    if revision == HEAD_REVISION:
        return None
    if revision is None:
        tables = [name for name in _user_tables(connection) if name != "alembic_version"]
        if tables:
            raise SchemaError(
                f"{where} is a SQLite database but not an orbiter-background one "
                f"(it has {', '.join(tables[:5])}{'...' if len(tables) > 5 else ''} "
                "and no schema revision); refusing to change it"
            )
        return "upgrade"  # a new, empty file: always created at head
    if revision not in KNOWN_REVISIONS:
        raise SchemaError(
            f"{where} has schema revision {revision!r}, which this version of "
            f"orbiter-background does not know (it knows up to {HEAD_REVISION!r}): the file "
            "was written by a newer version, or is not an orbiter-background database. "
            "Upgrade orbiter-background; the file was not changed"
        )
    if not auto_migrate:
        raise SchemaError(
            f"{where} has schema revision {revision!r} but this version needs "
            f"{HEAD_REVISION!r}; run `{_upgrade_command(where)}` "
            f"(or `ORBITER_BG_DATABASE={where} alembic upgrade head`), "
            "or open it with auto_migrate=True"
        )
    return "upgrade"


def ensure_schema(connection: Connection, where: str, *, auto_migrate: bool) -> None:
    """Bring a database to the head revision, or raise :class:`SchemaError` saying why not.

    The check runs in a read transaction first; only when a change is needed is the write
    lock taken, the state read again (another process may have migrated meanwhile), and
    the whole upgrade applied in that one transaction.
    """
    connection.info["begin"] = "BEGIN"
    try:
        with connection.begin():
            problem = schema_problem(connection, where, auto_migrate=auto_migrate)
    finally:
        connection.info.pop("begin", None)
    enable_wal(connection)
    if problem is not None:
        upgrade_connection(connection, where, "head", auto_migrate=auto_migrate)


def upgrade_connection(
    connection: Connection, where: str, revision: str = "head", *, auto_migrate: bool = True
) -> None:
    """Upgrade under the write lock, in one transaction (foreign keys off while tables
    are rebuilt, checked before commit)."""
    from alembic import command

    run_pragma(connection, "PRAGMA foreign_keys=OFF")
    try:
        with connection.begin():
            if revision == "head" and (
                schema_problem(connection, where, auto_migrate=auto_migrate) is None
            ):
                return
            before = current_revision(connection)
            with _alembic_errors():
                command.upgrade(alembic_config(connection), revision)
            check_foreign_keys(connection)
            logger.info("migrated %s from %s to %s", where, before, current_revision(connection))
    finally:
        run_pragma(connection, "PRAGMA foreign_keys=ON")


def downgrade_connection(connection: Connection, revision: str) -> None:
    """Downgrade to ``revision`` (``"base"`` removes the schema) in one transaction."""
    from alembic import command

    run_pragma(connection, "PRAGMA foreign_keys=OFF")
    try:
        with connection.begin(), _alembic_errors():
            command.downgrade(alembic_config(connection), revision)
    finally:
        run_pragma(connection, "PRAGMA foreign_keys=ON")


def check_foreign_keys(connection: Connection) -> None:
    """Refuse a migration that left rows whose foreign keys point nowhere."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()  # in the transaction
    if broken:
        raise SchemaError(f"migration left {len(broken)} rows with broken foreign keys")


@contextmanager
def _connect(database: str) -> Iterator[tuple[str, Connection]]:
    """A connection to ``database`` (path or URL), checked first: a new file is created
    readable only by its owner, a file that cannot be ours raises ``DatabaseError``."""
    target = resolve_database(database)
    with guarded_open(ready_file(target), target.describe()):
        pass  # a damaged file is refused, as a handler refuses it, and left as it was
    engine = create_sync_engine(target)
    try:
        with engine.connect() as connection:
            yield target.describe(), connection
    finally:
        engine.dispose()


def _revision_now(connection: Connection) -> str | None:
    connection.info["begin"] = "BEGIN"  # a read: no write lock
    return current_revision(connection)


#: A step relative to a revision, as Alembic takes it: ``+1``, ``-2``, ``head-1``, ``0003+1``.
_RELATIVE = re.compile(r"(?:heads?|base|\d{4})?[+-]\d+")


def _check_target(revision: object, end: str) -> None:
    """Refuse a target revision this code does not know (or the wrong end of the history
    for the change) before any file is opened or made. ``end`` is ``"head"`` for an
    upgrade, ``"base"`` for a downgrade."""
    ends = ("head", "heads") if end == "head" else ("base",)
    if revision in ends or revision in KNOWN_REVISIONS:
        return
    if isinstance(revision, str) and _RELATIVE.fullmatch(revision):
        return  # (Alembic says if the step goes past either end: see _alembic_errors)
    change = "upgrade" if end == "head" else "downgrade"
    if revision in ("head", "heads", "base"):
        raise InvalidValueError(f"cannot {change} to {revision!r}")
    raise InvalidValueError(
        f"unknown revision {revision!r} to {change} to: use {end!r}, one of "
        f"{', '.join(KNOWN_REVISIONS)}, or a relative step such as -1"
    )


@contextmanager
def _alembic_errors() -> Iterator[None]:
    """Alembic's refusal of a target (a relative step past the end) as our error."""
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        raise InvalidValueError(f"cannot migrate: {exc}") from exc


def upgrade(database: str, revision: str = "head") -> str | None:
    """Upgrade the database at ``database`` (path or URL); return the new revision.

    A new file is created readable only by its owner; a file that cannot hold our
    database is refused with :class:`~orbiter.errors.DatabaseError` before anything is
    written.
    """
    _check_target(revision, "head")
    with _connect(database) as (where, connection):
        upgrade_connection(connection, where, revision)
        enable_wal(connection)
        return _revision_now(connection)


def downgrade(database: str, revision: str) -> str | None:
    """Downgrade the database at ``database`` to ``revision``; return the new revision."""
    _check_target(revision, "base")
    with _connect(database) as (_, connection):
        downgrade_connection(connection, revision)
        return _revision_now(connection)
