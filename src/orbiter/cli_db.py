"""Database access for ``orbiter-bg``: resolve ``--db``, check the file, open it.

Read commands open the file read-only (SQLite URI ``mode=ro`` and ``query_only``), so
they never create, migrate or change it. Write commands check the same things first and
then work in one ``BEGIN IMMEDIATE`` transaction. Every problem a user can cause becomes
a :class:`CliError` with a one-line message.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool

from orbiter.errors import InvalidValueError
from orbiter.migrate import current_revision, schema_problem
from orbiter.store.codec import TIMESTAMP_FORMAT
from orbiter.store.engine import (
    ENV_VAR,
    DatabaseTarget,
    create_sync_engine,
    guarded_open,
    has_log_files,
    is_writable,
    read_only_uri,
    ready_file,
    refuse_damaged_pages,
    remove_empty_log,
    resolve_database,
)
from orbiter.store.schema import HEAD_REVISION, KNOWN_REVISIONS

__all__ = [
    "CliError",
    "age_cutoff",
    "migrate_hint",
    "open_for_reading",
    "open_for_writing",
    "parse_age",
    "read_revision",
    "resolve_target",
]

#: Seconds a CLI connection waits for another process's lock.
BUSY_TIMEOUT = 10.0

_SQLITE_HEADER = b"SQLite format 3\x00"

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGE_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class CliError(Exception):
    """A user-facing failure: printed as one line on stderr, exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- arguments -------------------------------------------------------------------------


_MAX_AGE_SECONDS = 1000 * 365.25 * 86400


def parse_age(text: str) -> timedelta:
    """Parse an age such as ``90s``, ``10m``, ``2h``, ``3d``, ``1w`` or ``1h30m``.

    Raises:
        ValueError: if ``text`` is not an age.
    """
    compact = text.strip().lower()
    parts = list(_AGE_PART.finditer(compact))
    if not parts or "".join(part.group(0) for part in parts) != compact:
        raise ValueError(
            f"invalid age {text!r}: use a number and a unit s, m, h, d or w, e.g. 10m, 2h, 3d"
        )
    seconds = sum(float(part.group(1)) * _AGE_UNITS[part.group(2)] for part in parts)
    if seconds > _MAX_AGE_SECONDS:  # its cutoff would fall before the year 1
        raise ValueError(f"age {text!r} is too large: at most 1000 years (52178w)")
    return timedelta(seconds=seconds)


def age_cutoff(age: timedelta, now: datetime | None = None) -> str:
    """The stored-form timestamp ``age`` before ``now`` (UTC)."""
    moment = (now or datetime.now(UTC)) - age
    return moment.strftime(TIMESTAMP_FORMAT)


def resolve_target(database: str | None) -> DatabaseTarget:
    """``--db`` or ``$ORBITER_BG_DATABASE`` as a SQLite file target."""
    chosen = database if database is not None else os.environ.get(ENV_VAR, "")
    if not chosen.strip():
        raise CliError(f"no database given: pass --db PATH or set {ENV_VAR}", exit_code=2)
    try:
        target = resolve_database(chosen)
    except InvalidValueError as exc:
        raise CliError(str(exc), exit_code=2) from exc
    if target.path is None:  # pragma: no cover - resolve_database only returns SQLite files
        raise CliError(f"{target.describe()}: only SQLite files are supported", exit_code=2)
    return target


def migrate_hint(target: DatabaseTarget) -> str:
    """The command that brings ``target`` to the current schema."""
    return f"orbiter-bg migrate --db {shlex.quote(target.describe())}"


# -- checks ----------------------------------------------------------------------------


def _file_of(target: DatabaseTarget) -> Path:
    assert target.path is not None  # resolve_target guarantees a file
    return target.path


def check_existing_file(target: DatabaseTarget) -> Path:
    """The target's file, if it exists and starts like a SQLite database."""
    path = _file_of(target)
    if not path.exists():
        raise CliError(f"no database at {path} (pass --db PATH or set {ENV_VAR})")
    if path.is_dir():
        raise CliError(f"{path} is a directory, not a database file")
    if not path.is_file():  # a FIFO would block the read below
        raise CliError(f"{path} is not a regular file, not a database file")
    with path.open("rb") as file:
        header = file.read(len(_SQLITE_HEADER))
    if not header:
        raise CliError(
            f"{path} is an empty file, not an orbiter-background database yet; "
            f"run `{migrate_hint(target)}` to initialise it"
        )
    if header != _SQLITE_HEADER:
        raise CliError(f"{path} is not a SQLite database")
    return path


