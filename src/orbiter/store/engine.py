"""Engine setup in one place: from a path or URL to a configured SQLAlchemy engine.

SQLite connections get WAL journaling, the chosen ``synchronous`` level, a busy timeout
and foreign keys; transactions are begun explicitly by the store (``BEGIN IMMEDIATE`` for
writes), so the driver's own implicit transactions are switched off.
"""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from orbiter.errors import DatabaseError, InvalidValueError

__all__ = [
    "ENV_VAR",
    "FULL_CHECK_MAX_BYTES",
    "MAX_BUSY_TIMEOUT",
    "DatabaseTarget",
    "Synchronous",
    "check_busy_timeout",
    "configure_sqlite_engine",
    "create_sync_engine",
    "enable_wal",
    "guarded_open",
    "has_log_files",
    "is_writable",
    "ready_file",
    "refuse_damaged_pages",
    "remove_empty_log",
    "resolve_database",
    "run_pragma",
]

#: Environment variable naming the database for the CLI and for ``alembic``.
ENV_VAR = "ORBITER_BG_DATABASE"

Synchronous = Literal["FULL", "NORMAL"]

#: Oldest SQLite with everything the store uses (``RETURNING`` arrived in 3.35).
MIN_SQLITE_VERSION = (3, 35, 0)

_SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class DatabaseTarget:
    """A resolved database: the synchronous SQLAlchemy URL, and the file for SQLite."""

    url: URL
    path: Path | None  # the SQLite file; None for other dialects

    @property
    def async_url(self) -> URL:
        """The same database through the async driver (aiosqlite for SQLite)."""
        if self.url.get_backend_name() == "sqlite":
            return self.url.set(drivername="sqlite+aiosqlite")
        return self.url

    def describe(self) -> str:
        """A short, password-free name for messages."""
        if self.path is not None:
            return str(self.path)
        return self.url.render_as_string(hide_password=True)


_NOT_DURABLE = (
    "an in-memory SQLite database is not durable; pass database=None for the in-memory "
    "handler, or a file path"
)


def _is_seconds(text: str) -> bool:
    try:
        return 0 <= float(text) < math.inf
    except ValueError:
        return False


