"""Every state the database file can be in gets a clear error, and is left unchanged."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from orbiter import migrate
from orbiter._internal.background import BackgroundTaskHandler
from orbiter.errors import DatabaseError, DatabaseLockedError, SchemaError
from orbiter.store.schema import KNOWN_REVISIONS


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "tasks.db"
    with pytest.raises(DatabaseError, match=r"directory .*nope does not exist"):
        BackgroundTaskHandler(database=target)
    assert not target.parent.exists()


def test_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="is a directory"):
        BackgroundTaskHandler(database=tmp_path)


_OPEN_FIFO = """
import sys
from orbiter._internal.background import BackgroundTaskHandler
try:
    BackgroundTaskHandler(database=sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    # Reading a FIFO's first bytes would block until a writer came: in a child process,
    # so that the old behaviour fails the test by its timeout instead of hanging it.
    fifo = tmp_path / "tasks.db"
    os.mkfifo(fifo)
    handler = subprocess.run(
        [sys.executable, "-c", _OPEN_FIFO, fifo],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert handler.stdout.startswith("DatabaseError") and "not a regular file" in handler.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "orbiter.cli", "stats", "--db", fifo],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 1 and "not a regular file" in cli.stderr


def test_not_a_sqlite_file(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("hello, this is not a database\n" * 100)
    before = digest(target)
    with pytest.raises(DatabaseError, match="not a SQLite database"):
        BackgroundTaskHandler(database=target)
    assert digest(target) == before


def test_foreign_sqlite_database(tmp_path: Path) -> None:
    target = tmp_path / "app.db"
    with sqlite3.connect(target) as connection:
        connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    before = digest(target)
    with pytest.raises(SchemaError, match="not an orbiter-background one"):
        BackgroundTaskHandler(database=target)
    assert digest(target) == before


def test_corrupt_file(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    data = bytearray(db_path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # keep the header, wreck the schema page
    db_path.write_bytes(bytes(data))
    before = digest(db_path)
    with pytest.raises(DatabaseError, match=r"corrupt|malformed|not a database"):
        BackgroundTaskHandler(database=db_path)
    assert digest(db_path) == before


@pytest.mark.parametrize("where", [0.5, 0.9])
def test_a_file_damaged_beyond_its_schema_page_is_refused_at_open(
    db_path: Path, where: float
) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        for index in range(300):
            handler.submit(f"t{index}", "run", payload={"n": index, "text": "x" * 100})
    data = bytearray(db_path.read_bytes())
    at = int(len(data) * where) // 4096 * 4096
    data[at : at + 8192] = b"\xff" * 8192  # two pages of a task table or index: garbage
    db_path.write_bytes(bytes(data))
    before = digest(db_path)
    with pytest.raises(DatabaseError, match=r"corrupt|malformed"):
        BackgroundTaskHandler(database=db_path)
    assert digest(db_path) == before  # refused before anything was written


def test_read_only_file(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    db_path.chmod(0o400)
    before = digest(db_path)
    try:
        with pytest.raises(DatabaseError, match="read-only"):
            BackgroundTaskHandler(database=db_path)
    finally:
        db_path.chmod(0o600)
    assert digest(db_path) == before


def test_read_only_directory(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(DatabaseError, match="read-only"):
            BackgroundTaskHandler(database=folder / "tasks.db")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_newer_schema_is_refused(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    with sqlite3.connect(db_path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    before = digest(db_path)
    for auto_migrate in (True, False):
        with pytest.raises(SchemaError, match=r"'9999'.*newer"):
            BackgroundTaskHandler(database=db_path, auto_migrate=auto_migrate)
    assert digest(db_path) == before


def _older_schema(path: Path) -> None:
    BackgroundTaskHandler(database=path).close()
    migrate.downgrade(str(path), KNOWN_REVISIONS[-2])


def _newer_schema(path: Path) -> None:
    BackgroundTaskHandler(database=path).close()
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")


def _foreign_wal_database(path: Path) -> None:
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")


@pytest.mark.parametrize(
    "make", [_older_schema, _newer_schema, _foreign_wal_database], ids=lambda f: f.__name__[1:]
)
def test_a_refused_open_leaves_nothing_beside_the_file(db_path: Path, make: Any) -> None:
    """Opening a WAL file makes its -wal and -shm; a refused open must not leave them."""
    make(db_path)
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]
    before = digest(db_path)
    with pytest.raises(SchemaError):
        BackgroundTaskHandler(database=db_path, auto_migrate=False)
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]
    assert digest(db_path) == before


def test_a_refused_open_leaves_a_live_connections_log_alone(db_path: Path) -> None:
    _newer_schema(db_path)
    with sqlite3.connect(db_path) as reader:  # another program has the file open
        reader.execute("SELECT count(*) FROM background_tasks").fetchall()
        with pytest.raises(SchemaError):
            BackgroundTaskHandler(database=db_path)
        # Its log and index stay, and it goes on reading.
        assert db_path.with_name(db_path.name + "-shm").exists()
        assert reader.execute("SELECT version_num FROM alembic_version").fetchall() == [("9999",)]
    reader.close()


def _crash_after_writes(db_path: Path, script: str) -> None:
    """Run ``script`` with ``handler`` open on ``db_path`` in a child that then dies
    without closing, leaving its -wal beside the file (as SIGKILL would)."""
    code = (
        "import os\n"
        "from orbiter._internal.background import BackgroundTaskHandler\n"
        f"handler = BackgroundTaskHandler(database={str(db_path)!r})\n"
        f"{script}\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert db_path.with_name(db_path.name + "-wal").stat().st_size > 0


@pytest.mark.parametrize("damage", ["pages", "newer schema"])
def test_a_refused_file_with_a_crashed_writers_log_is_left_as_it_was(
    db_path: Path, damage: str
) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        for index in range(300):
            handler.submit(f"t{index}", "run", payload={"text": "x" * 100})
    _crash_after_writes(db_path, "handler.submit('late', 'run')")
    if damage == "pages":
        data = bytearray(db_path.read_bytes())
        middle = len(data) // 2 // 4096 * 4096
        data[middle : middle + 8192] = b"\xff" * 8192
        db_path.write_bytes(bytes(data))
    else:
        _crash_after_writes(
            db_path,
            "handler._store._worker.call(lambda db: db.raw.execute("
            "\"UPDATE alembic_version SET version_num = '9999'\"))",
        )
    wal = db_path.with_name(db_path.name + "-wal")
    before = (digest(db_path), digest(wal))
    with pytest.raises(DatabaseError, match=r"corrupt|malformed|newer"):
        BackgroundTaskHandler(database=db_path)
    # Refusing it did not fold the log into the file (what a last connection does).
    assert (digest(db_path), digest(wal)) == before


def test_empty_file_gets_the_schema(db_path: Path) -> None:
    db_path.touch()
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run")
    with BackgroundTaskHandler(database=db_path) as handler:
        assert handler.get_task("a") is not None


def test_opening_a_new_file_waits_for_another_connections_lock(db_path: Path) -> None:
    # Switching a new file to WAL needs it to itself for a moment; SQLite reports another
    # connection's lock at once there, so the handler waits for it (up to busy_timeout),
    # as several processes opening one new file together need.
    db_path.touch()
    writer = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # holds the write lock, as a process creating it does
    release = threading.Timer(0.3, writer.rollback)
    release.start()
    try:
        started = time.monotonic()
        with BackgroundTaskHandler(database=db_path) as handler:
            handler.submit("a", "run")
        assert time.monotonic() - started >= 0.25  # it waited for the lock
    finally:
        release.join()
        writer.close()
    with BackgroundTaskHandler(database=db_path) as handler:
        assert handler.get_task("a") is not None


def test_locked_database_gives_a_clear_error(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(db_path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        with (
            pytest.raises(DatabaseLockedError, match="locked"),
            BackgroundTaskHandler(database=db_path, busy_timeout=0.2) as handler,
        ):
            handler.submit("a", "run")
    finally:
        locker.kill()
        locker.communicate()
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run")
        assert handler.get_task("a") is not None


@pytest.mark.skipif(os.geteuid() != 0 and sys.platform != "linux", reason="linux only")
def test_database_size_limit_error_and_recovery(db_path: Path) -> None:
    """A full database fails the call clearly; earlier data stays; it works once space is back."""
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("before", "run", payload="x")
    with sqlite3.connect(db_path) as connection:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
    # max_page_count is per connection: set it through the handler's own connections.
    from sqlalchemy import event

    from orbiter.store import engine as engine_module

    original = engine_module.create_sync_engine

    def limited(*args: object, **kwargs: object) -> object:
        engine = original(*args, **kwargs)  # type: ignore[arg-type]

        @event.listens_for(engine, "connect")
        def _limit(dbapi_connection: object, _record: object) -> None:
            dbapi_connection.execute(f"PRAGMA max_page_count={pages + 2}")  # type: ignore[attr-defined]

        return engine

    from orbiter.store import sql_store

    sql_store.create_sync_engine = limited  # type: ignore[attr-defined,assignment]
    try:
        with BackgroundTaskHandler(database=db_path) as handler:
            with pytest.raises(DatabaseError, match="full"):
                for index in range(200):
                    handler.submit(f"t{index}", "run", payload="y" * 2_000)
            assert handler.get_task("before") is not None
    finally:
        sql_store.create_sync_engine = original  # type: ignore[attr-defined]
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("after", "run", payload="z" * 10_000)
        assert handler.get_task("before").payload == "x"  # type: ignore[union-attr]
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
