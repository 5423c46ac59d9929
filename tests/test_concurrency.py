"""Concurrency: gathered results share commits, sync calls mix with async ones, threads and
two OS processes write one file, and nothing reports "database is locked"."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from orbiter._internal.background import BackgroundTaskHandler, MergeMode
from orbiter._internal.state import RunNodeStatus
from tests.conftest import HELPERS


def commits(handler: BackgroundTaskHandler) -> int:
    return int(handler._store._worker.commits)  # type: ignore[attr-defined]


async def test_gathered_results_share_commits(durable: BackgroundTaskHandler) -> None:
    count = 1_000
    for index in range(count):
        durable.submit(f"t{index}", "run")
    before = commits(durable)
    modes = await asyncio.gather(
        *(durable.handle_result(f"t{i}", i, is_main_running=i % 2 == 0) for i in range(count))
    )
    used = commits(durable) - before
    assert modes.count(MergeMode.HOT) == modes.count(MergeMode.WAKEUP) == count // 2
    assert used < count / 10, f"{count} results took {used} commits: no group commit"
    assert durable.pending_queue.size == count // 2
    assert len(durable.list_tasks(status=RunNodeStatus.SUCCESS)) == count


async def test_sync_calls_inside_the_loop_with_async_writes_in_flight(
    durable: BackgroundTaskHandler,
) -> None:
    for index in range(300):
        durable.submit(f"a{index}", "run")
    in_flight = [
        asyncio.ensure_future(durable.handle_result(f"a{i}", i, is_main_running=False))
        for i in range(300)
    ]
    await asyncio.sleep(0)  # let them queue
    for index in range(100):  # sync calls on the loop thread, while those are in flight
        durable.submit(f"s{index}", "run")
        if index % 2:
            durable.handle_error(f"s{index}", "boom")
        assert durable.get_task(f"a{index}") is not None
        assert durable.pending_queue.size >= 0
    await asyncio.gather(*in_flight)
    assert durable.pending_queue.size == 300
    assert len(durable.list_tasks(status=RunNodeStatus.FAILED)) == 50


def test_threads_share_one_handler(db_path: Path) -> None:
    errors: list[BaseException] = []
    with BackgroundTaskHandler(database=db_path) as handler:

        def work(prefix: str) -> None:
            try:
                for index in range(100):
                    handler.submit(f"{prefix}{index}", prefix)
                    asyncio.run(
                        handler.handle_result(f"{prefix}{index}", index, is_main_running=False)
                    )
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(f"th{n}-",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert handler.pending_queue.size == 400


def test_two_processes_write_one_file(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    count = 400
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(HELPERS / "child.py"),
                "mixed_writer",
                str(db_path),
                prefix,
                str(count),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for prefix in ("p-", "q-")
    ]
    outputs = [child.communicate(timeout=240) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        assert "locked" not in err
    drained = sum(json.loads(out)["drained"] for out, _ in outputs)
    wakeups_per_process = sum(1 for i in range(count) if i % 4 != 3 and i % 2 == 1)
    assert drained >= 2 * wakeups_per_process
    with sqlite3.connect(db_path) as connection:
        statuses = dict(
            connection.execute("SELECT status, count(*) FROM background_tasks GROUP BY status")
        )
        assert statuses == {"success": 2 * (count - count // 4), "failed": 2 * (count // 4)}
        assert connection.execute("SELECT count(*) FROM pending_queue").fetchone() == (0,)
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_two_threads_closing_at_once_both_wait_for_the_queued_writes(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    ids = [f"t{index}" for index in range(2000)]
    for task_id in ids:
        handler.submit(task_id, "run")
    loop = asyncio.new_event_loop()

    async def queue_writes() -> list[asyncio.Task[MergeMode]]:
        writes = [asyncio.create_task(handler.handle_result(i, 1)) for i in ids]
        await asyncio.sleep(0)  # they stage their writes, handed to the worker at once
        await asyncio.sleep(0)
        return writes

    writes = loop.run_until_complete(queue_writes())
    finished_when_returned: dict[str, int] = {}

    def close(name: str) -> None:
        handler.close()
        with sqlite3.connect(db_path) as connection:
            query = "SELECT count(*) FROM background_tasks WHERE status = 'success'"
            finished_when_returned[name] = connection.execute(query).fetchone()[0]

    closers = [threading.Thread(target=close, args=(name,)) for name in ("a", "b")]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join()
    assert finished_when_returned == {"a": 2000, "b": 2000}
    assert set(loop.run_until_complete(asyncio.gather(*writes))) == {MergeMode.HOT}
    loop.close()
