"""Lets a fork wait until no handler is being opened in another thread.

Opening a handler makes short-lived connections (the guard, the schema check) and many
SQLite calls. A process forked in the middle of them gets copies it can neither use nor
safely close: SQLite's global mutexes (its memory allocator's, say) may be copied held,
so the child hangs in its first SQLite call, and a copied connection shares SQLite's
per-process record of the file with the child's own, so the child's writes can be lost
when the parent closes. The commit worker's fork hook (see ``worker.py``) therefore
first calls :func:`wait_for_opens`, which keeps new opens from starting and waits for
those under way, and after the fork :func:`after_fork` lets opens go on.

Everything here takes its lock by ``with`` on a bare lock and waits by polling, so a
KeyboardInterrupt cannot leave the gate shut for good.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["after_fork", "opening", "wait_for_opens"]

#: Seconds between looks while an open waits for a fork, or a fork for opens.
_POLL = 0.001

_lock = threading.Lock()  # guards the two below
_opening: dict[object, str] = {}  # the files of the handlers being opened now, by open
_forks: set[object] = set()  # forks waiting for them (or under way)


@contextmanager
def opening(file: str) -> Iterator[None]:
    """Hold the gate open while a handler opens ``file`` (waits while a fork is under
    way)."""
    me = object()
    try:
        while True:
            with _lock:
                if not _forks:
                    # A store, not a call: an interrupt cannot land between it and the try.
                    _opening[me] = file
                    break
            time.sleep(_POLL)
        yield
    finally:
        with _lock:
            _opening.pop(me, None)  # also when never entered, or cleared in a forked child


def wait_for_opens(fork: object, deadline: float) -> list[str]:
    """Keep new opens from starting until :func:`after_fork` is called with the same
    ``fork`` (any object, one per fork), and wait until none is under way or until
    ``deadline`` (a ``time.monotonic()``). Returns the files still being opened then
    (none, unless the wait ran out)."""
    with _lock:
        _forks.add(fork)
    while True:
        with _lock:
            if not _opening or time.monotonic() >= deadline:
                return list(_opening.values())
        time.sleep(_POLL)


def after_fork(fork: object, *, in_child: bool) -> None:
    """Let opens go on after ``fork`` (see :func:`wait_for_opens`); calling it again, or
    for a fork that did not wait, does nothing."""
    global _lock  # noqa: PLW0603 - the process-wide lock
    if in_child:
        # Only the forking thread lives on here: nobody else is opening, and the lock
        # may have been copied held by a thread that is gone.
        _lock = threading.Lock()
        _opening.clear()
        _forks.clear()
        return
    with _lock:
        _forks.discard(fork)