def check_schema(connection: Connection, target: DatabaseTarget) -> None:
    """Raise :class:`CliError` unless the database is ours and at the head revision.

    Raises:
        SchemaError: (from the library) for a foreign or newer schema.
    """
    revision = current_revision(connection)
    if revision == HEAD_REVISION:
        return
    if revision in KNOWN_REVISIONS:
        raise CliError(
            f"{target.describe()} has schema revision {revision} but this version needs "
            f"{HEAD_REVISION}; run `{migrate_hint(target)}` first"
        )
    # Foreign or newer: the library's SchemaError says which. No revision and no tables:
    schema_problem(connection, target.describe(), auto_migrate=False)
    raise CliError(
        f"{target.describe()} is an empty SQLite database, not an orbiter-background one yet; "
        f"run `{migrate_hint(target)}` to initialise it"
    )


# -- connections -----------------------------------------------------------------------


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that takes SQLite's locks (a consistent snapshot).

    A WAL reader needs the ``-shm`` file beside the database. When there is none (no
    handler has the file open), SQLite creates it and an empty ``-wal``, and only a
    connection that may write the file removes them again. So a user who may not write
    the file or its directory reads it as immutable (without locks) instead: files of
    theirs left beside it would stop the file's owner from writing it. A handler that
    starts writing during such a read could make it inconsistent.
    """
    if not has_log_files(path) and not (is_writable(path) and is_writable(path.parent)):
        return sqlite3.connect(
            read_only_uri(path, immutable=True), uri=True, check_same_thread=False
        )
    connection = sqlite3.connect(
        read_only_uri(path), uri=True, timeout=BUSY_TIMEOUT, check_same_thread=False
    )
    try:
        connection.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()
    except sqlite3.OperationalError as exc:
        connection.close()
        no_shm = "readonly" in str(exc) or "unable to open" in str(exc)
        if not no_shm or path.with_name(path.name + "-wal").exists():
            raise
        immutable = read_only_uri(path, immutable=True)
        return sqlite3.connect(immutable, uri=True, check_same_thread=False)
    return connection


def _readonly_engine(path: Path, where: str) -> Engine:
    def connect() -> sqlite3.Connection:
        connection = _connect_read_only(path)
        try:
            refuse_damaged_pages(connection, path, where)  # as a handler's open would
        except BaseException:
            connection.close()
            raise
        return connection

    engine = create_engine("sqlite+pysqlite://", creator=connect, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:  # pyright: ignore[reportUnusedFunction]
        dbapi_connection.isolation_level = None
        dbapi_connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        dbapi_connection.execute("PRAGMA query_only=ON")

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:  # pyright: ignore[reportUnusedFunction]
        connection.exec_driver_sql("BEGIN")

    return engine


@contextmanager
def open_for_reading(target: DatabaseTarget, *, check: bool = True) -> Iterator[Connection]:
    """A read-only connection in one read transaction (a consistent snapshot).

    Args:
        target: The database; it must exist.
        check: Require our schema at the head revision (False: only a SQLite file).
    """
    path = check_existing_file(target)
    had_log = has_log_files(path)
    engine = _readonly_engine(path, target.describe())
    try:
        with engine.connect() as connection, connection.begin():
            if check:
                check_schema(connection, target)
            yield connection
    finally:
        engine.dispose()
        if not had_log:  # no handler had the file open: leave nothing beside it
            remove_empty_log(path)


def read_revision(target: DatabaseTarget) -> str | None:
    """The stored schema revision, read-only; None for an empty SQLite database.

    Raises:
        SchemaError: (from the library) for a SQLite database that is not ours.
    """
    with open_for_reading(target, check=False) as connection:
        revision = current_revision(connection)
        if revision is None:
            schema_problem(connection, target.describe(), auto_migrate=True)
        return revision


@contextmanager
def open_for_writing(target: DatabaseTarget) -> Iterator[Connection]:
    """A read-write connection to our database at the head revision, no transaction open.

    Callers wrap their work in ``with connection.begin():`` (``BEGIN IMMEDIATE``).
    """
    check_existing_file(target)
    # Read-only, not SQLite or damaged: refused as a handler refuses it, left as it was.
    with guarded_open(ready_file(target), target.describe()):
        pass
    engine = create_sync_engine(target, busy_timeout=BUSY_TIMEOUT)
    try:
        with engine.connect() as connection:
            connection.info["begin"] = "BEGIN"
            with connection.begin():
                check_schema(connection, target)
            connection.info.pop("begin")
            yield connection
    finally:
        engine.dispose()
