"""Torture test: mixed workloads in child processes, SIGKILLed at random, checked at the end.

Each worker process drives a durable handler on one shared file with a random mix of
``submit``, ``handle_result`` (hot and wake-up), ``handle_error``, ``drain_pending`` and
``recover_orphans``. Before and after every call it appends a line to its own journal with
a raw ``os.write`` (which survives SIGKILL), so the journals are an independent record of
what each call returned. The parent kills random workers at random moments and restarts
them; at the end it kills the rest, drains what is left, and checks:

* every task whose ``submit`` returned exists; every ``handle_result`` that returned left
  the task SUCCESS with that result and merge mode; every ``handle_error`` left it FAILED;
* every wake-up result that was returned was drained at least once;
* no result was drained twice, except an item whose drainer was killed while holding it;
* no call failed with "database is locked"; ``PRAGMA integrity_check`` is ``ok``.

Usage:
    python tests/torture/torture.py --kills 300 --workers 4        # the long run
    python tests/torture/torture.py --kills 0 --ops 5000 --workers 4  # no kills, fixed ops
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from orbiter._internal.background import BackgroundTaskHandler

# -- the worker (child process) -----------------------------------------------------------


class Journal:
    """Append-only lines written with ``os.write``: in the OS once the call returns."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, *words: object) -> None:
        os.write(self._fd, (" ".join(map(str, words)) + "\n").encode())


async def work(db: str, journal_path: Path, session: str, ops: int, seed: int) -> None:
    logging.disable(logging.CRITICAL)  # task failures are logged at WARNING; keep stderr for errors
    rng = random.Random(seed)
    journal = Journal(journal_path)
    handler = BackgroundTaskHandler(database=db, synchronous=rng.choice(["FULL", "NORMAL"]))
    running: list[str] = []
    counter = 0
    done = 0
    while ops <= 0 or done < ops:
        done += 1
        roll = rng.random()
        if roll < 0.35 or not running:
            counter += 1
            task_id = f"{session}-{counter}"
            handler.submit(task_id, f"run-{session}", payload={"n": counter})
            journal.write("S", task_id)
            running.append(task_id)
        elif roll < 0.75:
            task_id = running.pop(rng.randrange(len(running)))
            hot = rng.random() < 0.4
            mode = await handler.handle_result(task_id, {"v": task_id}, is_main_running=hot)
            journal.write("R", task_id, mode.value)
        elif roll < 0.85:
            task_id = running.pop(rng.randrange(len(running)))
            handler.handle_error(task_id, f"error of {task_id}")
            journal.write("E", task_id)
        elif roll < 0.97:
            async for task in handler.drain_pending():
                journal.write("D", task.task_id)
            journal.write("DRAIN-END")
        else:
            settled = await handler.recover_orphans()
            journal.write("O", len(settled))
    await handler.aclose()
    journal.write("EXIT")


# -- the parent ---------------------------------------------------------------------------


@dataclass
class Worker:
    index: int
    sessions: int = 0
    process: subprocess.Popen[bytes] | None = None
    journal: Path | None = None
    killed: list[Path] = field(default_factory=list)


