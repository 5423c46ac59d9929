"""The value types of the reference API: :class:`BackgroundTask` and :class:`MergeMode`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from orbiter._internal.state import RunNodeStatus

__all__ = ["BackgroundTask", "MergeMode"]

# Reading an enum member off its class costs ~70 ns on Python 3.11 (a module constant ~6):
# code that runs on every call uses module constants like these (and HOT/WAKEUP below).
_INIT, _RUNNING = RunNodeStatus.INIT, RunNodeStatus.RUNNING
_SUCCESS, _FAILED = RunNodeStatus.SUCCESS, RunNodeStatus.FAILED


class MergeMode(StrEnum):
    """How background results are merged into the main execution."""

    HOT = "hot"  # merged directly into the active execution state
    WAKEUP = "wakeup"  # queued for later retrieval (main task already completed)


#: The merge modes as module constants, for per-call paths (see above).
HOT, WAKEUP = MergeMode.HOT, MergeMode.WAKEUP


class BackgroundTask:
    """Tracks a single background task's lifecycle.

    Args:
        task_id: Unique identifier for this task.
        parent_task_id: The task that spawned this background task.
        payload: Arbitrary data associated with the task.
    """

    def __init__(self, task_id: str, parent_task_id: str, *, payload: Any = None) -> None:
        self.task_id = task_id
        self.parent_task_id = parent_task_id
        self.payload = payload
        self.result: Any = None
        self.error: str | None = None
        self.status: RunNodeStatus = _INIT
        self.merge_mode: MergeMode | None = None

    def start(self) -> None:
        """Mark task as running (transitions to RUNNING)."""
        self.status = _RUNNING

    def complete(self, result: Any) -> None:
        """Mark task as successfully completed with a result (transitions to SUCCESS)."""
        self.status = _SUCCESS
        self.result = result

    def fail(self, error: str) -> None:
        """Mark task as failed with an error message (transitions to FAILED)."""
        self.status = _FAILED
        self.error = error

    @property
    def is_complete(self) -> bool:
        """Whether the task has reached a terminal state (SUCCESS or FAILED)."""
        return self.status in (_SUCCESS, _FAILED)

    def __repr__(self) -> str:
        mode = self.merge_mode.value if self.merge_mode is not None else None
        return (
            f"BackgroundTask(task_id={self.task_id!r}, parent_task_id={self.parent_task_id!r}, "
            f"status={self.status.value!r}, merge_mode={mode!r})"
        )
