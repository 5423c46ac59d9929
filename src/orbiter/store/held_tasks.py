"""The task objects a handler has handed out, by id, for as long as someone holds them.

``submit``/``get_task`` return the same object for an id while the caller keeps it, and
the handler updates that object when the task finishes; so the store maps ids to its
objects weakly. :class:`weakref.WeakValueDictionary` does that, but each new entry costs
~0.9 us in Python (a keyed reference and a removal callback that runs when the object
dies, another ~0.5 us), and a drain makes one entry per item. Here an entry is a plain
weak reference (~0.1 us, made in C), and dead ones are swept once the map has doubled
since the last sweep, with the atomic "remove if still dead" that WeakValueDictionary
itself uses.
"""

from __future__ import annotations

import weakref
from _weakref import _remove_dead_weakref  # type: ignore[attr-defined]  # as WeakValueDictionary

from orbiter._internal.task import BackgroundTask

__all__ = ["HeldTasks"]

#: Entries below which the map is never swept (sweeping a small map often buys nothing).
_MIN_SWEEP = 1024


class HeldTasks:
    """``task_id`` -> the live :class:`BackgroundTask` this handler handed out.

    Safe to use from several threads as the dict operations it is made of are: a sweep
    works on a copy and removes an entry only if it still holds a dead reference.
    """

    def __init__(self) -> None:
        self._refs: dict[str, weakref.ref[BackgroundTask]] = {}
        self._sweep_at = _MIN_SWEEP

    def get(self, task_id: str) -> BackgroundTask | None:
        """The object held for ``task_id``, or None if none is (or it was collected)."""
        ref = self._refs.get(task_id)
        return None if ref is None else ref()

    def __setitem__(self, task_id: str, task: BackgroundTask) -> None:
        self._refs[task_id] = weakref.ref(task)
        if len(self._refs) >= self._sweep_at:
            self._sweep()

    def setdefault(self, task_id: str, task: BackgroundTask) -> BackgroundTask:
        """The object held for ``task_id``; ``task``, now held, if there was none."""
        held = self.get(task_id)
        if held is not None:
            return held
        self[task_id] = task
        return task

    def __len__(self) -> int:
        """Entries, counting dead ones not swept yet."""
        return len(self._refs)

    def _sweep(self) -> None:
        # dict.copy() allocates nothing per entry, so no garbage collection (and no other
        # thread) runs while it copies; iterating the live dict could see it change size.
        for task_id, ref in self._refs.copy().items():
            if ref() is None:
                _remove_dead_weakref(self._refs, task_id)
        self._sweep_at = max(_MIN_SWEEP, 2 * len(self._refs))
