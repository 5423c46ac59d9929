"""A child process for the crash tests: it makes calls, prints a line after each returns
(flushed), and hangs at a chosen moment so the parent can SIGKILL it right there.

Usage: crash_child.py COMMAND DB [ARGS...]. Some commands take a SQL hook, ``after:N:TEXT``
(hang right after the N-th statement containing TEXT has run, inside its transaction),
``commit:N:TEXT`` (hang at the commit that follows it, before it reaches SQLite), or
``traced-commit:N:TEXT`` (the same, counting what SQLite itself runs: see below).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

from orbiter._internal.background import BackgroundTask, BackgroundTaskHandler, MergeMode

ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


def hang() -> None:
    """Wait to be killed; give up after a minute, so a failed test leaves no process behind."""
    time.sleep(60)
    os._exit(3)


def say(*words: object) -> None:
    print(*words, flush=True)


def hang_on_sql(hook: str) -> None:
    """Install ``after:N:TEXT`` or ``commit:N:TEXT`` (see the module docstring)."""
    where, nth, marker = hook.split(":", 2)
    seen = [0]

    @event.listens_for(Engine, "after_cursor_execute")
    def after(*args: Any) -> None:
        statement = str(args[2])
        if marker in statement:
            seen[0] += 1
            if where == "after" and seen[0] == int(nth):
                say("hanging after", " ".join(statement.split())[:80])
                hang()

    @event.listens_for(Engine, "commit")
    def commit(connection: Any) -> None:
        if where == "commit" and seen[0] == int(nth):
            say("hanging before commit")
            hang()

    # Statements run on the sqlite3 connection itself (the store's executor, which the
    # CLI's requeue uses) bypass SQLAlchemy's events: SQLite's trace sees them, and the
    # COMMIT, which it reports before running it. (It counts each row of an executemany.)
    traced = [0]

    def count(statement: str) -> None:
        if marker in statement:
            traced[0] += 1
        elif statement == "COMMIT" and traced[0] == int(nth):
            say("hanging before commit")
            hang()

    if where == "traced-commit":  # (an aiosqlite connection has no trace: not there)

        @event.listens_for(Engine, "connect")
        def connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.set_trace_callback(count)


COMMIT_DELAY = {"seconds": 0.0}


def slow_handler(db: str, synchronous: str = "FULL") -> BackgroundTaskHandler:
    """A handler whose COMMITs first wait ``COMMIT_DELAY["seconds"]``. Set once the set-up
    is done, the delay widens the window in which a call that returned before its commit
    would be caught by the kill that follows its return."""

    def trace(statement: str) -> None:
        if statement == "COMMIT":
            time.sleep(COMMIT_DELAY["seconds"])

    @event.listens_for(Engine, "connect")
    def connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.set_trace_callback(trace)

    return BackgroundTaskHandler(database=db, synchronous=synchronous)


def completed(task_id: str, index: int) -> BackgroundTask:
    """A finished wake-up task this process never submitted."""
    task = BackgroundTask(task_id, "run", payload={"index": index})
    task.start()
    task.complete({"v": index})
    task.merge_mode = MergeMode.WAKEUP
    return task


# -- sync calls from plain code (no event loop) ---------------------------------------------


def fail(db: str, count: str, synchronous: str) -> None:
    """Submit t0.., then fail o0 (a task of an earlier process), t0, o1, t1, ..."""
    handler = slow_handler(db, synchronous)
    for index in range(int(count)):
        handler.submit(f"t{index}", "run")
    COMMIT_DELAY["seconds"] = 0.005
    for index in range(int(count)):
        for task_id in (f"o{index}", f"t{index}"):
            handler.handle_error(task_id, f"error {task_id}")
            say("failed", task_id)
    hang()


def push(db: str, count: str, synchronous: str) -> None:
    """Push finished tasks: new ones (even indexes) and submitted ones (odd)."""
    handler = slow_handler(db, synchronous)
    COMMIT_DELAY["seconds"] = 0.005
    for index in range(int(count)):
        if index % 2:
            task = handler.submit(f"p{index}", "run", payload={"index": index})
            task.complete({"v": index})
            task.merge_mode = MergeMode.WAKEUP
        else:
            task = completed(f"p{index}", index)
        handler.pending_queue.push(task)
        say("pushed", index)
    hang()


def pop_all(db: str, synchronous: str) -> None:
    """Take everything queued, print the ids, hang."""
    handler = slow_handler(db, synchronous)
    COMMIT_DELAY["seconds"] = 0.005
    say("popped", json.dumps([task.task_id for task in handler.pending_queue.pop_all()]))
    hang()


def push_pop_rounds(db: str) -> None:
    """Push r0 and pop everything, push r1 and pop everything, ... until killed."""
    handler = slow_handler(db)
    COMMIT_DELAY["seconds"] = 0.005
    for index in range(100_000):
        handler.pending_queue.push(completed(f"r{index}", index))
        say("pushed", index)
        popped = handler.pending_queue.pop_all()
        say("popped", index, json.dumps([task.task_id for task in popped]))


def sync_on_loop(db: str, count: str) -> None:
    """Start ``count`` completions, then make sync calls on the loop thread while those
    writes are in flight; hang (blocking the loop) once the sync calls returned."""

    async def run() -> None:
        handler = slow_handler(db)
        for index in range(int(count)):
            handler.submit(f"a{index}", "run")
        for index in range(20):
            handler.submit(f"e{index}", "run")
        COMMIT_DELAY["seconds"] = 0.005

        async def complete(index: int) -> None:
            await handler.handle_result(f"a{index}", index, is_main_running=False)

        in_flight = asyncio.gather(*(complete(index) for index in range(int(count))))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the completions' writes are handed to the worker
        for index in range(20):
            if index % 4 == 0:
                handler.submit(f"s{index}", "run")
                say("sync submit", f"s{index}")
            elif index % 4 == 1:
                handler.handle_error(f"e{index}", "boom")
                say("sync error", f"e{index}")
            elif index % 4 == 2:
                handler.pending_queue.push(completed(f"q{index}", index))
                say("sync push", f"q{index}")
            else:
                popped = [task.task_id for task in handler.pending_queue.pop_all()]
                say("sync pop_all", json.dumps(popped))
        say("sync done")
        assert not in_flight.done()  # resolved on this thread: the kill decides what committed
        hang()

    asyncio.run(run())


def random_sync_calls(db: str, journal: str, session: str, seed: str) -> None:
    """Random sync calls without a loop, until killed. Each is journaled (raw os.write)
    after it returns; pop_all also before it starts. Prints ``ops N`` every 10 calls."""
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def log(*words: object) -> None:
        os.write(fd, (" ".join(map(str, words)) + "\n").encode())

    rng = random.Random(int(seed))
    busy = rng.random() < 0.5  # a heartbeat that keeps the store's worker busy
    handler = BackgroundTaskHandler(
        database=db,
        synchronous=rng.choice(["FULL", "NORMAL"]),
        heartbeat_interval=0.001 if busy else 5.0,
    )
    running: list[str] = []
    for counter in range(1, 1_000_000):
        roll, task_id = rng.random(), f"{session}-{counter}"
        if roll < 0.35 or not running:
            handler.submit(task_id, "run")
            log("S", task_id)
            running.append(task_id)
        elif roll < 0.55:
            victim = running.pop(rng.randrange(len(running)))
            handler.handle_error(victim, f"error of {victim}")
            log("E", victim)
        elif roll < 0.75:
            handler.pending_queue.push(completed(task_id, counter))
            log("P", task_id)
        elif roll < 0.88:
            task = handler.get_task(running.pop(rng.randrange(len(running))))
            assert task is not None
            task.complete({"v": counter})
            task.merge_mode = MergeMode.WAKEUP
            handler.pending_queue.push(task)
            log("P", task.task_id)
        else:
            log("B")
            log("A", *[task.task_id for task in handler.pending_queue.pop_all()])
        if counter % 10 == 0:
            say("ops", counter)


# -- restores --------------------------------------------------------------------------------


def restore(db: str, parent: str) -> None:
    """Restore one run's results; hang right after the block exits."""

    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        async with handler.restore_pending(parent) as results:
            pass
        say("restored", json.dumps([task.task_id for task in results]))
        hang()

    asyncio.run(run())


