"""The durable store: tasks and the pending queue in a SQLite file.

Every state change runs on the :class:`~orbiter.store.worker.CommitWorker` and is
committed before the call returns. Task objects handed to callers are kept in a weak
identity map, so the object ``submit``/``get_task`` returned reflects this handler's later
``handle_result``/``handle_error`` calls, while finished tasks nobody holds cost no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Collection
from functools import partial
from typing import Any

from sqlalchemy import exc as sa_exc

from orbiter._internal.signal import Signal
from orbiter._internal.state import RunNodeStatus
from orbiter._internal.task import WAKEUP, BackgroundTask, MergeMode
from orbiter.errors import (
    BackgroundTaskError,
    DatabaseError,
    DatabaseLockedError,
    DuplicateTaskError,
    InvalidValueError,
    StoredValueError,
)
from orbiter.migrate import ensure_schema
from orbiter.store import CommittedThenCancelled, PendingDrain, fork_gate, queries
from orbiter.store.claims import (
    acknowledge,
    any_free_item,
    claim_next,
    enqueue,
    release_gone_claims,
    remove_merged_of_owner,
    settle,
    take_ack_slot,
)
from orbiter.store.codec import (
    Codec,
    encode_value,
    is_unicode_text,
    utc_now_text,
    utf8_size,
    writes_checked_json,
)
from orbiter.store.drain_acks import AckFile, claimer_key
from orbiter.store.engine import (
    DatabaseTarget,
    Synchronous,
    create_sync_engine,
    guarded_open,
    ready_file,
)
from orbiter.store.executor import Db
from orbiter.store.finish import Finish
from orbiter.store.heartbeat import Heartbeat
from orbiter.store.held_tasks import HeldTasks
from orbiter.store.owner import (
    OwnerIdentity,
    close_owner,
    forget_owner_if_unused,
    owner_gone_reason,
    owner_rows,
    record_heartbeat,
)
from orbiter.store.queries import TaskRow
from orbiter.store.worker import CommitWorker, Operation, refuse_if_unsafe_after_fork

__all__ = ["SqlStore"]

logger = logging.getLogger(__name__)

#: Items a drain claims per query: bounds its memory whatever the queue's length, and
#: lets concurrent drains share a long queue. The items it merged are deleted in bulk
#: in its next claim (until then, the ack file records them: see ``drain_acks.py``).
DRAIN_BATCH = 500

#: A claim only keeps other live drains away from items; after a power loss every drain
#: is gone anyway, so a claim commits process-crash-safe (no fsync at FULL), like an
#: acknowledgement. (A claim is visible to other processes as soon as it commits.)
CLAIMS_ARE_RELAXED = True


#: Stored text to enum member: a dict lookup, where calling the enum costs about a
#: microsecond a row (a drain reads every row it yields).
_STATUS_OF = {status.value: status for status in RunNodeStatus}
_MERGE_MODE_OF = {mode.value: mode for mode in MergeMode}


class SqlStore:
    """Tasks and pending results in a SQLite file, durable when each call returns.

    Args:
        target: The database (see :func:`~orbiter.store.engine.resolve_database`).
        synchronous: ``"FULL"`` (power-loss safe) or ``"NORMAL"`` (process-crash safe).
        busy_timeout: Seconds to wait for another process's write lock.
        auto_migrate: Upgrade an older schema at open instead of refusing it.
        codec: Encodes payloads and results as JSON text.
        max_value_bytes: Largest encoded payload or result accepted.
        poll_interval: Seconds between checks for results queued by other processes
            while ``PendingQueue.wait`` waits.
        heartbeat_interval: Seconds between renewals of this handler's lease.
        lease_timeout: Seconds after its last heartbeat when a silent handler counts as
            gone (its running tasks become orphans, its claimed items free).
    """

    def __init__(
        self,
        target: DatabaseTarget,
        *,
        synchronous: Synchronous,
        busy_timeout: float,
        auto_migrate: bool,
        codec: Codec,
        max_value_bytes: int,
        poll_interval: float,
        heartbeat_interval: float,
        lease_timeout: float,
    ) -> None:
        self.pending_signal = Signal()
        self.identity = OwnerIdentity.of_this_process()
        self._lease_timeout = lease_timeout
        self._drains = itertools.count(1)
        #: This handler's drains that hold (or may claim) items; the claims of any other
        #: drain of this handler are left over, and the next claim frees them.
        self._live_claimers: set[str] = set()
        #: Drains of this handler whose merged items (up to the seq) may still be rows:
        #: the ack file records them, their next claim deletes them; ``size`` skips them.
        self._merged_upto: dict[str, int] = {}
        self._target = target
        self._where = target.describe()
        self._codec = codec
        self._check_json = not writes_checked_json(codec)
        self._max_value_bytes = max_value_bytes
        self._poll_interval = poll_interval
        self._tasks = HeldTasks()
        #: Task objects this handler has finished so far: a read that sees it move knows
        #: its rows may be older than an object it would update (see ``_task_from_row``).
        self._finished_count = 0
        #: Where this handler's drains record how far they got (None: not a file).
        self._acks = None if target.path is None else AckFile.beside(target.path)
        if target.path is not None:
            refuse_if_unsafe_after_fork(str(target.path))
        # A fork waits until the open is done (see fork_gate.py).
        with fork_gate.opening(str(target.path or self._where)):
            self._worker = self._open(synchronous, busy_timeout, auto_migrate, lease_timeout)
        self._heartbeat = Heartbeat(self._worker, self._renew_lease, heartbeat_interval)
        # Closes a handler that is dropped (or still open at exit) without close().
        self._shut = threading.Event()  # set once the shutdown below has finished
        self._finalizer = weakref.finalize(
            self,
            _shut_down,
            self._worker,
            self._heartbeat,
            self.identity.owner_id,
            self._acks,
            self._shut,
        )

    # -- opening and errors --------------------------------------------------------

    def _open(
        self,
        synchronous: Synchronous,
        busy_timeout: float,
        auto_migrate: bool,
        lease_timeout: float,
    ) -> CommitWorker:
        """Check the file (creating a new one), bring its schema up to date, and start the
        commit worker with this handler's owner row recorded."""
        target = self._target
        existing = ready_file(target)
        engine = create_sync_engine(target, synchronous=synchronous, busy_timeout=busy_timeout)
        try:
            # The connection closes inside the guard, so a refused file is left as it was.
            with guarded_open(existing, self._where), engine.connect() as connection:
                ensure_schema(connection, self._where, auto_migrate=auto_migrate)
        except Exception as exc:
            engine.dispose()
            translated = translate_error(self._where, exc)
            if translated is exc:
                raise
            raise translated from exc
        worker = CommitWorker(
            engine,
            translate=partial(translate_error, self._where),
            synchronous=synchronous,
            name="orbiter-bg-commit",
        )
        me, acks = self.identity, self._acks

        def register(db: Db) -> None:
            record_heartbeat(me, lease_timeout, db)
            # What a killed drain had merged leaves the queue now, not at the next claim,
            # so that this handler's first look at the queue does not count it.
            release_gone_claims(db, me, acks)

        try:
            worker.call(register)
        except BaseException:
            worker.close()
            raise
        return worker

    # -- rows to tasks -------------------------------------------------------------

    def _task_from_row(self, row: TaskRow, finished_before: int) -> BackgroundTask:
        """The task object for ``row``: the one this handler holds, brought up to what is
        stored (changes made on the object itself and not stored are undone), or a new
        one. ``finished_before`` is ``_finished_count`` as it was before the row was read:
        if this handler finished a task since (on another thread, or while a drain held
        the row), a still-active row may be older than the object, which then stays as
        it is."""
        task_id, parent_task_id, status, merge_mode, payload, result, error = row[:7]
        held = self._tasks.get(task_id)
        if held is not None and held.parent_task_id != parent_task_id:
            held = None  # the id was purged and submitted again for another run
        if (
            held is not None
            and finished_before != self._finished_count
            and status in queries.ACTIVE_STATUSES
        ):
            return held
        # Decoded before anything changes: a value that cannot be read changes nothing.
        # (Inline, not through a method: this runs for every item a drain hands out.)
        what = "payload"
        try:
            if held is None:
                task = BackgroundTask(task_id, parent_task_id, payload=self._codec.loads(payload))
            else:
                task = held
            what = "result"
            value = None if result is None else self._codec.loads(result)
        except Exception as exc:
            raise _undecodable(task_id, what, exc) from exc
        if task is not held:
            self._tasks[task_id] = task
        task.status = _STATUS_OF[status]
        task.merge_mode = _MERGE_MODE_OF[merge_mode] if merge_mode is not None else None
        task.result = value
        task.error = error
        return task

    def _encode(self, value: Any, what: str) -> str:
        return encode_value(
            self._codec, value, what, self._max_value_bytes, check_json=self._check_json
        )

    # -- TaskStore -----------------------------------------------------------------

    def add(self, task: BackgroundTask) -> None:
        params = {
            "task_id": task.task_id,
            "parent_task_id": task.parent_task_id,
            # ``_value_``, not ``value``: an enum's ``value`` is a Python property (~0.2 us)
            "status": task.status._value_,
            "payload": self._encode(task.payload, "payload"),
            "owner_id": self.identity.owner_id,
        }

        def insert(db: Db) -> None:
            params["now"] = db.now
            if db.changes(queries.insert_task(), params) == 0:
                raise DuplicateTaskError(params["task_id"])

        self._worker.call(insert)
        self._tasks[task.task_id] = task

    def _held_task(self, task_id: str, row: TaskRow) -> BackgroundTask:
        """The object this handler holds for ``task_id``, made from ``row`` (its parent id
        and decoded payload, see :meth:`_finishing`) and remembered if there is none."""
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = BackgroundTask(task_id, row[0], payload=row[1])
        return task

    def _finishing(self, finish: Finish) -> Operation[TaskRow | None]:
        """``finish``, and if it returns the task's row (to build an object from), its
        payload decoded in the same transaction: a payload that cannot be decoded rolls
        the finish back (see :class:`_Undecodable`) rather than fail once it is
        committed."""
        if not finish.returning:
            return finish
        decode = self._decoded_in_transaction

        def finish_and_decode(db: Db) -> TaskRow:
            row = finish(db)
            assert row is not None  # (a finish that changes nothing raises)
            return row[0], decode(row[1], finish.task_id, "payload")

        return finish_and_decode

    def _decoded_in_transaction(self, text: str, task_id: str, what: str) -> Any:
        """Decode the stored ``what`` (payload or result) of ``task_id`` inside an
        operation: a value that cannot be decoded rolls the operation's transaction back,
        and its caller raises a :class:`StoredValueError` (see :class:`_Undecodable`)."""
        try:
            return self._codec.loads(text)
        except Exception as exc:
            raise _Undecodable(_undecodable(task_id, what, exc)) from exc

    def _finished(
        self, task_id: str, held: BackgroundTask | None, row: TaskRow | None
    ) -> BackgroundTask | None:
        """After a finishing update: the object to update, if anyone may hold one."""
        if held is not None:
            return held
        if row is not None:
            return self._held_task(task_id, row)
        return self._tasks.get(task_id)  # a concurrent get_task may have made one

    async def complete(
        self, task_id: str, result: Any, mode: MergeMode, *, want_task: bool = True
    ) -> BackgroundTask | None:
        params = {
            "id": task_id,
            "result": self._encode(result, "result"),
            "merge_mode": mode._value_,  # (see add())
        }
        # The object someone holds must show the result; nobody else needs one built,
        # and only building one needs the row back.
        held = self._tasks.get(task_id)
        finish = Finish(
            task_id,
            queries.complete_task,
            params,
            returning=want_task and held is None,
            enqueue=mode is WAKEUP,
        )
        # (Not called when no row comes back: this is the per-call path.)
        operation = self._finishing(finish) if finish.returning else finish
        try:
            row = await self._worker.acall(operation, report_committed=True)
        except CommittedThenCancelled as committed:
            committed.result = self._completed(task_id, held, committed.result, result, mode)
            raise
        except _Undecodable as failed:  # (a try costs nothing here; a with would, per call)
            raise failed.error from failed.error.__cause__
        return self._completed(task_id, held, row, result, mode)

    def _completed(
        self,
        task_id: str,
        held: BackgroundTask | None,
        row: TaskRow | None,
        result: Any,
        mode: MergeMode,
    ) -> BackgroundTask | None:
        """After a completion committed: wake waiters and update the object held."""
        if mode is WAKEUP:
            self.pending_signal.notify()
        task = self._finished(task_id, held, row)
        if task is not None:
            task.complete(result)
            task.merge_mode = mode
            self._finished_count += 1
        return task

    def _storable_error(self, error: str) -> str:
        """``error`` as it is stored: the failure is recorded whatever its text holds."""
        if not error.isascii() and not is_unicode_text(error):
            # A lone surrogate (a file name decoded with surrogateescape, say) is stored
            # as its backslash escape.
            error = error.encode("utf-8", "backslashreplace").decode("utf-8")
        size = utf8_size(error)
        if size > self._max_value_bytes:
            # One runaway error text must not bloat the file any more than a result can.
            note = f" ... [truncated: {size} bytes > max_value_bytes]"
            room = self._max_value_bytes - len(note)
            if room < 1:  # a limit too small for the note: the text's start alone
                note, room = "", self._max_value_bytes
            error = error.encode("utf-8")[:room].decode("utf-8", "ignore") + note
        return error

    def fail(self, task_id: str, error: str) -> BackgroundTask:
        error = self._storable_error(error)
        params = {"id": task_id, "error": error}
        held = self._tasks.get(task_id)
        operation = self._finishing(
            Finish(task_id, queries.fail_task, params, returning=held is None, enqueue=False)
        )
        try:
            row = self._worker.call(operation)
        except _Undecodable as failed:
            raise failed.error from failed.error.__cause__
        task = self._finished(task_id, held, row)
        assert task is not None  # held, or built from the row
        task.fail(error)
        self._finished_count += 1
        return task

    def get(self, task_id: str) -> BackgroundTask | None:
        finished = self._finished_count
        row = self._worker.call(
            lambda db: db.first(queries.select_task(), {"id": task_id}),
            writes=False,
        )
        return None if row is None else self._task_from_row(row, finished)

    def list_tasks(self, status: RunNodeStatus | None) -> list[BackgroundTask]:
        statement = queries.select_tasks(status is not None)
        params = {} if status is None else {"status": status.value}
        finished = self._finished_count
        rows = self._worker.call(lambda db: db.all(statement, params), writes=False)
        return [self._task_from_row(row, finished) for row in rows]

    def push_pending(self, task: BackgroundTask) -> None:
        # (Its ids are checked by PendingQueue.push.)
        if task.error is not None and not isinstance(task.error, str):
            raise InvalidValueError(f"cannot store the pushed task: error is {task.error!r}")
        try:  # a task built by hand may hold the plain strings ("success", "wakeup")
            status = RunNodeStatus(task.status)
            merge_mode = None if task.merge_mode is None else MergeMode(task.merge_mode)
        except ValueError as exc:
            raise InvalidValueError(f"cannot store the pushed task: {exc}") from exc
        params = {
            "task_id": task.task_id,
            "parent_task_id": task.parent_task_id,
            "status": status.value,
            "merge_mode": None if merge_mode is None else merge_mode.value,
            "payload": self._encode(task.payload, "payload"),
            "result": self._encode(task.result, "result") if task.is_complete else None,
            "error": None if task.error is None else self._storable_error(task.error),
            "owner_id": self.identity.owner_id,
        }

        acks = self._acks

        def push(db: Db) -> None:
            stored = db.scalar(queries.task_parent(), {"id": task.task_id})
            if stored is not None and stored != task.parent_task_id:
                # Another run's task by this id: queued here, no drain of the pushed run
                # would see it. Refused before anything is written.
                raise InvalidValueError(
                    f"cannot push task {task.task_id!r} for run {task.parent_task_id!r}: "
                    f"the stored task by that id belongs to run {stored!r}"
                )
            params["now"] = db.now
            db.execute(queries.insert_pushed_task(), params)
            enqueue(db, task.task_id, acks)

        self._worker.call(push)
        # The object submit/get_task handed out stays the one this handler updates.
        self._tasks.setdefault(task.task_id, task)
        self.pending_signal.notify()

    def _check_decodable(self, row: TaskRow) -> None:
        """In an operation: roll it back unless the payload and result of task ``row``
        (see ``queries.TASK_COLUMNS``) can be decoded."""
        task_id, payload, result = row[0], row[4], row[5]
        self._decoded_in_transaction(payload, task_id, "payload")
        if result is not None:
            self._decoded_in_transaction(result, task_id, "result")

    def pop_all_pending(self) -> list[BackgroundTask]:
        claimer = self._new_claimer()
        finished = self._finished_count

        claim = self._claim(claimer, None, after=0, upto=None, limit=-1)

        def pop_all(db: Db) -> list[TaskRow]:
            rows = claim(db)
            for _seq, *task_row in rows:
                check_decodable(task_row)  # every value readable, or nothing is removed
            db.execute(queries.acknowledge_all_claimed(), {"claimer": claimer})
            return rows

        check_decodable = self._check_decodable
        try:
            rows = self._worker.call(pop_all)
        except _Undecodable as failed:
            raise failed.error from failed.error.__cause__
        finally:
            self._live_claimers.discard(claimer)
        return [self._task_from_row(row[1:], finished) for row in rows]

    def pending_count(self) -> int:
        return self._worker.call(partial(_count_pending, self._merged_items()), writes=False)

    def has_pending(self) -> bool:
        merged = self._merged_items()
        if merged:  # the rows left may all be merged ones
            return self._worker.call(partial(_count_pending, merged), writes=False) > 0
        return bool(self._worker.call(_any_pending, writes=False))

    def _merged_items(self) -> list[tuple[str, int]]:
        """This handler's drains that may hold merged rows not deleted yet, each with the
        last item it merged."""
        # dict.copy() allocates nothing per entry, so no finalizer (and no other thread)
        # changes the dict while it is copied, as one could while its items were listed.
        return list(self._merged_upto.copy().items())

    def iter_pending(self, parent_task_id: str | None) -> PendingDrain:
        claimer = self._new_claimer()
        drain = _Drain(self, claimer, parent_task_id)
        # A drain dropped where nothing can close it (its loop was closed first) leaves
        # its claims behind: once it is gone, the next claim frees them.
        weakref.finalize(drain, self.forget_claims, claimer)
        return drain

    def forget_claims(self, claimer: str) -> None:
        """``claimer`` was dropped without freeing its items: the next claim frees them
        (no lock taken, so a garbage collector's finalizer may call this anywhere)."""
        self._live_claimers.discard(claimer)
        self._merged_upto.pop(claimer, None)

    async def claim_batch(self, parent_task_id: str | None) -> tuple[str, list[BackgroundTask]]:
        """Claim every free pending item (of one parent), for an all-or-nothing merge."""
        claimer = self._new_claimer()
        finished = self._finished_count
        try:
            rows = await self._worker.acall(
                self._claim(claimer, parent_task_id, after=0, upto=None, limit=-1),
                relaxed=CLAIMS_ARE_RELAXED,
                report_committed=True,
            )
        except CommittedThenCancelled as committed:  # cancelled as the claim committed
            await self._free_claims_after_error(claimer)
            raise asyncio.CancelledError(*committed.args) from None
        except BaseException:
            # The claim did not commit (withdrawn before it started, or failed and rolled
            # back): nothing to free, so nothing to wait for (say, a lock).
            self.forget_claims(claimer)
            raise
        try:
            return claimer, [self._task_from_row(row[1:], finished) for row in rows]
        except BaseException:  # a value that cannot be decoded: the items stay pending
            await self._free_claims_after_error(claimer)
            raise

    async def _free_claims_after_error(self, claimer: str, merged_upto: int = 0) -> None:
        """:meth:`_free_claims` on the way out of a failed or cancelled call: a failure
        here is logged (the next claim frees the items), and the call's own error raised."""
        try:
            await self._free_claims(claimer, merged_upto)
        except Exception:
            logger.warning(
                "could not free the items of a drain stopped by an error (the next "
                "claim frees them)",
                exc_info=True,
            )

    async def settle_batch(self, claimer: str, *, merged: bool) -> None:
        """Acknowledge (``merged``) or release every item of a claimed batch."""
        if merged:
            try:
                await self._worker.acall_to_end(
                    lambda db: db.execute(queries.acknowledge_all_claimed(), {"claimer": claimer}),
                    relaxed=False,
                )
            finally:  # acknowledged; or else the next claim frees them
                self._live_claimers.discard(claimer)
        else:
            await self._free_claims(claimer)

    async def _free_claims(self, claimer: str, merged_upto: int = 0) -> None:
        """Remove the items ``claimer`` merged (up to ``merged_upto``) and free the rest:
        at once, and should that not happen (say the drain is closed with no loop to run
        this), at the next claim (which reads what was merged from the ack file)."""
        self._live_claimers.discard(claimer)
        try:
            if not self._worker.closed:
                await self._worker.acall_to_end(
                    partial(settle, claimer=claimer, merged_upto=merged_upto), relaxed=True
                )
        finally:
            self._merged_upto.pop(claimer, None)

    def _claim(
        self, claimer: str, parent: str | None, *, after: int, upto: int | None, limit: int
    ) -> Operation[list[TaskRow]]:
        """The operation that claims the next items for ``claimer`` (see ``claim_next``)."""
        return partial(
            claim_next,
            me=self.identity,
            live=self._live_claimers,
            claimer=claimer,
            parent=parent,
            after=after,
            upto=upto,
            limit=limit,
            acks=self._acks,
        )

    def _new_claimer(self) -> str:
        """A name for one drain's claims, ``"<owner_id>/<drain number>"``, live (its items
        kept from other drains) until the drain frees or acknowledges them."""
        claimer = f"{self.identity.owner_id}/{next(self._drains)}"
        self._live_claimers.add(claimer)
        return claimer

    # -- owners ------------------------------------------------------------------------

    def _renew_lease(self, db: Db) -> None:
        record_heartbeat(self.identity, self._lease_timeout, db)

    async def recover_orphans(
        self, action: str, protect: Collection[str] = ()
    ) -> list[tuple[BackgroundTask, str]]:
        """Settle the active tasks of gone owners; see ``BackgroundTaskHandler.recover_orphans``."""
        me = self.identity

        def recover(db: Db) -> list[tuple[TaskRow, str]]:
            now = utc_now_text()
            owners_by_id = owner_rows(db)
            settled: list[tuple[TaskRow, str]] = []
            for (owner_id,) in db.all(queries.owners_of_active_tasks()):
                if owner_id == me.owner_id or owner_id in protect:
                    continue
                reason = owner_gone_reason(owners_by_id.get(owner_id), me, now)
                if reason is None:
                    continue
                params = {
                    "owner": owner_id,
                    "now": now,
                    "me": me.owner_id,
                    "error": f"orphaned: {reason}",
                }
                rows = db.all(queries.settle_orphans(action), params)
                for row in rows:  # objects are made of them: readable, or nothing settles
                    check_decodable(row)
                settled.extend((tuple(row), reason) for row in rows)
            for owner_id, row in owners_by_id.items():
                if owner_id != me.owner_id and owner_gone_reason(row, me, now) is not None:
                    remove_merged_of_owner(db, owner_id, self._acks)
                    forget_owner_if_unused(db, owner_id)
            return settled

        check_decodable = self._check_decodable
        try:
            rows = await self._worker.acall(recover, report_committed=True)
        except _Undecodable as failed:
            raise failed.error from failed.error.__cause__
        except CommittedThenCancelled as committed:
            # Rows the settling just wrote: none is older than an object held.
            committed.result = [
                (self._task_from_row(row, self._finished_count), why)
                for row, why in committed.result
            ]
            raise
        return [(self._task_from_row(row, self._finished_count), why) for row, why in rows]

    async def wait_pending(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self.pending_signal.version
            # Items a killed drain held are free too: the next drain takes them back.
            found = await self._worker.acall(
                partial(any_free_item, me=self.identity, live=self._live_claimers), writes=False
            )
            if found:
                return True
            step = self._poll_interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                step = min(step, remaining)
            await self.pending_signal.wait_for_change(seen, step)

    def close(self) -> None:
        self._finalizer()  # runs the shutdown once; a concurrent closer waits for it
        if self._worker.on_commit_thread:
            return
        # Look before waiting: an Event's wait is Python code around a lock, which a
        # KeyboardInterrupt could leave held (so every later close() would hang).
        if not self._shut.is_set():
            self._shut.wait()
        # Again (it may be): a shutdown an interrupt cut short may have left the worker
        # running, and this one finishes it.
        self._worker.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


class _Drain:
    """One drain of the queue (``iter_pending``): claims items in batches, hands them out
    in enqueue order, and removes each when the consumer asks for the next one: recorded
    in the ack file at once, deleted from the queue with the next claim (or, without an
    ack file, by a commit of its own).

    An async iterator rather than an async generator on purpose: asyncio finalizes a
    dropped async generator itself, so a drain dropped inside a reference cycle, together
    with the handler's generator that wraps it, would be closed twice at once (the second
    close fails, and asyncio logs it). This object is closed only by its owner.
    """

    def __init__(self, store: SqlStore, claimer: str, parent_task_id: str | None) -> None:
        self._store = store
        self._claimer = claimer
        self._parent = parent_task_id
        self._upto: int | None = None  # the newest item when the drain started
        self._batch: deque[TaskRow] = deque()  # claimed, not handed out yet
        self._claimed_after = 0  # the store's _finished_count when the batch was claimed
        self._held: int | None = None  # the item the consumer holds
        self._after = 0  # items up to this one are done
        self._slot: int | None = None  # this drain's slot in the ack file, once claimed
        self._key = claimer_key(claimer)  # its records' key there
        self._turn = 0  # which of the slot's two records it writes next
        self._use_acks = store._acks is not None  # False once the ack file failed
        self._started = False
        self._claimed = False  # a claim of this drain committed: it may hold items
        self._ended = False
        self._running = False  # in __anext__ (which one caller at a time may be)

    def __aiter__(self) -> _Drain:
        return self

    async def __anext__(self) -> BackgroundTask:
        if self._running:  # as an async generator would refuse it
            raise RuntimeError("anext(): this drain is already running")
        if self._ended:
            raise StopAsyncIteration
        self._running = True
        store = self._store
        try:  # (one coroutine per item, not two: a drain's Python is most of its cost)
            if not self._started:
                self._started = True
                self._upto = await store._worker.acall(_newest_pending, writes=False)
                if self._upto is None:  # nothing to drain: nothing was claimed either
                    self._ended = True
                    store._live_claimers.discard(self._claimer)
                    raise StopAsyncIteration
            if self._held is not None:
                # The consumer asked for the next item, so it has merged this one: remove
                # it before handing out the next (process-crash safe; losing it to power
                # loss means a redelivery, never a loss).
                # (A call that needs no commit must still refuse a closed handler, or a
                # forked child's copy, which would write into its parent's ack slot.)
                store._worker.refuse_if_closed()
                self._after, self._held = self._held, None
                if not self._record_merged():
                    await store._worker.acall(
                        partial(acknowledge, self._claimer, self._after), relaxed=True
                    )
            if not self._batch:
                try:
                    rows, slot = await store._worker.acall(
                        self._claim(), relaxed=CLAIMS_ARE_RELAXED, report_committed=True
                    )
                except CommittedThenCancelled:
                    self._claimed = True  # what it claimed is freed below
                    raise
                self._claimed = True
                self._batch.extend(rows)
                self._slot = slot
                if slot is None:
                    self._use_acks = False
                if not self._batch:
                    await self._end()
                    raise StopAsyncIteration
            row = self._batch[0]
            # The row was read when the batch was claimed: a task this handler finished
            # since keeps what its object shows. (May fail, in a codec: the item stays.)
            task = store._task_from_row(row[1:], self._claimed_after)
            self._batch.popleft()
            self._held = row[0]
            return task
        except StopAsyncIteration:
            raise
        except BaseException as error:
            # Failed, or cancelled (perhaps while a claim committed): free what we hold.
            await self._end(after_error=True)
            if isinstance(error, CommittedThenCancelled):
                raise asyncio.CancelledError(*error.args) from None
            raise
        finally:
            self._running = False

    def _claim(self) -> Operation[tuple[list[TaskRow], int | None]]:
        """The operation that removes the merged items and claims the next batch, taking
        a slot of the ack file with the first one."""
        store = self._store
        claim = store._claim(
            self._claimer, self._parent, after=self._after, upto=self._upto, limit=DRAIN_BATCH
        )
        acks = store._acks if self._use_acks else None
        claimer, me = self._claimer, store.identity
        self._claimed_after = store._finished_count

        def claim_next_batch(db: Db) -> tuple[list[TaskRow], int | None]:
            rows = claim(db)
            # Its slot, checked each time (a drain taken for gone has lost it; the items
            # it merged went with the claim above, so a new one starts clean).
            return rows, take_ack_slot(db, acks, claimer, me) if acks and rows else None

        return claim_next_batch

    def _record_merged(self) -> bool:
        """Record in the ack file that items up to ``_after`` are merged (False: there is
        no slot, or the write failed, and a commit must remove the item instead)."""
        acks = self._store._acks
        if self._slot is None or acks is None:
            return False
        try:
            acks.record(self._slot, self._key, self._after, self._turn)
            self._turn ^= 1
            self._store._merged_upto[self._claimer] = self._after
        except OSError as exc:
            logger.warning(
                "cannot write %s (%s): this drain commits each item's removal instead",
                acks.path,
                exc,
            )
            self._slot = None
            self._use_acks = False
            return False
        return True

    async def aclose(self) -> None:
        """Stop: free every item still held (the one in hand is handed out again)."""
        if self._running:
            raise RuntimeError("aclose(): this drain is already running")
        await self._end()

    async def _end(self, *, after_error: bool = False) -> None:
        """Free what this drain holds, once (``after_error``: a failure to is logged)."""
        if self._ended:
            return
        self._ended = True
        store = self._store
        if not self._claimed:  # no claim of its committed: it holds nothing to free
            store.forget_claims(self._claimer)
        elif after_error:
            await store._free_claims_after_error(self._claimer, self._after)
        else:
            await store._free_claims(self._claimer, self._after)


def _undecodable(task_id: str, what: str, exc: Exception) -> StoredValueError:
    """The error for a stored value of ``task_id`` that the codec refused with ``exc``
    (its cause)."""
    error = StoredValueError(
        f"cannot decode the stored {what} of task {task_id!r} ({exc}); it was written by "
        "another codec or edited by hand"
    )
    error.__cause__ = exc
    return error


class _Undecodable(Exception):
    """Carries a :class:`StoredValueError` out of an operation whose writes must roll
    back (an operation's ``BackgroundTaskError`` is its answer, and its writes commit);
    the caller raises ``error``."""

    def __init__(self, error: StoredValueError) -> None:
        super().__init__(str(error))
        self.error = error


def _newest_pending(db: Db) -> int | None:
    return db.scalar(queries.max_pending_seq())  # type: ignore[no-any-return]


def _any_pending(db: Db) -> bool:
    return bool(db.scalar(queries.has_pending()))


def _count_pending(merged: list[tuple[str, int]], db: Db) -> int:
    """Rows in the queue, less those ``merged`` drains merged and have not deleted yet."""
    count = int(db.scalar(queries.count_pending()))
    for claimer, seq in merged:
        count -= int(db.scalar(queries.count_claimed_upto(), {"claimer": claimer, "seq": seq}))
    return count


def _shut_down(
    worker: CommitWorker,
    heartbeat: Heartbeat,
    owner_id: str,
    acks: AckFile | None,
    done: threading.Event,
) -> None:
    """Stop the heartbeat, mark the owner closed (its running tasks become orphans that
    any process may settle at once), close the connection, then set ``done``. In a forked
    child, whose copy of the handler is not its own, only set ``done``."""
    if worker.forked:  # a forked child's copy: the parent's connection and owner row
        done.set()
        return
    if worker.on_commit_thread:
        # Collected on the commit thread (a cycle through an on_merge callback, say):
        # it cannot wait for itself, so another thread does the closing.
        threading.Thread(
            target=_shut_down,
            args=(worker, heartbeat, owner_id, acks, done),
            name="orbiter-bg-close",
        ).start()
        return
    try:
        heartbeat.stop()
        with contextlib.suppress(BackgroundTaskError):
            worker.call(partial(close_owner, owner_id))
        worker.close()
        if acks is not None:
            acks.close()
    finally:
        done.set()


def translate_error(where: str, exc: BaseException) -> BaseException:
    """Map a driver error to a :class:`DatabaseError` that names the file and problem."""
    if isinstance(exc, BackgroundTaskError):
        return exc
    original = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if not isinstance(original, sqlite3.Error):
        return exc
    message = str(original)
    lowered = message.lower()
    if "locked" in lowered or "busy" in lowered:
        return DatabaseLockedError(
            f"{where}: the database stayed locked by another connection longer "
            f"than busy_timeout ({message})"
        )
    if "full" in lowered:
        return DatabaseError(
            f"{where}: the database or disk is full ({message}); the call changed "
            "nothing, and earlier results are intact"
        )
    if "malformed" in lowered or "not a database" in lowered:
        return DatabaseError(f"{where}: the file is corrupt or not a SQLite database ({message})")
    if "readonly" in lowered or "read-only" in lowered:
        return DatabaseError(f"{where}: the database is read-only ({message})")
    if "unable to open" in lowered:
        return DatabaseError(f"{where}: cannot open the database ({message})")
    return DatabaseError(f"{where}: {message}")
