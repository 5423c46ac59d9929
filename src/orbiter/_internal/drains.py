"""Bookkeeping for drains stopped early: which are still open, and claims to let go.

A drain (``drain_pending``) or restore (``restore_pending``) claims the items it hands
out. One the consumer stops early frees them when Python closes it, which happens a
little later and elsewhere (on its loop, or when the garbage collector frees it); a new
drain of the same handler must not start before that, or it would skip the item the
consumer held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import Iterator

__all__ = ["ClaimHolder", "OpenDrains"]


class OpenDrains:
    """The drains (and restores) of one handler that have not finished closing.

    A drain the consumer stops early (``break``, an exception) frees the items it holds
    when Python closes it: its loop schedules ``aclose()`` a turn or two later (more when
    the consumer's own generators wrap it, and whenever another thread's loop gets to
    it). A new drain first lets the drains that could hold its items finish, so that it
    starts at the item the consumer held. A drain still in use (a concurrent consumer, a
    drain whose loop body starts this one) looks the same, so the wait is bounded:
    ``WAIT_TURNS`` loop turns, then up to ``WAIT_POLLS`` pauses of ``POLL_SECONDS`` (~50
    ms); then the new drain goes ahead and leaves their items to them (one that closes
    later keeps them until it does). Drains of another run (``parent_task_id``) hold none
    of its items and are not waited for, nor are drains on a loop that is not running
    (nothing closes them until it runs again; a drain dropped on a closed loop gives its
    items back when it is collected).

    Entries are added and removed without a lock: a drain dropped in a reference cycle is
    closed by the garbage collector, which may run anywhere, even inside a lock.
    """

    WAIT_TURNS = 20
    WAIT_POLLS = 50
    POLL_SECONDS = 0.001

    def __init__(self) -> None:
        self._tokens = itertools.count()
        #: token -> (its loop, weakly; the run it drains, None for every run)
        self._open: dict[int, tuple[weakref.ref[asyncio.AbstractEventLoop], str | None]] = {}

    @contextlib.contextmanager
    def opened(self, parent_task_id: str | None) -> Iterator[None]:
        """Count a drain as open until its items are freed or acknowledged."""
        token = next(self._tokens)
        self._open[token] = (weakref.ref(asyncio.get_running_loop()), parent_task_id)
        try:
            yield
        finally:
            self._open.pop(token, None)

    async def wait_for_closing(self, parent_task_id: str | None) -> None:
        """Let drains that may hold this drain's items close first (see above)."""
        for attempt in range(self.WAIT_TURNS + self.WAIT_POLLS):
            if not self._may_hold_items_of(parent_task_id):
                return
            await asyncio.sleep(0 if attempt < self.WAIT_TURNS else self.POLL_SECONDS)

    def _may_hold_items_of(self, parent_task_id: str | None) -> bool:
        here = asyncio.get_running_loop()
        # (A copy first: dict.copy() allocates nothing per entry, so nothing changes the
        # dict while it is copied; iterating the live dict could see it change size.)
        for loop_ref, parent in self._open.copy().values():
            if parent is not None and parent_task_id is not None and parent != parent_task_id:
                continue
            loop = loop_ref()
            if loop is not None and (loop is here or loop.is_running()):
                return True
        return False


class ClaimHolder:
    """Lives as long as a restore's frame: collected with it, it lets its claims go."""

    __slots__ = ("__weakref__",)