def _die_with_parent() -> None:
    """In the child: get SIGKILLed if the parent dies, so no worker outlives a run."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start(worker: Worker, db: Path, folder: Path, ops: int, seed: int) -> None:
    worker.sessions += 1
    session = f"w{worker.index}s{worker.sessions}"
    worker.journal = folder / f"journal-{session}.log"
    with (folder / f"stderr-{session}.log").open("wb") as stderr:
        worker.process = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(db),
                str(worker.journal),
                session,
                str(ops),
                str(seed),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )


def kill(worker: Worker) -> None:
    assert worker.process is not None and worker.journal is not None
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()
    worker.killed.append(worker.journal)


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="orbiter-torture-"))
    db = folder / "torture.db"
    BackgroundTaskHandler(database=db).close()
    workers = [Worker(index) for index in range(args.workers)]
    for worker in workers:
        start(worker, db, folder, args.ops, rng.randrange(2**32))
    kills = 0
    started = time.monotonic()
    while True:
        if args.kills and kills >= args.kills:
            break
        if not args.kills and all(w.process and w.process.poll() is not None for w in workers):
            break
        if time.monotonic() - started > args.max_seconds:
            break
        time.sleep(rng.uniform(0.02, args.max_interval))
        if args.kills:
            for worker in workers:  # a worker that exited on its own (an error) restarts
                if worker.process is not None and worker.process.poll() is not None:
                    start(worker, db, folder, args.ops, rng.randrange(2**32))
            victim = rng.choice(workers)
            kill(victim)
            kills += 1
            start(victim, db, folder, args.ops, rng.randrange(2**32))
    for worker in workers:
        assert worker.process is not None
        if worker.process.poll() is None:
            kill(worker)
    asyncio.run(final_drain(db, folder / "journal-final.log"))
    errors = [
        text
        for path in sorted(folder.glob("stderr-*.log"))
        if (text := path.read_text(errors="replace").strip())
    ]
    timed_out = time.monotonic() - started > args.max_seconds
    if timed_out:
        errors.append(f"stopped after {args.max_seconds}s with {kills} kills")
    report = check(db, folder, {j for w in workers for j in w.killed}, errors)
    report.update(kills=kills, seconds=round(time.monotonic() - started, 1), folder=str(folder))
    return report


async def final_drain(db: Path, journal_path: Path) -> None:
    journal = Journal(journal_path)
    async with BackgroundTaskHandler(database=db) as handler:
        await handler.recover_orphans()
        async for task in handler.drain_pending():
            journal.write("D", task.task_id)
        journal.write("DRAIN-END")


def check(db: Path, folder: Path, killed: set[Path], errors: list[str]) -> dict[str, object]:
    """Compare the journals with the database; return a report with a list of violations."""
    problems = list(errors)
    submitted: set[str] = set()
    results: dict[str, str] = {}
    failed: set[str] = set()
    receipts: Counter[str] = Counter()
    held_when_killed: Counter[str] = Counter()
    for path in sorted(folder.glob("journal-*.log")):
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        for words in lines:
            if words[0] == "S":
                submitted.add(words[1])
            elif words[0] == "R":
                results[words[1]] = words[2]
            elif words[0] == "E":
                failed.add(words[1])
            elif words[0] == "D":
                receipts[words[1]] += 1
        if path in killed and lines and lines[-1][0] == "D":
            held_when_killed[lines[-1][1]] += 1
    with sqlite3.connect(db) as connection:
        rows = {
            row[0]: row[1:]
            for row in connection.execute(
                "SELECT task_id, status, merge_mode, json_extract(result, '$.v'), error "
                "FROM background_tasks"
            )
        }
        left = connection.execute("SELECT count(*) FROM pending_queue").fetchone()[0]
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
    for task_id in submitted:
        if task_id not in rows:
            problems.append(f"submitted {task_id} is missing")
    for task_id, mode in results.items():
        status, merge_mode, value, _ = rows.get(task_id, (None, None, None, None))
        if (status, merge_mode, value) != ("success", mode, task_id):
            problems.append(f"result of {task_id} lost: {rows.get(task_id)}")
        if mode == "wakeup" and receipts[task_id] == 0:
            problems.append(f"wake-up result of {task_id} was never drained")
    for task_id in failed:
        if rows.get(task_id, ("",))[0] != "failed":
            problems.append(f"failure of {task_id} lost: {rows.get(task_id)}")
    for task_id, count in receipts.items():
        if count > 1 + held_when_killed[task_id]:
            problems.append(
                f"{task_id} drained {count} times, held by a killed drainer "
                f"{held_when_killed[task_id]} times"
            )
    if left:
        problems.append(f"{left} items still pending after the final drain")
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    if any("locked" in error for error in errors):
        problems.append("a call failed with 'database is locked'")
    redelivered = sum(1 for t, c in receipts.items() if c > 1)
    return {
        "submitted": len(submitted),
        "results": len(results),
        "wakeup_results": sum(1 for m in results.values() if m == "wakeup"),
        "failed": len(failed),
        "drained": sum(receipts.values()),
        "redelivered_after_kill": redelivered,
        "tasks_in_db": len(rows),
        "integrity": integrity,
        "problems": problems[:50],
        "problem_count": len(problems),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        db, journal, session, ops, seed = sys.argv[2:7]
        asyncio.run(work(db, Path(journal), session, int(ops), int(seed)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kills", type=int, default=300, help="SIGKILLs before stopping (0: none)")
    parser.add_argument("--ops", type=int, default=0, help="calls per session (0: no limit)")
    parser.add_argument("--max-interval", type=float, default=0.3, help="max seconds between kills")
    parser.add_argument("--max-seconds", type=float, default=3600, help="give up after this")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--dir", help="where to put the database and journals")
    args = parser.parse_args()
    if not args.kills and not args.ops:
        parser.error("with --kills 0, give --ops")
    report = run(args)
    report["seed"] = args.seed
    print(json.dumps(report, indent=2))
    return 1 if report["problem_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
