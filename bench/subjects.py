"""Everything the workloads run against, behind one small async interface.

A subject maps the spec's calls onto an implementation: ``submit`` (register a task),
``complete`` (a wake-up ``handle_result``: the result is queued), ``drain`` (consume
every queued result) and ``flush`` (commit anything a batching subject still holds). Each
call of a durable subject is durable on return unless the subject batches on purpose.
See README.md for how each peer library is mapped and how its durability is matched.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

from common import PARENT
from dictlist import DictListHandler
from stdlib_baseline import StdlibStore

#: The database file (or directory, for persist-queue) inside a case's fresh directory.
DB_NAME = "bench.db"

#: Durable subjects that use the handler's schema (prepared by ``prepare.py`` in bulk).
HANDLER_SCHEMA = ("orbiter", "stdlib-percall", "stdlib-batch", "stdlib-drain", "stdlib-ack")
#: Peer libraries from PyPI.
PEERS = ("persist-queue", "huey", "litequeue", "langgraph")
#: In-memory subjects (no file, no ``synchronous``).
MEMORY = ("orbiter-memory", "dict-list")


class Subject(Protocol):
    """The calls every workload is written against."""

    async def submit(self, task_id: str, payload: Any) -> None:
        """Register a task (durable on return)."""
        ...

    async def complete(self, task_id: str, result: Any) -> None:
        """Record a result for a wake-up merge (durable on return)."""
        ...

    async def drain(self) -> int:
        """Consume every queued result; return how many."""
        ...

    async def flush(self) -> None:
        """Commit anything still held (batching subjects only)."""
        ...

    async def close(self) -> None:
        """Release everything."""
        ...


class HandlerSubject:
    """``orbiter``'s BackgroundTaskHandler, durable (a file) or in memory (None)."""

    #: The spec's API: a BackgroundTaskHandler, or the dict-and-list stand-in.
    handler: Any

    def __init__(self, path: Path | None, synchronous: str) -> None:
        from orbiter._internal.background import BackgroundTaskHandler

        if path is None:
            self.handler = BackgroundTaskHandler()
        else:
            self.handler = BackgroundTaskHandler(database=path, synchronous=synchronous)

    async def submit(self, task_id: str, payload: Any) -> None:
        self.handler.submit(task_id, PARENT, payload=payload)

    async def complete(self, task_id: str, result: Any) -> None:
        await self.handler.handle_result(task_id, result, is_main_running=False)

    async def drain(self) -> int:
        count = 0
        async for _task in self.handler.drain_pending():
            count += 1
        return count

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        await self.handler.aclose()


class DictListSubject(HandlerSubject):
    """The plain dict-and-list implementation of the spec (the in-memory bar), driven
    exactly like the handler."""

    def __init__(self) -> None:
        self.handler = DictListHandler()

    async def close(self) -> None:
        return None


class StdlibSubject:
    """Bare ``sqlite3`` with the handler's SQL (see ``stdlib_baseline.py``); drains all
    in one transaction, or (``ack_each``) with one commit per item."""

    def __init__(
        self, path: Path, synchronous: str, ops_per_commit: int, ack_each: bool = False
    ) -> None:
        self.store = StdlibStore(path, synchronous, ops_per_commit)
        self.ack_each = ack_each

    async def submit(self, task_id: str, payload: Any) -> None:
        self.store.submit(task_id, PARENT, payload)

    async def complete(self, task_id: str, result: Any) -> None:
        self.store.complete(task_id, result)

    async def drain(self) -> int:
        return self.store.drain_acking_each() if self.ack_each else self.store.drain_all()

    async def flush(self) -> None:
        self.store.flush()

    async def close(self) -> None:
        self.store.close()


def _set_synchronous(connection: Any, synchronous: str) -> None:
    connection.execute(f"PRAGMA synchronous={synchronous}")


class PersistQueueSubject:
    """persist-queue's ``SQLiteAckQueue``: a task queue and a results queue in one file.

    submit = ``tasks.put``; complete = ``results.put`` (one commit each); drain =
    ``results.get`` + ``results.ack`` per item (its at-least-once protocol: two commits).
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        from persistqueue import SQLiteAckQueue
        from persistqueue.serializers import json as json_serializer

        def queue(name: str) -> Any:
            return SQLiteAckQueue(
                str(path),
                name=name,
                db_file_name="data.db",
                auto_resume=False,
                serializer=json_serializer,
            )

        self.tasks = queue("tasks")
        self.results = queue("results")
        for q in (self.tasks, self.results):
            _set_synchronous(q._putter, synchronous)
            _set_synchronous(q._getter, synchronous)

    async def submit(self, task_id: str, payload: Any) -> None:
        self.tasks.put({"task_id": task_id, "parent": PARENT, "payload": payload})

    async def complete(self, task_id: str, result: Any) -> None:
        self.results.put({"task_id": task_id, "result": result})

    async def drain(self) -> int:
        from persistqueue.exceptions import Empty

        count = 0
        while True:
            try:
                item = self.results.get(block=False)
            except Empty:
                return count
            self.results.ack(item)
            count += 1

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        self.tasks.close()
        self.results.close()


class HueySubject:
    """huey's ``SqliteStorage``: a task queue and a results queue in one file.

    submit = ``tasks.enqueue``; complete = ``results.enqueue`` (one commit each); drain =
    ``results.dequeue`` until empty (select + delete, one commit per item).
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        from huey.storage import SqliteStorage

        fsync = {"FULL": True, "OFF": False}.get(synchronous)

        def storage(name: str) -> Any:
            return SqliteStorage(name=name, filename=str(path), fsync=fsync)

        self.tasks = storage("tasks")
        self.results = storage("results")
        if synchronous == "NORMAL":  # huey's fsync= knows only FULL (True) and OFF (False)
            for s in (self.tasks, self.results):
                _set_synchronous(s.conn, synchronous)

    async def submit(self, task_id: str, payload: Any) -> None:
        data = {"task_id": task_id, "parent": PARENT, "payload": payload}
        self.tasks.enqueue(json.dumps(data).encode())

    async def complete(self, task_id: str, result: Any) -> None:
        self.results.enqueue(json.dumps({"task_id": task_id, "result": result}).encode())

    async def drain(self) -> int:
        count = 0
        while (data := self.results.dequeue()) is not None:
            json.loads(bytes(data))
            count += 1
        return count

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        self.tasks.close()
        self.results.close()


