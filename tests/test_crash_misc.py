"""SIGKILL at the remaining moments that matter: right after aclose() returned with
completions in flight, inside a recoverer's resubmit callback, inside a hot merge
callback, inside a wake-up merge callback, midway through creating a new file, and
before a killed process is reaped. A fresh process finds every returned call's effect,
nothing half done, and the dead process's tasks and queue items free at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.store.schema import HEAD_REVISION
from tests.helpers.crash_common import integrity, kill, queue_runs, queued, sql, start, words
from tests.test_crash import inspect, read_until
from tests.test_crash import start_child as start_child_py


def recover_orphans(db: Path) -> list[str]:
    """Fail the orphans from this (fresh) process; return their ids."""

    async def recover() -> list[str]:
        async with BackgroundTaskHandler(database=db) as handler:
            return sorted(task.task_id for task in await handler.recover_orphans("fail"))

    return asyncio.run(recover())


def process_state(pid: int) -> str:
    """The state letter of a process in /proc (``Z``: killed but not reaped, a zombie)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_aclose_with_completions_in_flight_then_sigkill(db_path: Path) -> None:
    child = start("aclose_in_flight", str(db_path), "300")
    (returned,) = [json.loads(w[1]) for w in words(read_until(child, "closed"), "closed", 2)]
    kill(child)
    tasks = inspect(db_path)["tasks"]
    done = {task_id for task_id, task in tasks.items() if task["status"] == "success"}
    assert set(returned) <= done
    # Each stored wake-up result (odd index) has its queue entry, and only they do.
    assert set(queued(db_path)) == {task_id for task_id in done if int(task_id[1:]) % 2}
    assert integrity(db_path) == "ok"


def test_a_recoverer_killed_inside_the_resubmit_callback_leaves_recoverable_orphans(
    db_path: Path,
) -> None:
    owner = start_child_py("submit", str(db_path), "5")
    read_until(owner, "submitted 4")
    kill(owner)
    recoverer = start("recover_resubmit", str(db_path))
    read_until(recoverer, "resubmitting")
    kill(recoverer)
    # Adopted by a process that then died: orphans again, settled by the next recovery.
    assert recover_orphans(db_path) == [f"t{index}" for index in range(5)]
    assert sql(db_path, "SELECT count(*) FROM background_tasks WHERE status = 'running'") == [(0,)]


def test_a_hot_result_is_committed_before_the_merge_callbacks_run(db_path: Path) -> None:
    child = start("hot_callback", str(db_path))
    read_until(child, "callback hot hot")
    kill(child)
    task = inspect(db_path)["tasks"]["hot"]
    assert (task["status"], task["result"], task["merge_mode"]) == ("success", {"v": 1}, "hot")


def test_killed_inside_a_wakeup_callback_the_item_stays_queued(db_path: Path) -> None:
    ids = queue_runs(db_path, 1, 6)
    child = start("wakeup_callback", str(db_path), "2")
    lines = read_until(child, f"callback {ids[2]}")
    kill(child)
    assert [w[1] for w in words(lines, "yielded", 2)] == ids[:2]
    assert inspect(db_path, "--drain")["drained"] == ids[2:]


def test_creating_a_new_file_killed_midway_leaves_a_file_that_opens_cleanly(
    db_path: Path,
) -> None:
    child = start("upgrade", str(db_path), "handler", "after:1:CREATE TABLE pending_queue")
    read_until(child, "hanging after")
    kill(child)
    assert sql(db_path, "SELECT count(*) FROM sqlite_master") == [(0,)]  # nothing half made
    seen = inspect(db_path)
    assert (seen["tasks"], seen["pending_size"]) == ({}, 0)
    assert sql(db_path, "SELECT version_num FROM alembic_version") == [(HEAD_REVISION,)]


def test_the_tasks_and_items_of_a_killed_but_unreaped_process_are_free_at_once(
    db_path: Path,
) -> None:
    ids = queue_runs(db_path, 1, 3)
    owner = start_child_py("submit", str(db_path), "3")
    read_until(owner, "submitted 2")
    drainer = start("wakeup_callback", str(db_path), "1")  # claimed all three, holds the 2nd
    read_until(drainer, f"callback {ids[1]}")
    try:
        for child in (owner, drainer):
            os.kill(child.pid, signal.SIGKILL)  # not reaped: a zombie keeps its pid
        for child in (owner, drainer):
            deadline = time.monotonic() + 10
            while process_state(child.pid) != "Z":
                assert time.monotonic() < deadline, "the killed child never became a zombie"
                time.sleep(0.01)
        assert inspect(db_path, "--drain")["drained"] == ids[1:]
        assert recover_orphans(db_path) == [f"t{index}" for index in range(3)]
    finally:
        for child in (owner, drainer):
            child.kill()
            child.communicate(timeout=10)
