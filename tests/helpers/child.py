"""A separate process that drives a durable handler, for crash and restart tests.

Usage: child.py COMMAND DB [ARGS...]. Commands print one line per completed call and
flush, so the parent can SIGKILL this process right after a given call returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

from orbiter._internal.background import BackgroundTaskHandler


def hang() -> None:
    """Wait to be killed (never exit on our own)."""
    while True:
        time.sleep(60)


def say(*words: object) -> None:
    print(*words, flush=True)


def submit(db: str, count: str, synchronous: str = "FULL") -> None:
    handler = BackgroundTaskHandler(database=db, synchronous=synchronous)
    for index in range(int(count)):
        handler.submit(f"t{index}", "run", payload={"index": index})
        say("submitted", index)
    hang()


async def _results(db: str, count: int, synchronous: str) -> None:
    handler = BackgroundTaskHandler(database=db, synchronous=synchronous)
    for index in range(count):
        handler.submit(f"t{index}", "run", payload={"index": index})
        mode = await handler.handle_result(
            f"t{index}", {"value": index}, is_main_running=index % 3 == 0
        )
        say("returned", index, mode.value)
    hang()


def results(db: str, count: str, synchronous: str = "FULL") -> None:
    asyncio.run(_results(db, int(count), synchronous))


async def _gather_results(db: str, count: int) -> None:
    handler = BackgroundTaskHandler(database=db)
    for index in range(count):
        handler.submit(f"g{index}", "run")

    async def one(index: int) -> None:
        await handler.handle_result(f"g{index}", index, is_main_running=False)
        say("returned", index)

    await asyncio.gather(*(one(index) for index in range(count)))
    say("all returned")
    hang()


def gather_results(db: str, count: str) -> None:
    asyncio.run(_gather_results(db, int(count)))


async def _lane_results(db: str, lanes: int, per_lane: int) -> None:
    """``lanes`` coroutines each complete ``per_lane`` tasks in turn: a stream of batches
    of concurrent completions (run together in the worker), for a kill to land in."""
    handler = BackgroundTaskHandler(database=db)
    for index in range(lanes * per_lane):
        handler.submit(f"l{index}", "run")
    say("submitted")

    async def lane(first: int) -> None:
        for index in range(first, lanes * per_lane, lanes):
            await handler.handle_result(f"l{index}", index, is_main_running=False)
            say("returned", index)

    await asyncio.gather(*(lane(first) for first in range(lanes)))
    say("all returned")
    hang()


def lane_results(db: str, lanes: str, per_lane: str) -> None:
    asyncio.run(_lane_results(db, int(lanes), int(per_lane)))


async def _drain_hold(db: str, hold_at: int) -> None:
    handler = BackgroundTaskHandler(database=db)
    position = 0
    async for task in handler.drain_pending():
        say("holding", task.task_id)
        if position == hold_at:
            hang()
        position += 1
    say("done")


def drain_hold(db: str, hold_at: str) -> None:
    asyncio.run(_drain_hold(db, int(hold_at)))


async def _finish_existing(db: str) -> None:
    handler = BackgroundTaskHandler(database=db)
    running = handler.list_tasks()
    for task in running:
        if task.task_id.endswith("-fail"):
            handler.handle_error(task.task_id, "failed after restart")
        else:
            await handler.handle_result(task.task_id, "after restart", is_main_running=False)
    say("finished", len(running))
    await handler.aclose()


def finish_existing(db: str) -> None:
    asyncio.run(_finish_existing(db))


def inspect(db: str) -> None:
    """Print what a fresh handler sees, as JSON."""

    async def pending() -> list[str]:
        return [task.task_id async for task in handler.drain_pending()]

    handler = BackgroundTaskHandler(database=db)
    tasks = {
        task.task_id: {
            "status": task.status.value,
            "result": task.result,
            "error": task.error,
            "merge_mode": task.merge_mode and task.merge_mode.value,
            "payload": task.payload,
        }
        for task in handler.list_tasks()
    }
    size = handler.pending_queue.size
    drained = asyncio.run(pending()) if "--drain" in sys.argv else None
    say(json.dumps({"tasks": tasks, "pending_size": size, "drained": drained}))
    handler.close()


async def _mixed_writer(db: str, prefix: str, count: int) -> None:
    handler = BackgroundTaskHandler(database=db)
    drained = 0
    for index in range(count):
        task_id = f"{prefix}{index}"
        handler.submit(task_id, prefix)
        if index % 4 == 3:
            handler.handle_error(task_id, "boom")
        else:
            await handler.handle_result(task_id, index, is_main_running=index % 2 == 0)
        if index % 25 == 0:
            drained += len([t async for t in handler.drain_pending()])
    drained += len([t async for t in handler.drain_pending()])
    say(json.dumps({"drained": drained}))
    await handler.aclose()


def mixed_writer(db: str, prefix: str, count: str) -> None:
    asyncio.run(_mixed_writer(db, prefix, int(count)))


def recover(db: str, action: str) -> None:
    async def run() -> list[str]:
        async with BackgroundTaskHandler(database=db) as handler:
            return [task.task_id for task in await handler.recover_orphans(action)]

    say(json.dumps(asyncio.run(run())))


def drain_all(db: str, parent: str = "", delay: str = "0") -> None:
    async def run() -> list[str]:
        async with BackgroundTaskHandler(database=db) as handler:
            drained = []
            async for task in handler.drain_pending(parent or None):
                drained.append(task.task_id)
                await asyncio.sleep(float(delay))
            return drained

    say(json.dumps(asyncio.run(run())))


def wait(db: str, timeout: str) -> None:
    async def run() -> None:
        async with BackgroundTaskHandler(database=db) as handler:
            say("waiting")
            started, cpu = time.monotonic(), time.process_time()
            found = await handler.pending_queue.wait(float(timeout))
            say(
                json.dumps(
                    {
                        "found": found,
                        "elapsed": time.monotonic() - started,
                        "cpu": time.process_time() - cpu,
                    }
                )
            )

    asyncio.run(run())


def queue_one(db: str, task_id: str) -> None:
    async def run() -> None:
        async with BackgroundTaskHandler(database=db) as handler:
            handler.submit(task_id, "run")
            await handler.handle_result(task_id, "late", is_main_running=False)

    asyncio.run(run())
    say("queued")


def restore_hold(db: str, parent: str) -> None:
    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        async with handler.restore_pending(parent) as results:
            say("holding", len(results))
            hang()

    asyncio.run(run())


def drain_in_failed_batch(db: str, hold_at: str) -> None:
    """Drain, the first claim sharing a batch with another caller's operation that fails
    (the worker rolls the batch back and runs each operation alone); hold item
    ``hold_at`` and wait to be killed."""

    def fails(db: object) -> None:
        raise ValueError("another caller's operation failed")

    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        worker = handler._store._worker  # type: ignore[attr-defined]
        worker.submit(lambda db: time.sleep(0.3))  # the commit thread is busy meanwhile
        drain = handler.drain_pending()
        first = asyncio.ensure_future(anext(drain))  # its claim queues behind the sleep
        await asyncio.sleep(0.1)
        with contextlib.suppress(ValueError):
            await worker.acall(fails)  # queued after the claim: the same batch
        task = await first
        for _ in range(int(hold_at)):
            task = await anext(drain)
        say("holding", task.task_id)
        hang()

    asyncio.run(run())


def drain_pause(db: str, pause_at: str, hold_at: str) -> None:
    """Drain; at item ``pause_at`` say "paused" and wait for the file ``DB.go``, then go on
    to item ``hold_at``, hold it and wait to be killed."""
    go = Path(f"{db}.go")

    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        position = 0
        async for task in handler.drain_pending():
            if position == int(pause_at):
                say("paused", task.task_id)
                while not go.exists():
                    await asyncio.sleep(0.01)
            if position == int(hold_at):
                say("holding", task.task_id)
                hang()
            position += 1

    asyncio.run(run())


def push_again(db: str, task_id: str) -> None:
    """Push a finished task back onto the queue from a handler of this process."""
    with BackgroundTaskHandler(database=db) as handler:
        task = handler.get_task(task_id)
        assert task is not None
        handler.pending_queue.push(task)
    say("pushed")


def open_race(db: str) -> None:
    """Open (and so create) a database at the same moment as other processes."""
    BackgroundTaskHandler(database=db).close()
    say("opened")


def stall_owner(db: str) -> None:
    """Own a running task with a short lease, then wait for a line on stdin."""
    handler = BackgroundTaskHandler(database=db, heartbeat_interval=0.1, lease_timeout=0.5)
    handler.submit("stalled", "run")
    say("ready")
    sys.stdin.readline()
    handler.submit("after-stall", "run")
    say("submitted")
    sys.stdin.readline()
    handler.close()


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    arguments = [a for a in arguments if not a.startswith("--")]
    globals()[command](*arguments)
