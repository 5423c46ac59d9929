"""orbiter-background: a durable background-task handler for agent hosts.

The public API lives in :mod:`orbiter._internal.background` (the reference module's
names, kept name for name); this package root re-exports it for convenience.
"""

from __future__ import annotations

from orbiter._internal.background import (
    BackgroundTask,
    BackgroundTaskError,
    BackgroundTaskHandler,
    MergeMode,
    PendingQueue,
)

__all__ = [
    "BackgroundTask",
    "BackgroundTaskError",
    "BackgroundTaskHandler",
    "MergeMode",
    "PendingQueue",
]
