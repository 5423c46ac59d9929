"""``orbiter-bg demo``: a host process is killed with SIGKILL, and no result is lost.

Three processes share one SQLite file:

1. the **host** (``python -m orbiter.demo host``) starts a run and submits background
   tasks doing asyncio work with random delays; the quick ones finish while the run is
   active and are hot-merged; the run then finishes, and the slow ones' results go to the
   pending queue (``is_main_running=False``);
2. the **parent** (``orbiter-bg demo``) waits until the host says every result is stored,
   checks the queue in the file, and kills the host with ``SIGKILL``;
3. the **restore** process (``python -m orbiter.demo restore``) opens the same file,
   drains the pending results and merges them.

The parent then counts everything again from the file and exits 0 only if submitted =
hot-merged + wake-up-merged with nothing left queued. Children report to the parent as
JSON lines on their stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import queue
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.status import Status
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from orbiter.cli_db import CliError, open_for_reading, resolve_target
from orbiter.cli_render import markup_safe
from orbiter.migrate import current_revision
from orbiter.store import admin_queries as q
from orbiter.store.engine import is_writable
from orbiter.store.schema import KNOWN_REVISIONS
from orbiter.types import OrbiterError

__all__ = ["child_main", "prepare_demo_file", "run_demo"]

#: Every demo run's parent id starts with this (a file holding other tasks is not ours to delete).
RUN_PREFIX = "demo-run-"
DEFAULT_NAME = "orbiter-demo.db"

#: How long the host's main run is active, and the ranges of the tasks' delays: quick
#: tasks finish before the run ends (hot-merge), slow ones after it (wake-up-merge).
RUN_SECONDS = 0.6
QUICK_DELAYS = (0.05, 0.4)
SLOW_DELAYS = (0.8, 1.3)

#: Seconds the parent waits for a child's next report before giving up.
EVENT_TIMEOUT = 30.0
#: Seconds a host that was never killed (its parent died) waits before leaving.
HOST_LINGER = 60.0


# == the child processes ==================================================================


def _emit(event: str, **fields: Any) -> None:
    """Report one event to the parent: a JSON line on stdout, flushed."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _crunch(seed: str) -> str:
    """A little CPU work (run in a thread): an iterated SHA-256."""
    digest = seed.encode()
    for _ in range(2_000):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:12]


async def _work(task_id: str, delay: float) -> dict[str, Any]:
    """One background task: wait on "I/O", then compute; returns its result."""
    await asyncio.sleep(delay)
    digest = await asyncio.to_thread(_crunch, task_id)
    return {"digest": digest, "took_s": round(delay, 3)}


def _plan_delays(count: int, rng: random.Random) -> list[float]:
    quick = count // 2
    delays = [rng.uniform(*QUICK_DELAYS) for _ in range(quick)]
    delays += [rng.uniform(*SLOW_DELAYS) for _ in range(count - quick)]
    rng.shuffle(delays)
    return delays


@dataclass
class _Run:
    """The host's main run: active until :data:`RUN_SECONDS` have passed."""

    run_id: str
    active: bool = True


async def _run_task(handler: Any, run: _Run, task_id: str, delay: float) -> str:
    result = await _work(task_id, delay)
    mode = await handler.handle_result(task_id, result, is_main_running=run.active)
    if mode.value == "wakeup":
        _emit("queued", task_id=task_id, result=result)
    return str(mode.value)


async def _host(database: str, run_id: str, count: int, seed: int | None) -> None:
    """The host process: submit, hot-merge, finish the run, queue, then wait to die."""
    from orbiter._internal.background import BackgroundTaskHandler

    handler = BackgroundTaskHandler(database=database)
    run = _Run(run_id)
    handler.on_merge(
        lambda task, mode: _emit("hot_merged", task_id=task.task_id, result=task.result)
    )
    _emit("run_started", run_id=run_id, pid=os.getpid())
    jobs: list[asyncio.Task[str]] = []
    for number, delay in enumerate(_plan_delays(count, random.Random(seed)), start=1):
        task_id = f"{run_id}/task-{number:02d}"
        handler.submit(task_id, run_id, payload={"number": number, "delay_s": round(delay, 3)})
        _emit("submitted", task_id=task_id, delay_s=round(delay, 3))
        jobs.append(asyncio.create_task(_run_task(handler, run, task_id, delay)))
    await asyncio.sleep(RUN_SECONDS)
    run.active = False
    _emit("run_finished", still_working=sum(not job.done() for job in jobs))
    modes = await asyncio.gather(*jobs)
    # Every handle_result has returned: each queued result is committed to the file.
    _emit("ready", queued=modes.count("wakeup"), pending=handler.pending_queue.size)
    await asyncio.sleep(HOST_LINGER)  # the parent kills us long before this
    raise SystemExit("demo host: never killed; leaving")


