"""The SQLite limit: plain stdlib ``sqlite3`` running the handler's SQL on its schema.

Same statements, same parameters (JSON text, UTC timestamps), same pragmas as the
handler's connection; only the Python around them is gone. ``ops_per_commit=1`` is the
per-call limit (every call durable on return), ``1000`` the batch limit.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from common import utc_now_text

INSERT_TASK = (
    "INSERT INTO background_tasks (task_id, parent_task_id, status, payload, created_at, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) DO NOTHING"
)
COMPLETE_TASK = (
    "UPDATE background_tasks SET status=?, merge_mode=?, result=?, updated_at=? "
    "WHERE background_tasks.task_id = ? AND background_tasks.status IN (?, ?)"
)
ENQUEUE = (
    "INSERT INTO pending_queue (task_id, enqueued_at) VALUES (?, ?) "
    "ON CONFLICT (task_id) DO NOTHING"
)
MAX_SEQ = "SELECT max(pending_queue.seq) FROM pending_queue"
PENDING_ALL = (
    "SELECT pending_queue.seq, background_tasks.task_id, background_tasks.parent_task_id, "
    "background_tasks.status, background_tasks.merge_mode, background_tasks.payload, "
    "background_tasks.result, background_tasks.error FROM pending_queue "
    "JOIN background_tasks ON pending_queue.task_id = background_tasks.task_id "
    "WHERE pending_queue.seq <= ? ORDER BY pending_queue.seq"
)
PENDING_BATCH = (
    "SELECT pending_queue.seq, background_tasks.payload, background_tasks.result "
    "FROM pending_queue JOIN background_tasks ON pending_queue.task_id = background_tasks.task_id "
    "WHERE pending_queue.seq > ? ORDER BY pending_queue.seq LIMIT 500"
)
DELETE_THROUGH = "DELETE FROM pending_queue WHERE pending_queue.seq <= ?"
DELETE_ONE = "DELETE FROM pending_queue WHERE pending_queue.seq = ?"


def dumps(value: Any) -> str:
    """Compact JSON, as the handler's codec writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """A connection configured like the handler's (WAL, ``synchronous``, FKs, autocommit)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in (
        "PRAGMA busy_timeout=30000",
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
    ):
        connection.execute(pragma)
    return connection


class StdlibStore:
    """The handler's writes as bare SQL, committing every ``ops_per_commit`` calls."""

    def __init__(self, path: Path, synchronous: str, ops_per_commit: int) -> None:
        self._db = connect(path, synchronous)
        self._ops_per_commit = ops_per_commit
        self._uncommitted = 0

    def _begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")

    def _done(self) -> None:
        self._uncommitted += 1
        if self._uncommitted >= self._ops_per_commit:
            self.flush()

    def flush(self) -> None:
        """Commit whatever is open."""
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        self._uncommitted = 0

    def submit(self, task_id: str, parent_task_id: str, payload: Any) -> None:
        """Insert a RUNNING task (the handler's ``submit``)."""
        now = utc_now_text()
        self._begin()
        params = (task_id, parent_task_id, "running", dumps(payload), now, now)
        if self._db.execute(INSERT_TASK, params).rowcount == 0:
            raise KeyError(f"duplicate task {task_id!r}")
        self._done()

    def complete(self, task_id: str, result: Any) -> None:
        """Finish a task and queue it (the handler's wake-up ``handle_result``)."""
        now = utc_now_text()
        self._begin()
        params = ("success", "wakeup", dumps(result), now, task_id, "init", "running")
        if self._db.execute(COMPLETE_TASK, params).rowcount == 0:
            raise KeyError(f"task {task_id!r} is not running")
        self._db.execute(ENQUEUE, (task_id, now))
        self._done()

    def drain_all(self) -> int:
        """Read, decode and delete every queued result in one transaction."""
        count = 0
        self._db.execute("BEGIN IMMEDIATE")
        upto = self._db.execute(MAX_SEQ).fetchone()[0]
        if upto is not None:
            for row in self._db.execute(PENDING_ALL, (upto,)):
                json.loads(row[5])
                json.loads(row[6])
                count += 1
            self._db.execute(DELETE_THROUGH, (upto,))
        self._db.execute("COMMIT")
        return count

    def drain_acking_each(self) -> int:
        """Read in batches of 500; delete each item in its own commit before the next one
        (the handler's per-item contract; acks at synchronous=NORMAL, as the handler's)."""
        self.flush()
        self._db.execute("PRAGMA synchronous=NORMAL")
        count, after = 0, 0
        while batch := self._db.execute(PENDING_BATCH, (after,)).fetchall():
            for seq, payload, result in batch:
                json.loads(payload)
                json.loads(result)
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(DELETE_ONE, (seq,))
                self._db.execute("COMMIT")
                after = seq
                count += 1
        return count

    def close(self) -> None:
        """Commit and close."""
        self.flush()
        self._db.close()
