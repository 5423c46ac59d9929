"""A process that forks while its handler is open, for tests/test_fork.py.

Usage: forker.py exit|parent-closes|blocked|blocked-open|threads|interrupted-hook DB
       forker.py busy|opening DB FORKS
Prints one JSON document.

* ``exit``: the parent submits a task and forks; the child tries the parent's handler,
  opens one of its own, closes the parent's copy and exits normally (``sys.exit``, so
  ``atexit`` and the handler's finalizer run). Then the parent keeps working, and reports
  its owner row and what another handler's ``recover_orphans`` settles.
* ``parent-closes``: the child opens a handler of its own; the parent then closes its
  handler (the last one open as far as SQLite's locks in the parent show), and the child
  goes on writing, past an automatic checkpoint, and reports what it wrote.
* ``blocked``: another process holds the write lock while a thread's ``submit`` waits
  for it; the main thread forks (the fork's wait cut to 0.2 s), then the lock is let go.
  The commit thread waits between tries with no transaction open, so the fork need not
  wait, and the child opens a handler of its own and writes. ``blocked-open``: the same
  with a new handler's open waiting for the lock (to upgrade an older schema), which
  waits inside a transaction: the child, which inherited a connection in the middle of
  it, must be refused the file.
* ``threads``: 4 threads fork 100 times each at once, switching threads as often as
  Python can; then the handler must still write (no lock left held by a fork).
* ``busy``: a thread keeps the parent's handler writing while the parent forks FORKS
  times; each child closes its copy and opens a handler of its own on the same file.
  A child stuck on a lock its parent held at the fork is killed after 10 s.
* ``interrupted-hook``: a KeyboardInterrupt is raised as the after-fork hook in the
  parent begins (where one that arrived during the fork is handled); then the parent's
  handler must still write, and a new handler open.
* ``opening``: a thread keeps opening and closing handlers on the file while the parent
  forks FORKS times; each child opens a handler of its own and writes once, waits until
  the parent has closed everything, then writes 5 more (killed if stuck for 10 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

from orbiter._internal.background import BackgroundTaskError, BackgroundTaskHandler
from orbiter.store.schema import KNOWN_REVISIONS


def child_uses_copy_then_own(handler: BackgroundTaskHandler, database: str, tag: str) -> str:
    """In a forked child: what the parent's handler says, then a handler of its own."""
    try:
        handler.submit(f"copy-{tag}", "run")
        said = "the copy wrote"
    except BackgroundTaskError as exc:
        said = str(exc)
    with BackgroundTaskHandler(database=database) as own:
        own.submit(f"child-{tag}", "run")
        own.handle_error(f"child-{tag}", "finished (no orphan left behind)")
    handler.close()
    return said


def exit_normally(database: str) -> None:
    handler = BackgroundTaskHandler(database=database)
    handler.submit("work", "run")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        said = child_uses_copy_then_own(handler, database, "0")
        os.write(write_end, said.encode())
        sys.exit(0)  # a normal exit: atexit and finalizers run
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_said = pipe.read()
    _, status = os.waitpid(pid, 0)
    handler.submit("after", "run")
    asyncio.run(handler.handle_result("work", {"done": True}, is_main_running=False))
    with sqlite3.connect(database) as connection:
        owner_open = connection.execute(
            "SELECT closed_at IS NULL FROM owners WHERE pid = ?", (os.getpid(),)
        ).fetchone()
    handler.submit("still-running", "run")
    with BackgroundTaskHandler(database=database) as other:
        settled = asyncio.run(other.recover_orphans("fail"))
    report = {
        "child_status": os.waitstatus_to_exitcode(status),
        "child_said": child_said,
        "parent_owner_open": bool(owner_open and owner_open[0]),
        "settled": [task.task_id for task in settled],
        "work": handler.get_task("work").status.value,  # type: ignore[union-attr]
    }
    handler.close()
    print(json.dumps(report))


def parent_closes_first(database: str) -> None:
    handler = BackgroundTaskHandler(database=database)
    handler.submit("parent", "run")
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        own = BackgroundTaskHandler(database=database, synchronous="NORMAL")
        own.submit("child-first", "run")
        os.write(to_parent_w, b"opened")
        os.read(to_child_r, 1)  # the parent has closed its handler
        for index in range(CHILD_WRITES):
            own.submit(f"child-{index}", "run", payload="x" * 300)
        own.close()
        os._exit(0)
    os.read(to_parent_r, 6)
    handler.handle_error("parent", "closing")
    handler.close()
    os.write(to_child_w, b"x")
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child_status": os.waitstatus_to_exitcode(status)}))


