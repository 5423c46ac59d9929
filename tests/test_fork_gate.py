"""The fork gate (orbiter/store/fork_gate.py): a fork waits for handlers being opened,
an open waits for a fork under way, and an interrupted open never leaves it shut."""

from __future__ import annotations

import sys
import threading
import time
from types import FrameType
from typing import Any

import pytest

from orbiter.store import fork_gate

OPENING_CODE = fork_gate.opening.__wrapped__.__code__  # type: ignore[attr-defined]


def test_a_fork_waits_for_an_open_and_an_open_waits_for_the_fork() -> None:
    entered, leave = threading.Event(), threading.Event()

    def open_slowly() -> None:
        with fork_gate.opening("slow.db"):
            entered.set()
            leave.wait()

    opener = threading.Thread(target=open_slowly)
    opener.start()
    entered.wait()
    # The wait runs out with the open still under way: the fork is told which file.
    fork = object()
    assert fork_gate.wait_for_opens(fork, time.monotonic() + 0.05) == ["slow.db"]
    leave.set()
    opener.join()
    late_open_done = threading.Event()

    def open_during_fork() -> None:
        with fork_gate.opening("late.db"):
            late_open_done.set()

    late = threading.Thread(target=open_during_fork)
    late.start()
    time.sleep(0.05)
    assert not late_open_done.is_set()  # held back while the fork is under way
    fork_gate.after_fork(fork, in_child=False)
    fork_gate.after_fork(fork, in_child=False)  # again: nothing more happens
    late.join()
    assert late_open_done.is_set()
    assert fork_gate.wait_for_opens(fork, time.monotonic()) == []  # none under way now
    fork_gate.after_fork(fork, in_child=False)


def _entering_lines() -> int:
    """How many line events ``opening`` runs on its way in, up to the first line it runs
    a second time (there the ``with`` lets go of its lock, in code no interrupt can reach
    between the statements, so raising there would only test the tracer)."""
    lines: list[int] = []
    done = False

    def record(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal done
        if frame.f_code is OPENING_CODE:
            if event == "line" and not done:
                if frame.f_lineno in lines:
                    done = True
                else:
                    lines.append(frame.f_lineno)
            return record
        return None

    sys.settrace(record)
    try:
        with fork_gate.opening("count.db"):
            sys.settrace(None)
    finally:
        sys.settrace(None)
    return len(lines)


def test_an_interrupt_at_any_line_of_an_open_leaves_the_gate_open() -> None:
    # A KeyboardInterrupt may land between any two lines of the entering part (after
    # the call that records the open, say); a file left recorded would make every later
    # fork wait FORK_WAIT and refuse the file in the child.
    lines = _entering_lines()
    assert lines >= 5
    for target in range(1, lines + 1):
        seen = 0

        def interrupt(frame: FrameType, event: str, arg: Any, target: int = target) -> Any:
            nonlocal seen
            if frame.f_code is OPENING_CODE:
                if event == "line":
                    seen += 1
                    if seen == target:
                        sys.settrace(None)
                        raise KeyboardInterrupt
                return interrupt
            return None

        sys.settrace(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt), fork_gate.opening("interrupted.db"):
                sys.settrace(None)
                raise KeyboardInterrupt  # not reached before the target line
        finally:
            sys.settrace(None)
        fork = object()
        assert fork_gate.wait_for_opens(fork, time.monotonic()) == [], target
        fork_gate.after_fork(fork, in_child=False)
