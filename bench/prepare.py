"""Build the files workloads start from, fast and outside any measurement.

Handler-schema files get their schema from the handler itself (open once, close), then
rows in bulk with stdlib ``sqlite3`` (``executemany`` in one transaction, synchronous
OFF). Peers' files are filled through their own API with synchronous OFF, which only
speeds up preparation: the measuring process reopens them at the run's level.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from common import PARENT, PAYLOAD, PAYLOAD_JSON, RESULT, RESULT_JSON, fake_timestamp, task_id
from subjects import HANDLER_SCHEMA, PEERS, database_path, open_subject

#: What a prepared file holds: nothing, RUNNING tasks, queued results, finished tasks.
STATES = ("empty", "running", "pending", "finished")

_TASK_ROW = (
    "INSERT INTO background_tasks (task_id, parent_task_id, status, merge_mode, payload, "
    "result, error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PENDING_ROW = "INSERT INTO pending_queue (seq, task_id, enqueued_at) VALUES (?, ?, ?)"


def create_handler_schema(path: Path) -> None:
    """Create the handler's schema the way users get it: open a handler and close it."""
    from orbiter._internal.background import BackgroundTaskHandler

    BackgroundTaskHandler(database=path).close()


def _task_rows(count: int, state: str, start: int) -> Iterator[tuple[object, ...]]:
    for index in range(start, start + count):
        stamp = fake_timestamp(index)
        if state == "running":
            yield (task_id(index), PARENT, "running", None, PAYLOAD_JSON, None, None, stamp, stamp)
        else:
            mode = "wakeup" if state == "pending" else "hot"
            yield (
                task_id(index),
                PARENT,
                "success",
                mode,
                PAYLOAD_JSON,
                RESULT_JSON,
                None,
                stamp,
                stamp,
            )


def _pending_rows(count: int) -> Iterator[tuple[object, ...]]:
    for index in range(count):
        yield (index + 1, task_id(index), fake_timestamp(index))


def fill_handler_file(path: Path, state: str, count: int, extra_running: int = 0) -> None:
    """Bulk-insert ``count`` tasks in ``state`` (plus ``extra_running`` RUNNING ones)."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("BEGIN IMMEDIATE")
        if state != "empty":
            connection.executemany(_TASK_ROW, _task_rows(count, state, 0))
        if extra_running:
            connection.executemany(_TASK_ROW, _task_rows(extra_running, "running", count))
        if state == "pending":
            connection.executemany(_PENDING_ROW, _pending_rows(count))
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


async def fill_peer_file(directory: Path, subject: str, state: str, count: int) -> None:
    """Fill a peer's file through its own API (synchronous OFF, preparation only)."""
    peer = await open_subject(subject, directory, "OFF")
    try:
        if state in ("running", "pending"):
            for index in range(count):
                await peer.submit(task_id(index), PAYLOAD)
        if state == "pending":
            for index in range(count):
                await peer.complete(task_id(index), RESULT)
    finally:
        await peer.close()


def prepare(directory: Path, family: str, state: str, count: int, extra_running: int = 0) -> None:
    """Build the starting file of ``family`` (a subject name or ``handler``) in ``directory``."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    if family == "handler" or family in HANDLER_SCHEMA:
        path = database_path(directory, "orbiter")
        create_handler_schema(path)
        fill_handler_file(path, state, count, extra_running)
    elif family in PEERS:
        asyncio.run(fill_peer_file(directory, family, state, count))
    else:
        raise ValueError(f"nothing to prepare for {family!r}")
