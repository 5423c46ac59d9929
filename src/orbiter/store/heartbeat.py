"""The heartbeat: a small thread that renews a handler's lease at a fixed interval.

It runs beside the event loop, so a blocked loop does not make a live handler look dead.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from orbiter.errors import HandlerClosedError
from orbiter.store.executor import Db
from orbiter.store.worker import CommitWorker

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """Every ``interval`` seconds, queue ``renew`` on ``worker`` (without waiting for it).

    Holds ``renew`` weakly, so a handler dropped without ``close()`` can still be collected
    (its finalizer then stops this thread).
    """

    def __init__(self, worker: CommitWorker, renew: Callable[[Db], None], interval: float) -> None:
        self._worker = worker
        self._renew = weakref.WeakMethod(renew)
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orbiter-bg-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            renew = self._renew()
            if renew is None:
                return
            try:
                # Nobody waits for it: it takes its turn behind queued writes.
                future = self._worker.submit(renew, relaxed=True, urgent=False)
            except HandlerClosedError:
                return
            del renew
            future.add_done_callback(_log_failure)

    def stop(self) -> None:
        """Stop renewing (the handler is closing)."""
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _log_failure(future: Future[Any]) -> None:
    if future.exception() is not None:
        logger.warning("heartbeat failed: %s", future.exception())
