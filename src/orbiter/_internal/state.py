"""Run state tracking: the small part of orbiter's run model the handler touches.

A handler given ``state=`` records each background task as a :class:`RunNode` named
``"bg:<task_id>"``: RUNNING on submit, SUCCESS on its result, FAILED on its error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["RunNode", "RunNodeStatus", "RunState"]

logger = logging.getLogger(__name__)


class RunNodeStatus(StrEnum):
    """Status of an execution node (an agent step, a tool call, a background task)."""

    INIT = "init"  # created, not started
    RUNNING = "running"  # started, no outcome yet
    SUCCESS = "success"  # finished with a result
    FAILED = "failed"  # finished with an error
    TIMEOUT = "timeout"  # gave up waiting for an outcome


#: Statuses after which a node or task never changes again.
TERMINAL_STATUSES = frozenset({RunNodeStatus.SUCCESS, RunNodeStatus.FAILED, RunNodeStatus.TIMEOUT})


@dataclass
class RunNode:
    """One step of a run, with its timing and outcome."""

    agent_name: str
    step_index: int = 0
    status: RunNodeStatus = RunNodeStatus.INIT
    group_id: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict[str, Any])

    def start(self) -> None:
        """Transition to RUNNING."""
        self.status = RunNodeStatus.RUNNING
        self.started_at = time.time()

    def succeed(self) -> None:
        """Transition to SUCCESS."""
        self.status = RunNodeStatus.SUCCESS
        self.ended_at = time.time()

    def fail(self, error: str) -> None:
        """Transition to FAILED with an error message."""
        self.status = RunNodeStatus.FAILED
        self.ended_at = time.time()
        self.error = error

    def timeout(self) -> None:
        """Transition to TIMEOUT."""
        self.status = RunNodeStatus.TIMEOUT
        self.ended_at = time.time()

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, or None while unfinished."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at


class RunState:
    """Mutable state of one run: its nodes, most recent last.

    Args:
        agent_name: Name of the run's agent; the default name of new nodes.
        max_nodes: How many nodes to keep; the oldest are dropped beyond it.
    """

    DEFAULT_MAX_NODES: int = 500

    def __init__(self, agent_name: str, *, max_nodes: int = DEFAULT_MAX_NODES) -> None:
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be at least 1, got {max_nodes}")
        self.agent_name = agent_name
        self.status = RunNodeStatus.INIT
        self.nodes: list[RunNode] = []
        self.iterations = 0
        self._max_nodes = max_nodes

    def new_node(self, agent_name: str | None = None, group_id: str | None = None) -> RunNode:
        """Create, record and return a new node (named after the run's agent by default)."""
        node = RunNode(
            agent_name=agent_name or self.agent_name,
            step_index=self.iterations,
            group_id=group_id,
        )
        self.nodes.append(node)
        self.iterations += 1
        if len(self.nodes) > self._max_nodes:
            del self.nodes[: len(self.nodes) - self._max_nodes]
        return node

    def find_node(self, agent_name: str) -> RunNode | None:
        """Return the most recent node with this name, or None."""
        for node in reversed(self.nodes):
            if node.agent_name == agent_name:
                return node
        return None

    @property
    def current_node(self) -> RunNode | None:
        """The most recently created node, or None."""
        return self.nodes[-1] if self.nodes else None
