"""A change counter that any thread may bump and any event loop may await.

``asyncio.Event`` binds to one loop; the spec's example drives one handler from several
``asyncio.run`` calls, and durable writes finish on a worker thread, so the pending queue
needs a wake-up that works across loops and threads.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["Signal"]


class Signal:
    """Counts notifications; waiters wake when the count moves past the one they saw."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def version(self) -> int:
        """How many times :meth:`notify` has been called."""
        return self._version

    def notify(self) -> None:
        """Bump the count and wake every waiter, whichever loop or thread it waits on."""
        with self._lock:
            self._version += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)

    async def wait_for_change(self, seen: int, timeout: float | None) -> bool:
        """Wait until the count differs from ``seen``; False if ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._version != seen:
                return True
            future: asyncio.Future[None] = loop.create_future()
            entry = (loop, future)
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return self._version != seen
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