def restore_runs(db: str, runs: str, seed: str) -> None:
    """Restore r0, r1, ... one after another (some blocks pause), until killed."""
    rng = random.Random(int(seed))

    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        for index in range(int(runs)):
            async with handler.restore_pending(f"r{index}") as results:
                if rng.random() < 0.5:
                    await asyncio.sleep(rng.uniform(0, 0.01))
            say("restored", f"r{index}", len(results))
        hang()

    asyncio.run(run())


# -- schema changes and CLI commands ----------------------------------------------------------


def upgrade(db: str, how: str, hook: str) -> None:
    """Open (creating or upgrading) the file with a SQL hook: by a handler, by
    ``orbiter-bg migrate``, or by ``alembic upgrade head``."""
    hang_on_sql(hook)
    if how == "handler":
        BackgroundTaskHandler(database=db)
    elif how == "cli":
        from orbiter.cli import main

        main(["migrate", "--db", db])
    else:
        from alembic.config import main as alembic

        os.environ["ORBITER_BG_DATABASE"] = db
        alembic(["-c", str(ALEMBIC_INI), "upgrade", "head"])
    say("no hang: the hook never fired")


def cli(db: str, hook: str, *argv: str) -> None:
    """Run ``orbiter-bg ARGV --db DB`` with a hook: a SQL hook, ``output`` (hang when the
    command prints its JSON result), ``drained:K`` (hang once the K-th drained item is
    printed) or ``-`` (none)."""
    import orbiter.cli as command

    if hook.startswith(("after:", "commit:", "traced-commit:")):
        hang_on_sql(hook)
    elif hook == "output":

        def emit(document: Any) -> None:
            say("output", json.dumps(document))
            hang()

        command.emit_json = emit  # type: ignore[attr-defined]  # cli's own name for it
    elif hook.startswith("drained:"):
        print_drained, printed = command._print_drained, [0]

        def hold(out: Any, item: dict[str, Any]) -> None:
            print_drained(out, item)
            printed[0] += 1
            say("printed", item["task_id"])
            if printed[0] == int(hook.split(":")[1]):
                hang()

        command._print_drained = hold
    say("exit", command.main([*argv, "--db", db]))


