"""Shared by the test_crash_*.py files: start and SIGKILL ``crash_child.py``, queue results
to start from, and read the file back over a fresh sqlite3 connection."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from tests.test_crash import start_child

from orbiter._internal.background import BackgroundTaskHandler


def start(*args: str) -> subprocess.Popen[str]:
    """Start ``crash_child.py ARGS``; read its lines with ``tests.test_crash.read_until``."""
    return start_child(*args, script="crash_child.py")


def kill(child: subprocess.Popen[str]) -> list[str]:
    """SIGKILL ``child`` and reap it; return the whole lines it printed that were not read
    yet (a line the kill cut short is left out)."""
    child.send_signal(signal.SIGKILL)
    rest, _ = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL, rest
    return rest[: rest.rfind("\n") + 1].splitlines()


def words(lines: list[str], first: str, count: int) -> list[list[str]]:
    """The lines that start with the word ``first`` and have ``count`` words, split."""
    split = (line.split(maxsplit=count - 1) for line in lines)
    return [w for w in split if len(w) == count and w[0] == first]


def queue_runs(db: Path, runs: int, per_run: int) -> list[str]:
    """Queue ``per_run`` wake-up results for each run r0.., interleaved (item 0 of every
    run, then item 1, ...); return the ids in queue order. The handler is closed."""

    async def queue() -> list[str]:
        ids = [f"r{run}-{item}" for item in range(per_run) for run in range(runs)]
        async with BackgroundTaskHandler(database=db) as handler:
            for task_id in ids:
                handler.submit(task_id, task_id.split("-")[0])
                await handler.handle_result(task_id, task_id, is_main_running=False)
        return ids

    return asyncio.run(queue())


def sql(db: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of ``query``, read over a fresh sqlite3 connection."""
    connection = sqlite3.connect(db)
    try:
        return [tuple(row) for row in connection.execute(query, params)]
    finally:
        connection.close()


def queued(db: Path) -> list[str]:
    """The queued task ids, in queue order."""
    return [row[0] for row in sql(db, "SELECT task_id FROM pending_queue ORDER BY seq")]


def integrity(db: Path) -> str:
    return str(sql(db, "PRAGMA integrity_check")[0][0])