def _is_count(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _is_bool(text: str) -> bool:
    return text.lower() in ("true", "false", "yes", "no", "on", "off", "t", "f", "y", "n", "1", "0")


#: The query parameters a SQLite URL may carry (pysqlite's, with the values it accepts).
#: ``timeout`` and ``check_same_thread`` are accepted for URLs written for SQLAlchemy, but
#: the handler's own ``busy_timeout`` and threading decide them.
_URL_PARAMETERS: dict[str, Callable[[str], bool]] = {
    "timeout": _is_seconds,
    "check_same_thread": _is_bool,
    "cached_statements": _is_count,
}


def _check_url_query(url: URL) -> None:
    """Refuse a query parameter the driver would reject only as it connects (after the
    file was made), or one that changes what the file is (``mode=ro``, ``immutable``...)."""
    shown = url.render_as_string(hide_password=True)
    for key, values in url.query.items():
        check = _URL_PARAMETERS.get(key)
        if check is None:
            raise InvalidValueError(
                f"database URL {shown!r}: query parameter {key!r} is not supported (only "
                f"{', '.join(_URL_PARAMETERS)}); the handler sets up its connections itself"
            )
        for value in (values,) if isinstance(values, str) else values:
            if not check(value):
                raise InvalidValueError(f"database URL {shown!r}: bad value {key}={value!r}")


def resolve_database(database: str | os.PathLike[str]) -> DatabaseTarget:
    """Turn a filesystem path or SQLAlchemy URL into a :class:`DatabaseTarget`.

    Raises:
        InvalidValueError: if ``database`` is neither a path nor a URL we support.
    """
    if isinstance(database, os.PathLike):
        database = os.fspath(database)
    if not isinstance(database, str):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise InvalidValueError(
            f"database must be a path or a SQLAlchemy URL string, not {type(database).__name__}"
        )
    if not database.strip():
        raise InvalidValueError("database must not be empty")
    if database == ":memory:":  # SQLite's name for a private in-memory database
        raise InvalidValueError(_NOT_DURABLE)
    if "\0" in database:
        raise InvalidValueError(f"database {database!r} holds a NUL character")
    if "://" not in database:
        path = Path(database).expanduser().resolve()
        return DatabaseTarget(URL.create("sqlite+pysqlite", database=str(path)), path)
    try:
        url = make_url(database)
    except ArgumentError as exc:
        raise InvalidValueError(f"database {database!r} is not a valid URL: {exc}") from exc
    if url.get_backend_name() != "sqlite":
        raise InvalidValueError(
            f"database URL {url.render_as_string(hide_password=True)!r}: only SQLite "
            "(sqlite:/// or sqlite+aiosqlite:///) is supported by this version"
        )
    name = url.database or ""
    if name in ("", ":memory:") or name.startswith("file:") or url.query.get("mode") == "memory":
        raise InvalidValueError(_NOT_DURABLE)
    _check_url_query(url)
    path = Path(name).expanduser().resolve()
    return DatabaseTarget(url.set(drivername="sqlite+pysqlite", database=str(path)), path)


def check_sqlite_file(path: Path) -> bool:
    """Check that ``path`` can hold our database, without changing anything.

    Returns:
        True if the file exists and has content, False if it is new (or empty).

    Raises:
        DatabaseError: naming the problem (missing directory, a directory, read-only,
        not a SQLite file).
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise DatabaseError(
            f"SQLite {sqlite3.sqlite_version} is too old; orbiter-background needs "
            f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or newer (for RETURNING)"
        )
    directory = path.parent
    if not directory.is_dir():
        raise DatabaseError(f"cannot open database {path}: directory {directory} does not exist")
    if path.is_dir():
        raise DatabaseError(f"cannot open database {path}: it is a directory")
    if not is_writable(directory):
        raise DatabaseError(
            f"cannot open database {path}: directory {directory} is read-only "
            "(SQLite needs to create its -wal and -shm files beside the database)"
        )
    if not path.exists():
        return False
    if not path.is_file():  # a FIFO would block the read below; a device is no database
        raise DatabaseError(f"cannot open database {path}: it is not a regular file")
    if not os.access(path, os.R_OK):
        raise DatabaseError(f"cannot open database {path}: no permission to read the file")
    if not is_writable(path):
        raise DatabaseError(f"cannot open database {path}: the file is read-only")
    with path.open("rb") as file:
        header = file.read(len(_SQLITE_HEADER))
    if not header:
        return False
    if header != _SQLITE_HEADER:
        raise DatabaseError(f"cannot open database {path}: the file is not a SQLite database")
    return True


def create_private_file(path: Path) -> None:
    """Create an empty database file readable only by its owner (results may hold secrets),
    unless it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process created it just now
    os.close(fd)


def ready_file(target: DatabaseTarget) -> Path | None:
    """Check that ``target``'s file can hold our database (see :func:`check_sqlite_file`)
    and create it, readable only by its owner, if it is new; return its path if it
    already had content (to open under :func:`guarded_open`), else None."""
    if target.path is None:
        return None
    if check_sqlite_file(target.path):
        return target.path
    create_private_file(target.path)
    return None


def is_writable(path: Path) -> bool:
    """Writable for us; a file or directory with no write bit at all counts as read-only
    even for root, who would otherwise ignore the mode."""
    mode = path.stat().st_mode
    return os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


#: SQLite keeps its busy timeout in milliseconds in a 32-bit int; beyond it, no wait at all.
MAX_BUSY_TIMEOUT = (2**31 - 1) / 1000


def check_busy_timeout(seconds: object) -> None:
    """Refuse a ``busy_timeout`` SQLite cannot hold: not a number, negative, or over
    :data:`MAX_BUSY_TIMEOUT` (about 24.8 days)."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 <= seconds <= MAX_BUSY_TIMEOUT
    ):
        raise InvalidValueError(
            f"busy_timeout must be from 0 to {MAX_BUSY_TIMEOUT:.0f} seconds, not {seconds!r}"
        )


def configure_sqlite_engine(
    engine: Engine, *, synchronous: Synchronous = "FULL", busy_timeout: float = 30.0
) -> None:
    """Install the connection setup on ``engine`` (sync, or an async engine's ``sync_engine``).

    Each new connection gets ``synchronous``, ``busy_timeout`` and foreign keys (none of
    which changes the file; WAL is switched on by :func:`enable_wal` once the file is
    known to be ours), and
    runs in the driver's autocommit mode; SQLAlchemy's ``begin()`` then emits the real
    ``BEGIN`` (``BEGIN IMMEDIATE`` unless ``connection.info["begin"]`` says otherwise),
    so DDL is transactional and writers queue on SQLite's lock (waiting up to
    ``busy_timeout``) instead of failing with "database is locked" on a lock upgrade.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise InvalidValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
    pragmas = (
        f"PRAGMA busy_timeout={int(busy_timeout * 1000)}",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:  # pyright: ignore[reportUnusedFunction]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:  # pyright: ignore[reportUnusedFunction]
        connection.exec_driver_sql(connection.info.get("begin", "BEGIN IMMEDIATE"))


def create_sync_engine(
    target: DatabaseTarget, *, synchronous: Synchronous = "FULL", busy_timeout: float = 30.0
) -> Engine:
    """A synchronous engine for ``target``, configured by :func:`configure_sqlite_engine`."""
    check_busy_timeout(busy_timeout)
    engine = create_engine(
        target.url,
        poolclass=NullPool,
        connect_args={"timeout": busy_timeout, "check_same_thread": False},
    )
    configure_sqlite_engine(engine, synchronous=synchronous, busy_timeout=busy_timeout)
    return engine


def run_pragma(connection: Connection, pragma: str) -> list[Any]:
    """Run a PRAGMA on the driver connection, outside any transaction.

    (``Connection.exec_driver_sql`` would auto-begin a transaction first, and pragmas such
    as ``foreign_keys`` and ``synchronous`` are no-ops or errors inside one.)
    """
    dbapi_connection: Any = connection.connection.dbapi_connection
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(pragma)
        return list(cursor.fetchall())
    finally:
        cursor.close()


#: Files up to this size get a full structural check when a handler opens them (a few
#: milliseconds); larger ones are not read page by page at open, so a file with a
#: million tasks still opens in milliseconds, and damage in them is reported by the
#: call that reads the damaged page.
FULL_CHECK_MAX_BYTES = 1 << 20


def read_only_uri(path: Path, *, immutable: bool = False) -> str:
    """A SQLite URI that opens ``path`` read-only (any file name: its bytes are quoted)."""
    return f"file:{quote(os.fsencode(path))}?{'immutable=1' if immutable else 'mode=ro'}"


@contextmanager
def guarded_open(path: Path | None, where: str) -> Iterator[None]:
    """Hold a read-only connection to the existing file ``path`` while a handler opens it.

    It first refuses a small file whose pages are damaged (``PRAGMA quick_check``). And
    while it is open, a refused open cannot write the file: SQLite's last connection to
    close folds the log (``-wal``) into the file, and this one, closing last, cannot.

    Raises:
        DatabaseError: naming the first problem the check found.
    """
    if path is None:
        yield
        return
    had_log = has_log_files(path)
    guard = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
    opened = False
    try:
        refuse_damaged_pages(guard, path, where)
        guard.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()  # take its lock
        yield
        opened = True
    finally:
        guard.close()
        if not opened and not had_log:  # refused: leave nothing beside the file
            remove_empty_log(path)


def refuse_damaged_pages(connection: sqlite3.Connection, path: Path, where: str) -> None:
    """Refuse ``path`` if it is small enough to check page by page (see
    :data:`FULL_CHECK_MAX_BYTES`) and ``PRAGMA quick_check`` finds damage.

    Raises:
        DatabaseError: naming the first problems the check found.
    """
    if path.stat().st_size > FULL_CHECK_MAX_BYTES:
        return
    problems = [row[0] for row in connection.execute("PRAGMA quick_check(3)").fetchall()]
    if problems != ["ok"]:
        raise DatabaseError(
            f"{where}: the file is corrupt ({'; '.join(problems)}); nothing was written to it"
        )


def has_log_files(path: Path) -> bool:
    """Whether a ``-wal`` or ``-shm`` file lies beside ``path``."""
    return any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-shm"))


def remove_empty_log(path: Path) -> None:
    """Have SQLite remove the ``-wal`` and ``-shm`` that reading ``path`` made beside it.

    Reading a WAL file creates both, and a read-only connection may not remove them when
    it closes last. A connection that may write does, if it is the last one open
    (otherwise another program is using them, and they stay). Only an empty log is
    handled: folding it into the file on that close changes nothing.
    """
    try:
        if path.with_name(path.name + "-wal").stat().st_size != 0:
            return  # someone wrote to it since: not ours to fold
        connection = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            connection.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()
        finally:
            connection.close()
    except (OSError, sqlite3.Error):  # best effort: two empty files beside it are harmless
        pass


def enable_wal(connection: Connection) -> None:
    """Put the database in WAL mode (a lasting property of the file), if it is not yet.

    Called only once the file is known to be ours or new: the switch rewrites the header.
    The switch needs the file to itself for a moment, and SQLite reports another
    connection's lock at once here instead of waiting ``busy_timeout`` (several processes
    opening a new file together meet this), so this waits for it, up to that timeout.
    """
    if run_pragma(connection, "PRAGMA journal_mode")[0][0] == "wal":
        return
    deadline = time.monotonic() + run_pragma(connection, "PRAGMA busy_timeout")[0][0] / 1000
    pause = 0.001
    while True:
        try:
            mode = run_pragma(connection, "PRAGMA journal_mode=WAL")[0][0]
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    if mode != "wal":
        raise DatabaseError(f"could not switch the database to WAL mode (it stays {mode!r})")