async def _restore(database: str) -> None:
    """The restore process: open the file, drain the pending results, merge them."""
    from orbiter._internal.background import BackgroundTaskHandler

    merged: dict[str, Any] = {}  # the restored run's state: results merged by task id

    async def merge(task: Any, mode: Any) -> None:
        merged[task.task_id] = task.result  # idempotent by task id
        _emit("wakeup_merged", task_id=task.task_id, mode=mode.value, result=task.result)

    async with BackgroundTaskHandler(database=database) as handler:
        handler.on_merge(merge)
        _emit("restored", pid=os.getpid(), pending=handler.pending_queue.size)
        async for _task in handler.drain_pending():
            pass  # the on_merge callback merged it
        _emit("drained", count=len(merged), pending=handler.pending_queue.size)


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of the demo's child processes (``python -m orbiter.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m orbiter.demo")
    parser.add_argument("role", choices=("host", "restore"))
    parser.add_argument("--db", required=True)
    parser.add_argument("--run-id", default=f"{RUN_PREFIX}manual")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.role == "host":
        asyncio.run(_host(args.db, args.run_id, args.tasks, args.seed))
    else:
        asyncio.run(_restore(args.db))
    return 0


# == the demo file ========================================================================


def default_demo_path() -> Path:
    """``./orbiter-demo.db``, or the temp directory's if the current one is read-only."""
    here = Path.cwd()
    if is_writable(here):  # the handler's own rule (root too respects a 0555 directory)
        return here / DEFAULT_NAME
    return Path(tempfile.gettempdir()) / DEFAULT_NAME


