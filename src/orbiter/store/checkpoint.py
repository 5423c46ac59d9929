"""The checkpointer: copies the write-ahead log back into the database off the commit path.

By default SQLite checkpoints inside the commit that pushes the WAL past 1,000 pages, so
now and then one caller's commit also copies those pages and syncs the database file.
At ``synchronous=NORMAL``, where commits themselves do not sync, that is the p99 of every
call (~5 ms against ~0.3 ms). There the commit worker turns it off on its connection and
this thread, with a connection of its own, runs a ``PASSIVE`` checkpoint shortly after
commits happen: it never blocks the writer, and SQLite's C code does the copying and
syncing outside the GIL, on the other core.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Checkpointer"]

logger = logging.getLogger(__name__)

#: Seconds the thread lets commits accumulate before a checkpoint (at most one per wait).
CHECKPOINT_DELAY = 0.05


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` on ``connection`` after :meth:`committed`.

    Args:
        connection: A connection of its own to the database.
        close: Closes ``connection`` (called by the thread when it stops).
        delay: Seconds between a commit and the checkpoint that covers it.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        close: Callable[[], None],
        delay: float = CHECKPOINT_DELAY,
    ) -> None:
        self._connection = connection
        self._close = close
        self._delay = delay
        self._pending = threading.Event()  # commits since the last checkpoint
        self._stopped = threading.Event()
        #: Checkpoints run so far (for tests and diagnostics).
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="orbiter-bg-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Say a transaction was committed (cheap: called after every commit)."""
        if not self._pending.is_set():
            self._pending.set()

    def _run(self) -> None:
        try:
            while True:
                self._pending.wait()
                if self._stopped.wait(self._delay):
                    return
                self._pending.clear()
                self._checkpoint()
        finally:
            self._close()

    def _checkpoint(self) -> None:
        try:
            row: Any = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # e.g. a full disk: the next commit's checkpoint retries
            logger.warning("checkpoint failed: %s", exc)
            return
        self.checkpoints += 1
        logger.debug("checkpoint: busy=%s, log frames=%s, checkpointed=%s", *row)

    def stop(self) -> None:
        """Stop the thread and close its connection (the last connection to close runs
        SQLite's own final checkpoint)."""
        self._stopped.set()
        self._pending.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