#: Holds SQLite's write lock on the file argv[1] until its stdin closes.
LOCKER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
connection.execute("ROLLBACK")
"""


def fork_while_blocked(database: str, waiting: str) -> None:
    from orbiter.store import worker as worker_module

    handler = BackgroundTaskHandler(database=database)
    opened: list[BackgroundTaskHandler] = []
    if waiting == "open":
        # An older schema: the open waits for the lock in its upgrade, before it has a
        # commit worker whose lock the fork could take.
        handler.close()
        from orbiter import migrate

        migrate.downgrade(database, KNOWN_REVISIONS[-2])
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, database],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout is not None and locker.stdin is not None
    locker.stdout.readline()
    if waiting == "submit":
        blocked = threading.Thread(target=handler.submit, args=("blocked", "run"))
    else:
        blocked = threading.Thread(
            target=lambda: opened.append(BackgroundTaskHandler(database=database))
        )
    blocked.start()
    time.sleep(0.3)  # the submit or open now waits inside its transaction for the lock
    worker_module.FORK_WAIT = 0.2
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        locker.stdin.close()  # the child's copy, or the locker would never see the end
        try:
            with BackgroundTaskHandler(database=database) as own:
                own.submit("child-task", "run")
            said = "opened"
        except BackgroundTaskError as exc:
            said = str(exc)
        os.write(write_end, said.encode())
        os._exit(0)
    fork_seconds = time.monotonic() - started
    if waiting == "submit":
        locker.stdin.close()  # the child's own writes wait for it, as any process's do
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_said = pipe.read()
    os.waitpid(pid, 0)
    if not locker.stdin.closed:
        locker.stdin.close()
    locker.wait()
    blocked.join()
    report = {
        "fork_seconds": fork_seconds,
        "child_said": child_said,
        "blocked_stored": len(opened) == 1 or handler.get_task("blocked") is not None,
    }
    for other in opened:
        other.close()
    handler.close()
    print(json.dumps(report))


def fork_from_threads(database: str) -> None:
    handler = BackgroundTaskHandler(database=database)
    slow: list[float] = []

    def fork_some() -> None:
        for _ in range(100):
            started = time.monotonic()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            if (took := time.monotonic() - started) > 1:
                slow.append(took)
            os.waitpid(pid, 0)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=fork_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sys.setswitchinterval(old_interval)
    written: list[bool] = []
    after = threading.Thread(
        target=lambda: written.append(handler.submit("after", "run") is not None), daemon=True
    )
    after.start()
    after.join(10)
    print(json.dumps({"slow_forks": slow, "wrote_after": written == [True]}))
    os._exit(0)  # a write that never returned would keep a normal exit waiting


#: Enough ~300-byte submits to pass SQLite's automatic checkpoint (1,000 log pages).
CHILD_WRITES = 1500


def fork_while_busy(database: str, forks: int) -> None:
    handler = BackgroundTaskHandler(database=database)
    stop = threading.Event()

    def keep_writing() -> None:
        index = 0
        while not stop.is_set():
            handler.submit(f"w{index}", "run")
            index += 1
            # SQLite's busy wait polls rather than queues: a writer that takes the lock
            # again at once can starve the child's writes past wait_or_kill's 10 s (as if
            # it hung). A pause between writes still lands forks mid-write (~1 in 3).
            time.sleep(0.001)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    statuses = []
    for number in range(forks):
        time.sleep(0.002 * (number % 5))  # land the forks at varied points of a write
        pid = os.fork()
        if pid == 0:
            child_uses_copy_then_own(handler, database, str(number))
            os._exit(0)
        statuses.append(wait_or_kill(pid, 10))
    stop.set()
    writer.join()
    written = len(handler.list_tasks())
    handler.close()
    print(json.dumps({"statuses": statuses, "parent_tasks": written}))


def fork_with_interrupted_hook(database: str) -> None:
    from orbiter.store import worker as worker_module

    handler = BackgroundTaskHandler(database=database)
    hook = worker_module._after_fork_in_parent.__code__

    def interrupt_first_call(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is hook:
            sys.settrace(None)
            raise KeyboardInterrupt
        return None

    sys.settrace(interrupt_first_call)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    sys.settrace(None)
    os.waitpid(pid, 0)

    def returns(action: Any) -> bool:
        thread = threading.Thread(target=action, daemon=True)
        thread.start()
        thread.join(10)
        return not thread.is_alive()

    report = {
        "submit": returns(lambda: handler.submit("after-fork", "run")),
        "open": returns(lambda: BackgroundTaskHandler(database=database).close()),
    }
    print(json.dumps(report), flush=True)
    os._exit(0)


def wait_or_kill(pid: int, seconds: float) -> int:
    """The child's exit code; -9 if it was still running after ``seconds`` (killed)."""
    deadline = time.monotonic() + seconds
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.005)
    return os.waitstatus_to_exitcode(done[1])


def fork_while_opening(database: str, forks: int) -> None:
    with BackgroundTaskHandler(database=database) as first:
        first.submit("setup", "run")
    stop = threading.Event()

    def keep_opening() -> None:
        while not stop.is_set():
            BackgroundTaskHandler(database=database).close()

    opener = threading.Thread(target=keep_opening)
    opener.start()
    children: list[tuple[int, int]] = []
    for number in range(forks):
        time.sleep(0.003 * (number % 7))  # land the forks at varied points of an open
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_write)
            own = BackgroundTaskHandler(database=database)
            own.submit(f"c{number}-0", "run")
            os.read(go_read, 1)  # the parent has closed every handler of its own
            for index in range(1, 6):
                own.submit(f"c{number}-{index}", "run")
            own.close()
            os._exit(0)
        os.close(go_read)
        children.append((pid, go_write))
    stop.set()
    opener.join()
    for _, go_write in children:
        os.write(go_write, b"g")
        os.close(go_write)
    statuses = [wait_or_kill(pid, 10) for pid, _ in children]
    print(json.dumps({"statuses": statuses}))


if __name__ == "__main__":
    if sys.argv[1] == "exit":
        exit_normally(sys.argv[2])
    elif sys.argv[1] == "parent-closes":
        parent_closes_first(sys.argv[2])
    elif sys.argv[1] == "blocked":
        fork_while_blocked(sys.argv[2], "submit")
    elif sys.argv[1] == "blocked-open":
        fork_while_blocked(sys.argv[2], "open")
    elif sys.argv[1] == "threads":
        fork_from_threads(sys.argv[2])
    elif sys.argv[1] == "interrupted-hook":
        fork_with_interrupted_hook(sys.argv[2])
    elif sys.argv[1] == "opening":
        fork_while_opening(sys.argv[2], int(sys.argv[3]))
    else:
        fork_while_busy(sys.argv[2], int(sys.argv[3]))
