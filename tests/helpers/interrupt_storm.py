"""A child process that makes sync calls on a handler under a storm of real SIGINTs.

Usage: interrupt_storm.py DB SECONDS MODE

MODE ``queued``: another thread holds the handler's connection (standing in for a long
batch), so every write queues for the commit thread and waits, and every read goes to
the second connection. MODE ``inline``: another thread writes too, so calls run inline
or queue by turns. Each KeyboardInterrupt is caught and the calls go on. After each one,
no lock of the handler may stay held by nobody. At the end (the held connection let go)
a submit() from a new thread and close() must return. Prints one JSON line.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType

from orbiter._internal.background import BackgroundTaskHandler

db, seconds, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
faulthandler.dump_traceback_later(seconds + 60, exit=True)  # a hang shows its stacks
handler = BackgroundTaskHandler(database=db, synchronous="NORMAL")
worker = handler._store._worker  # type: ignore[attr-defined]
locks = {"queue": worker._lock, "reader": worker._reader_lock}
release = threading.Event()
if mode == "queued":
    held = threading.Event()

    def hold_connection() -> None:
        with worker._connection_lock:
            held.set()
            release.wait()

    threading.Thread(target=hold_connection, daemon=True).start()
    held.wait()
else:

    def other_writer() -> None:
        count = 0
        while not release.is_set():
            handler.submit(f"other-{count}", "run")
            count += 1

    threading.Thread(target=other_writer, daemon=True).start()

armed = False


def on_sigint(signum: int, frame: FrameType | None) -> None:
    if armed:
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, on_sigint)
sender = subprocess.Popen(
    [
        sys.executable,
        "-c",
        "import os, random, sys, time\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        os.kill({os.getpid()}, 2)\n"
        "    except ProcessLookupError:\n"
        "        sys.exit()\n"
        "    time.sleep(random.uniform(0.00005, 0.0003))\n",
    ]
)


def left_held() -> str | None:
    """The name of a lock nobody should hold now, if one stays held."""
    for name, lock in locks.items():
        # Held all along for a quarter of a second: another thread holds it only briefly.
        for _ in range(5):
            if not lock.locked():
                break
            time.sleep(0.05)
        else:
            return name
    return None


# The storm ends with the held connection let go, so a call left waiting returns.
threading.Timer(seconds, release.set).start()
interrupts = calls = 0
leaked = None
while not release.is_set() and leaked is None:
    armed = True
    try:
        if calls % 4 == 3:
            handler.get_task(f"t{calls - 1}")
        else:
            handler.submit(f"t{calls}", "run")
    except KeyboardInterrupt:
        armed = False
        interrupts += 1
        if mode == "queued" or calls % 16 == 0:
            leaked = left_held()
    armed = False
    calls += 1
sender.kill()
sender.wait()
signal.signal(signal.SIGINT, signal.SIG_IGN)
release.set()


def returns(action: object) -> bool:
    thread = threading.Thread(target=action, daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(10)
    return not thread.is_alive()


report = {
    "interrupts": interrupts,
    "calls": calls,
    "leaked": leaked,
    "submit_after": returns(lambda: handler.submit("after", "run")),
    "close": returns(handler.close),
}
print(json.dumps(report), flush=True)
os._exit(0)
