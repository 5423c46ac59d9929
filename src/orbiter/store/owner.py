"""Who a handler is, its ``owners`` row, and whether the handler behind a row is alive.

Each durable handler registers one ``owners`` row (host, boot id, pid, process start time,
a random id) and renews its lease with a heartbeat. Another handler decides that an owner
is gone when that is provable (same host and boot: its pid is not running, or is running
but is a different process) or when its lease has expired (any host). The functions that
take a ``db`` are operations for the commit worker.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from orbiter.store import queries
from orbiter.store.codec import TIMESTAMP_FORMAT, utc_now_text
from orbiter.store.executor import Db

__all__ = [
    "OwnerIdentity",
    "close_owner",
    "forget_owner_if_unused",
    "owner_gone_reason",
    "owner_rows",
    "record_heartbeat",
]


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot of the machine (Linux), so pids from before a reboot are known dead."""
    return _read("/proc/sys/kernel/random/boot_id")


def process_state(pid: int) -> tuple[str, str] | None:
    """``(state letter, start time in clock ticks)`` of a process (Linux), or None."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may contain spaces
    return fields[0], fields[19]


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    state = process_state(pid)
    return state is None or state[0] not in ("Z", "X")


@dataclass(frozen=True)
class OwnerIdentity:
    """The identity a handler records in ``owners`` and on every task it submits."""

    owner_id: str
    host: str
    boot_id: str | None
    pid: int
    process_start: str | None

    @classmethod
    def of_this_process(cls) -> OwnerIdentity:
        """A fresh identity for a handler opened in this process."""
        pid = os.getpid()
        state = process_state(pid)
        return cls(
            owner_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            boot_id=boot_id(),
            pid=pid,
            process_start=state[1] if state else None,
        )

    def as_row(self) -> dict[str, Any]:
        """The identity columns of an ``owners`` row."""
        return {
            "owner_id": self.owner_id,
            "host": self.host,
            "boot_id": self.boot_id,
            "pid": self.pid,
            "process_start": self.process_start,
        }


def owner_gone_reason(row: Mapping[str, Any] | None, me: OwnerIdentity, now: str) -> str | None:
    """Why the owner described by an ``owners`` row is gone, or None if it may be alive.

    Args:
        row: The owner's row (``owners`` columns by name), or None if there is none.
        me: This handler's identity (tells which host we can check pids on).
        now: The current time as stored text.
    """
    if row is None:
        return "owner unknown (no heartbeat row)"
    if row["owner_id"] == me.owner_id:
        return None
    if row["closed_at"] is not None:
        return f"owner {row['host']}:{row['pid']} closed its handler"
    if row["host"] == me.host and row["boot_id"] is not None and row["boot_id"] == me.boot_id:
        if not pid_running(row["pid"]):
            return f"owner process {row['host']}:{row['pid']} exited"
        state = process_state(row["pid"])
        if row["process_start"] is not None and state is not None:
            if state[1] != row["process_start"]:
                return f"owner process {row['host']}:{row['pid']} exited (its pid was reused)"
            return None  # provably the same live process, even if late with its lease
    if row["lease_expires_at"] < now:
        return f"owner {row['host']}:{row['pid']} stopped renewing its lease"
    return None


# -- the owners table ---------------------------------------------------------------


def owner_rows(db: Db) -> dict[str, dict[str, Any]]:
    """Every ``owners`` row, by owner id."""
    return {row["owner_id"]: row for row in db.mappings(queries.select_owners())}


def record_heartbeat(me: OwnerIdentity, lease_timeout: float, db: Db) -> None:
    """Register ``me``, or renew its lease: alive for ``lease_timeout`` seconds from now."""
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=lease_timeout)
    db.execute(
        queries.record_heartbeat(),
        {
            **me.as_row(),
            "now": now.strftime(TIMESTAMP_FORMAT),
            "lease_expires_at": expires.strftime(TIMESTAMP_FORMAT),
        },
    )


def close_owner(owner_id: str, db: Db) -> None:
    """Mark the owner closed: its running tasks are orphans any process may settle."""
    db.execute(queries.close_owner(), {"id": owner_id, "now": utc_now_text()})


def forget_owner_if_unused(db: Db, owner_id: str) -> None:
    """Delete a gone owner's row (and free its drains' items) once no task is active."""
    if not db.scalar(queries.owner_has_active_tasks(), {"id": owner_id}):
        db.execute(queries.release_claims_of_owner(), {"prefix": owner_id + "/%"})
        db.execute(queries.delete_owner(), {"id": owner_id})