class LiteQueueSubject:
    """litequeue's ``LiteQueue``: a task queue and a results queue on one connection.

    submit = ``tasks.put``; complete = ``results.put`` (autocommit: one commit each);
    drain = ``results.pop`` + ``results.done`` per item (two commits).
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        from litequeue import LiteQueue

        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.tasks = LiteQueue(self.connection, queue_name="tasks")
        self.results = LiteQueue(self.connection, queue_name="results")
        # LiteQueue sets synchronous=NORMAL itself; put the run's level back.
        _set_synchronous(self.connection, synchronous)

    async def submit(self, task_id: str, payload: Any) -> None:
        self.tasks.put(json.dumps({"task_id": task_id, "parent": PARENT, "payload": payload}))

    async def complete(self, task_id: str, result: Any) -> None:
        self.results.put(json.dumps({"task_id": task_id, "result": result}))

    async def drain(self) -> int:
        count = 0
        while (message := self.results.pop()) is not None:
            json.loads(message.data)
            self.results.done(message.message_id)
            count += 1
        return count

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        self.connection.close()


class LangGraphSubject:
    """langgraph-checkpoint-sqlite's ``AsyncSqliteSaver.aput_writes`` (natively async).

    submit = ``aput_writes`` of the payload, complete = ``aput_writes`` of the result
    (one commit each, through aiosqlite's thread); no ordered drain exists.
    """

    CONFIG: ClassVar[dict[str, Any]] = {
        "configurable": {"thread_id": "bench", "checkpoint_ns": "", "checkpoint_id": "c1"}
    }

    def __init__(self, saver: Any) -> None:
        self.saver = saver

    @classmethod
    async def open(cls, path: Path, synchronous: str) -> LangGraphSubject:
        """Connect, create the tables, and set ``synchronous``."""
        import aiosqlite
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        connection = await aiosqlite.connect(str(path))
        saver = AsyncSqliteSaver(connection)
        await saver.setup()
        await connection.execute(f"PRAGMA synchronous={synchronous}")
        return cls(saver)

    async def submit(self, task_id: str, payload: Any) -> None:
        await self.saver.aput_writes(self.CONFIG, [("payload", payload)], f"submit:{task_id}")

    async def complete(self, task_id: str, result: Any) -> None:
        await self.saver.aput_writes(self.CONFIG, [("result", result)], task_id)

    async def drain(self) -> int:
        raise NotImplementedError("langgraph has no ordered drain of pending writes")

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        await self.saver.conn.close()


def database_path(directory: Path, subject: str) -> Path:
    """Where ``subject`` keeps its data inside a case directory."""
    if subject == "persist-queue":
        return directory / "pq"
    return directory / DB_NAME


async def open_subject(name: str, directory: Path | None, synchronous: str) -> Subject:
    """Open subject ``name`` on its file in ``directory`` (None for in-memory subjects)."""
    if name in MEMORY:
        return HandlerSubject(None, synchronous) if name == "orbiter-memory" else DictListSubject()
    if directory is None:
        raise ValueError(f"{name} needs a directory")
    path = database_path(directory, name)
    openers: dict[str, Callable[[], Subject | Awaitable[Subject]]] = {
        "orbiter": lambda: HandlerSubject(path, synchronous),
        "stdlib-percall": lambda: StdlibSubject(path, synchronous, 1),
        "stdlib-batch": lambda: StdlibSubject(path, synchronous, 1000),
        "stdlib-drain": lambda: StdlibSubject(path, synchronous, 1),
        "stdlib-ack": lambda: StdlibSubject(path, synchronous, 1, ack_each=True),
        "persist-queue": lambda: PersistQueueSubject(path, synchronous),
        "huey": lambda: HueySubject(path, synchronous),
        "litequeue": lambda: LiteQueueSubject(path, synchronous),
        "langgraph": lambda: LangGraphSubject.open(path, synchronous),
    }
    opened = openers[name]()
    if isinstance(opened, Awaitable):
        return await opened
    return opened