# -- closing, recovery and callbacks ----------------------------------------------------------


def aclose_in_flight(db: str, count: str) -> None:
    """Close while ``count`` completions (hot and wake-up) are in flight; print those that
    returned, then hang."""

    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        for index in range(int(count)):
            handler.submit(f"c{index}", "run")
        handler.on_merge(lambda task, mode: None)

        async def complete(index: int) -> str:
            await handler.handle_result(f"c{index}", index, is_main_running=index % 2 == 0)
            return f"c{index}"

        calls = [asyncio.ensure_future(complete(index)) for index in range(int(count))]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await handler.aclose()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        say("closed", json.dumps([o for o in outcomes if isinstance(o, str)]))
        hang()

    asyncio.run(run())


def recover_resubmit(db: str) -> None:
    """Recover orphans by resubmitting them; hang inside the first resubmit callback."""

    def resubmit(task: BackgroundTask) -> None:
        say("resubmitting", task.task_id)
        hang()

    async def run() -> None:
        await BackgroundTaskHandler(database=db).recover_orphans("resubmit", resubmit=resubmit)

    asyncio.run(run())


def hot_callback(db: str) -> None:
    """Complete a task for a hot merge; hang inside the merge callback."""

    def on_merge(task: BackgroundTask, mode: MergeMode) -> None:
        say("callback", task.task_id, mode.value)
        hang()

    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        handler.on_merge(on_merge)
        handler.submit("hot", "run")
        await handler.handle_result("hot", {"v": 1}, is_main_running=True)

    asyncio.run(run())


def wakeup_callback(db: str, at: str) -> None:
    """Drain; hang inside the merge callback of the item at position ``at``."""
    calls = [0]

    def on_merge(task: BackgroundTask, mode: MergeMode) -> None:
        say("callback", task.task_id, mode.value)
        if calls[0] == int(at):
            hang()
        calls[0] += 1

    async def run() -> None:
        handler = BackgroundTaskHandler(database=db)
        handler.on_merge(on_merge)
        async for task in handler.drain_pending():
            say("yielded", task.task_id)

    asyncio.run(run())


if __name__ == "__main__":
    name, *arguments = sys.argv[1:]
    globals()[name](*arguments)