def _companions(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


def _is_demo_database(path: Path) -> bool:
    """Whether ``path`` is an orbiter-background file holding only demo tasks."""
    target = resolve_target(str(path))
    try:
        with open_for_reading(target, check=False) as connection:
            if current_revision(connection) not in KNOWN_REVISIONS:
                return False
            params = {"prefix": RUN_PREFIX}
            return int(connection.execute(q.count_foreign_tasks(), params).scalar_one()) == 0
    except (CliError, OrbiterError, SQLAlchemyError, OSError):
        return False


def prepare_demo_file(path: Path) -> None:
    """Make ``path`` a fresh start: remove an earlier demo file, refuse anything else.

    Raises:
        CliError: if ``path`` exists and is not an orbiter-background demo database.
    """
    if path.is_dir():
        raise CliError(f"{path} is a directory; pass a file path to --db")
    if path.exists():
        if path.stat().st_size > 0 and not _is_demo_database(path):
            raise CliError(
                f"{path} exists and is not an orbiter-background demo database "
                "(it holds other data or is not ours); refusing to delete it: pick another --db"
            )
        path.unlink()
    for companion in _companions(path):
        companion.unlink(missing_ok=True)


# == the parent ===========================================================================


class _Child:
    """A demo child process and a thread that collects its JSON-line reports."""

    def __init__(self, role: str, *args: str) -> None:
        import orbiter

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        source_root = str(Path(orbiter.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orbiter.demo", role, *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def events(self, label: str) -> Iterator[dict[str, Any]]:
        """Yield the child's events until it closes stdout; raise on a long silence."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise CliError(
                        f"demo: no word from the {label} process in {EVENT_TIMEOUT:.0f}s"
                    ) from None
                continue
            if line is None:
                return
            deadline = time.monotonic() + EVENT_TIMEOUT
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event

    def stop(self, grace: float = 0.0) -> None:
        """Let the child exit within ``grace`` seconds, else kill it (any exit path)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass
class _Tally:
    """What the parent saw and found."""

    submitted: list[str] = field(default_factory=list)
    hot: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    reported_queued: int = -1
    pending_at_kill: int = -1
    host_status: int | None = None
    drained: list[str] = field(default_factory=list)
    restore_status: int | None = None
    file_statuses: dict[str, str] = field(default_factory=dict)
    file_modes: dict[str, str | None] = field(default_factory=dict)
    pending_after: int = -1


def _short(task_id: str) -> str:
    return markup_safe(task_id.rsplit("/", 1)[-1])


def _result_text(result: Any) -> str:
    return markup_safe(json.dumps(result, separators=(",", ":")))


def _on_host_event(event: dict[str, Any], console: Console, tally: _Tally) -> bool:
    """Show one host event and count it; True once the host's results are all stored."""
    kind = event.get("event")
    task_id = str(event.get("task_id", ""))
    if kind == "run_started":
        console.print(
            f"[bold]1.[/] host process (pid {int(event['pid'])}) starts run "
            f"[cyan]{markup_safe(event['run_id'])}[/]"
        )
    elif kind == "submitted":
        tally.submitted.append(task_id)
        console.print(f"   submitted {_short(task_id)} (works ~{float(event['delay_s']):.2f}s)")
    elif kind == "hot_merged":
        tally.hot.append(task_id)
        console.print(
            f"   [green]hot-merged[/] {_short(task_id)} -> {_result_text(event['result'])}"
        )
    elif kind == "run_finished":
        still = int(event["still_working"])
        console.print(f"[bold]2.[/] the run finishes; {still} task(s) still working")
    elif kind == "queued":
        tally.queued.append(task_id)
        console.print(f"   [yellow]queued[/] {_short(task_id)} (run finished: wake-up merge later)")
    elif kind == "ready":
        tally.reported_queued = int(event["queued"])
        return True
    return False


def _watch_host(host: _Child, status: Status, console: Console, tally: _Tally) -> None:
    status.update("starting the host process")
    for event in host.events("host"):
        if _on_host_event(event, console, tally):
            return
        finished = len(tally.hot) + len(tally.queued)
        status.update(f"host run: {finished}/{len(tally.submitted)} background tasks finished")
    raise CliError("demo: the host process ended before reporting its results")


def _count_pending(database: str) -> int:
    with open_for_reading(resolve_target(database)) as connection:
        return int(connection.execute(q.count_pending(False)).scalar_one())


def _kill_host(host: _Child, database: str, console: Console, tally: _Tally) -> None:
    tally.pending_at_kill = _count_pending(database)
    pid = host.process.pid
    console.print(
        f"[bold]3.[/] the file holds {tally.pending_at_kill} pending result(s); "
        f"killing the host (pid {pid}) with [bold red]SIGKILL[/]"
    )
    os.kill(pid, signal.SIGKILL)
    tally.host_status = host.process.wait(timeout=10)
    how = "killed by SIGKILL" if tally.host_status == -signal.SIGKILL else "exited"
    console.print(
        f"   host pid {pid} {how} (exit status {tally.host_status}); it never closed the file"
    )


def _on_restore_event(event: dict[str, Any], console: Console, tally: _Tally) -> bool:
    """Show one restore event and count it; True once the drain is over."""
    kind = event.get("event")
    if kind == "restored":
        console.print(
            f"[bold]4.[/] a new process (pid {int(event['pid'])}) opens the file: "
            f"{int(event['pending'])} pending result(s) to drain"
        )
    elif kind == "wakeup_merged":
        task_id = str(event["task_id"])
        tally.drained.append(task_id)
        console.print(
            f"   [magenta]wake-up merged[/] {_short(task_id)} -> {_result_text(event['result'])}"
        )
    return kind == "drained"


def _watch_restore(restore: _Child, status: Status, console: Console, tally: _Tally) -> None:
    status.update("starting a new process to restore")
    for event in restore.events("restore"):
        if _on_restore_event(event, console, tally):
            return
        status.update(f"draining: {len(tally.drained)} result(s) merged")
    raise CliError("demo: the restore process ended before draining")


def _read_back(database: str, run_id: str, tally: _Tally) -> None:
    """Count again from the file itself (read-only)."""
    with open_for_reading(resolve_target(database)) as connection:
        for task_id, status, mode in connection.execute(q.tasks_of_parent(), {"parent": run_id}):
            tally.file_statuses[task_id] = status
            tally.file_modes[task_id] = mode
        tally.pending_after = int(connection.execute(q.count_pending(False)).scalar_one())


def _checks(tally: _Tally) -> list[tuple[str, bool]]:
    submitted = set(tally.submitted)
    merged = set(tally.hot) | set(tally.drained)
    modes = list(tally.file_modes.values())
    return [
        ("the host was killed by SIGKILL", tally.host_status == -signal.SIGKILL),
        (
            "results were queued when it died",
            tally.pending_at_kill == tally.reported_queued == len(tally.queued) > 0,
        ),
        (
            "hot-merged + wake-up merged = submitted",
            len(tally.hot) + len(tally.drained) == len(submitted),
        ),
        (
            "every task merged exactly once",
            merged == submitted and not set(tally.hot) & set(tally.drained),
        ),
        ("every queued result was drained", sorted(tally.queued) == sorted(tally.drained)),
        (
            "the file agrees: all succeeded",
            set(tally.file_statuses) == submitted
            and set(tally.file_statuses.values()) == {"success"},
        ),
        (
            "the file agrees: merge modes",
            modes.count("hot") == len(tally.hot) and modes.count("wakeup") == len(tally.drained),
        ),
        ("nothing left in the pending queue", tally.pending_after == 0),
        ("the new process exited cleanly", tally.restore_status == 0),
    ]


def _summary(tally: _Tally, checks: list[tuple[str, bool]]) -> Table:
    lost = len(tally.submitted) - len(tally.hot) - len(tally.drained)
    table = Table(title="summary", title_justify="left")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("submitted", str(len(tally.submitted)))
    table.add_row("hot-merged while the run was active", str(len(tally.hot)))
    table.add_row("queued after the run finished", str(len(tally.queued)))
    table.add_row("pending in the file at SIGKILL", str(tally.pending_at_kill))
    table.add_row("wake-up merged by the new process", str(len(tally.drained)))
    table.add_row("lost", str(lost), style="bold red" if lost else "bold green")
    table.add_section()
    for name, ok in checks:
        table.add_row(name, "[green]ok[/]" if ok else "[bold red]FAILED[/]")
    return table


def _run_host(
    db: str, run_id: str, tasks: int, seed: int | None, *, status: Status, console: Console
) -> _Tally:
    """Start the host, show its run, kill it with SIGKILL once its results are stored."""
    tally = _Tally()
    args = ["--db", db, "--run-id", run_id, "--tasks", str(tasks)]
    host = _Child("host", *args, *(["--seed", str(seed)] if seed is not None else []))
    try:
        _watch_host(host, status, console, tally)
        _kill_host(host, db, console, tally)
    finally:
        host.stop()
    return tally


def _run_restore(db: str, status: Status, console: Console, tally: _Tally) -> None:
    """Start a new process on the same file and show it drain the pending results."""
    restore = _Child("restore", "--db", db)
    try:
        _watch_restore(restore, status, console, tally)
        restore.stop(grace=10.0)
    finally:
        restore.stop()
    tally.restore_status = restore.process.returncode


def run_demo(database: str | None, *, tasks: int, seed: int | None, console: Console) -> int:
    """Run the whole demonstration; return 0 when every invariant holds, else 1."""
    if not hasattr(signal, "SIGKILL"):
        raise CliError("the demo needs SIGKILL, which this platform does not have")
    path = Path(database).expanduser().resolve() if database else default_demo_path()
    prepare_demo_file(path)
    db = str(path)
    console.print(f"demo database: [bold]{markup_safe(path)}[/] (a fresh file)")
    run_id = f"{RUN_PREFIX}{secrets.token_hex(3)}"
    with Console(stderr=True).status("starting") as status:
        tally = _run_host(db, run_id, tasks, seed, status=status, console=console)
        _run_restore(db, status, console, tally)
    _read_back(db, run_id, tally)
    checks = _checks(tally)
    console.print(_summary(tally, checks))
    ok = all(passed for _, passed in checks)
    verdict = "[bold green]nothing lost[/]" if ok else "[bold red]invariants FAILED[/]"
    console.print(f"{verdict}; inspect the file: orbiter-bg tasks --db {markup_safe(db)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(child_main())
