"""Drains record their progress in ``<db>-acks`` and delete merged items in bulk.

The guarantee is the per-item one (tests/test_crash.py): a drain killed while holding
item k leaves k and everything after it, nothing before. Here it is checked across the
drain's batches, with the ack file in use and without one (the per-item commits), and
for what the file itself must get right: whose record is whose, and torn records.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.errors import HandlerClosedError
from orbiter.migrate import downgrade
from orbiter.store import sql_store
from orbiter.store.claims import claim_next, take_ack_slot
from orbiter.store.drain_acks import HALF_BYTES, SLOT_BYTES, AckFile, claimer_key
from orbiter.store.executor import Db
from orbiter.store.owner import OwnerIdentity
from tests.conftest import run_helper
from tests.test_crash import inspect, kill, read_until, start_child


def acks_path(db_path: Path) -> Path:
    return Path(f"{db_path}-acks")


async def queue(db_path: Path, count: int) -> list[str]:
    """Queue ``count`` wake-up results (in enqueue order) from a handler closed after."""
    ids = [f"t{index}" for index in range(count)]
    async with BackgroundTaskHandler(database=db_path, synchronous="NORMAL") as handler:
        for task_id in ids:
            handler.submit(task_id, "run")
            await handler.handle_result(task_id, {"n": task_id}, is_main_running=False)
    return ids


# -- killed drains -----------------------------------------------------------------------

#: More than two of a drain's batches, so kills land in the first, at a boundary, and in
#: a later one.
QUEUED = sql_store.DRAIN_BATCH * 2 + 37


@pytest.mark.parametrize("ack_file", ["usable", "unusable"])
@pytest.mark.parametrize(
    "hold_at",
    [0, 3, sql_store.DRAIN_BATCH - 1, sql_store.DRAIN_BATCH, sql_store.DRAIN_BATCH * 2 + 5],
)
def test_a_drain_killed_holding_item_k_leaves_k_and_after_only(
    db_path: Path, ack_file: str, hold_at: int
) -> None:
    ids = asyncio.run(queue(db_path, QUEUED))
    if ack_file == "unusable":  # a directory where the file would go: commits per item
        acks_path(db_path).mkdir()
    drainer = start_child("drain_hold", str(db_path), str(hold_at))
    lines = read_until(drainer, f"holding {ids[hold_at]}")
    assert lines == [f"holding {task_id}" for task_id in ids[: hold_at + 1]]
    kill(drainer)
    # A fresh process counts only what is left, then drains exactly that.
    assert inspect(db_path)["pending_size"] == QUEUED - hold_at
    assert inspect(db_path, "--drain")["drained"] == ids[hold_at:]
    assert inspect(db_path)["pending_size"] == 0
    assert acks_path(db_path).is_dir() is (ack_file == "unusable")


@pytest.mark.parametrize("settled_by", ["next drain", "recover_orphans"])
def test_a_handler_open_before_the_kill_skips_what_the_dead_drain_merged(
    db_path: Path, settled_by: str
) -> None:
    ids = asyncio.run(queue(db_path, QUEUED))

    async def run() -> list[str]:
        async with BackgroundTaskHandler(database=db_path) as handler:
            drainer = start_child("drain_hold", str(db_path), "150")
            read_until(drainer, f"holding {ids[150]}")
            kill(drainer)
            if settled_by == "recover_orphans":  # forgets the dead owner, frees its items
                assert await handler.recover_orphans("fail") == []
                assert handler.pending_queue.size == QUEUED - 150
            # Else the drain's claim settles the dead drain's items first.
            return [task.task_id async for task in handler.drain_pending()]

    assert asyncio.run(run()) == ids[150:]
    assert inspect(db_path)["pending_size"] == 0


# -- in one process ----------------------------------------------------------------------


async def test_size_during_a_drain_leaves_out_the_merged_items(db_path: Path) -> None:
    ids = await queue(db_path, 10)
    async with BackgroundTaskHandler(database=db_path) as handler:
        drain = handler.drain_pending()
        seen = [(await anext(drain)).task_id for _ in range(3)]
        assert seen == ids[:3]
        # Two merged (recorded in the ack file, still rows), one in hand, seven to come.
        assert handler.pending_queue.size == 8
        assert not handler.pending_queue.empty
        await drain.aclose()
        assert handler.pending_queue.size == 8  # the one in hand stays
        rest = [task.task_id async for task in handler.drain_pending()]
        assert rest == ids[2:]
        assert handler.pending_queue.size == 0
        assert handler.pending_queue.empty


async def test_a_drain_whose_ack_writes_fail_commits_each_removal_instead(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await queue(db_path, 12)
    async with BackgroundTaskHandler(database=db_path) as handler:
        drain = handler.drain_pending()
        assert [(await anext(drain)).task_id for _ in range(4)] == ids[:4]

        def disk_full(*args: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(AckFile, "record", disk_full)
        with caplog.at_level(logging.WARNING):
            assert (await anext(drain)).task_id == ids[4]
        assert "commits each item's removal instead" in caplog.text
        assert (await anext(drain)).task_id == ids[5]
        # Items 0-3 were recorded in the file, 4 was removed by a commit: 5 is in hand.
        assert handler.pending_queue.size == 12 - 5
        await drain.aclose()
        monkeypatch.undo()
        assert [task.task_id async for task in handler.drain_pending()] == ids[5:]


async def test_a_drain_refuses_once_its_handler_is_closed(db_path: Path) -> None:
    ids = await queue(db_path, 5)
    handler = BackgroundTaskHandler(database=db_path)
    drain = handler.drain_pending()
    assert (await anext(drain)).task_id == ids[0]
    await handler.aclose()
    with pytest.raises(HandlerClosedError, match="closed"):
        await anext(drain)
    async with BackgroundTaskHandler(database=db_path) as again:
        assert [task.task_id async for task in again.drain_pending()] == ids


def test_a_forked_child_cannot_go_on_with_its_parents_drain(db_path: Path) -> None:
    ids = asyncio.run(queue(db_path, 10))

    async def parent() -> list[str]:
        async with BackgroundTaskHandler(database=db_path) as handler:
            drain = handler._store.iter_pending(None)
            seen = [(await anext(drain)).task_id for _ in range(2)]
            pid = os.fork()
            if pid == 0:  # the child drives the copy by hand: its loop is the parent's
                step = cast(Coroutine[Any, Any, Any], drain.__anext__())
                try:
                    step.send(None)
                except StopIteration:  # handed out an item of the parent's batch
                    os._exit(1)
                except HandlerClosedError as exc:
                    os._exit(3 if "forked process" in str(exc) else 2)
                except BaseException:
                    os._exit(2)
                os._exit(2)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
            seen += [task.task_id async for task in drain]
            return seen

    assert asyncio.run(parent()) == ids
    assert inspect(db_path)["pending_size"] == 0


# -- faults found in review ----------------------------------------------------------------


def test_a_claim_retried_after_its_batch_failed_keeps_one_slot(db_path: Path) -> None:
    # The first claim shared a batch with an operation that failed: rolled back, then run
    # alone. A slot taken by the rolled-back attempt (and written in the file) once left
    # the drain's key in two slots, the stale one read first: killed holding item 5,
    # items 1-4 came back.
    ids = asyncio.run(queue(db_path, 10))
    drainer = start_child("drain_in_failed_batch", str(db_path), "4")
    assert read_until(drainer, "holding")[-1] == f"holding {ids[4]}"
    kill(drainer)
    assert inspect(db_path, "--drain")["drained"] == ids[4:]


def test_a_rolled_back_claim_takes_no_slot_and_writes_nothing(db_path: Path) -> None:
    ids = asyncio.run(queue(db_path, 3))
    with sqlite3.connect(db_path, isolation_level=None) as raw:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("UPDATE pending_queue SET claimed_by = 'x/1'")
        acks = AckFile(acks_path(db_path))
        me = OwnerIdentity.of_this_process()
        assert take_ack_slot(Db(raw), acks, "x/1", me) == 0
        assert take_ack_slot(Db(raw), acks, "x/1", me) == 0  # the same in one transaction
        raw.execute("ROLLBACK")
        acks.close()
        assert raw.execute("SELECT count(*) FROM drain_slots").fetchone()[0] == 0
    assert not any(acks_path(db_path).read_bytes())  # only the drain writes its slot
    assert inspect(db_path, "--drain")["drained"] == ids


def test_requeue_and_push_of_merged_items_while_the_drain_holds_a_later_one(
    db_path: Path,
) -> None:
    # The merged items' rows are still there (claimed) until the drain's next claim:
    # a requeue (CLI) or push (another process) must queue them again, not be absorbed.
    ids = asyncio.run(queue(db_path, 5))

    async def run() -> list[str]:
        async with BackgroundTaskHandler(database=db_path) as handler:
            drain = handler.drain_pending()
            held = [(await anext(drain)).task_id for _ in range(3)]
            assert held == ids[:3]
            requeue = subprocess.run(
                [sys.executable, "-m", "orbiter.cli", "--db", str(db_path), "requeue", ids[0]],
                capture_output=True,
                text=True,
                check=True,
            )
            assert "requeued" in requeue.stdout
            run_helper("child.py", "push_again", str(db_path), ids[1])
            rest = [task.task_id async for task in drain]
            assert rest == ids[3:]
            return [task.task_id async for task in handler.drain_pending()]

    assert asyncio.run(run()) == [ids[0], ids[1]]


def test_while_a_handler_from_before_the_ack_file_lives_drains_commit_each_removal(
    db_path: Path,
) -> None:
    # A handler of the previous release, open when the file was upgraded, frees a
    # killed drain's items without reading the ack file and absorbs a push of a merged
    # item: while one lives, drains delete each item with a commit, as it expects.
    ids = asyncio.run(queue(db_path, 6))
    me = OwnerIdentity.of_this_process()
    older = {**me.as_row(), "owner_id": "older-release"}
    with sqlite3.connect(db_path) as raw:  # alive: this very process, by host and pid
        raw.execute(
            "INSERT INTO owners (owner_id, host, boot_id, pid, process_start, started_at, "
            "heartbeat_at, lease_expires_at, records_acks) VALUES (:owner_id, :host, "
            ":boot_id, :pid, :process_start, '2026-01-01', '2026-01-01', '2999-01-01', 0)",
            older,
        )

    async def drain_three() -> int:
        async with BackgroundTaskHandler(database=db_path) as handler:
            drain = handler.drain_pending()
            assert [(await anext(drain)).task_id for _ in range(3)] == ids[:3]
            with sqlite3.connect(db_path) as raw:  # two merged items already gone
                rows = raw.execute("SELECT count(*) FROM pending_queue").fetchone()[0]
                assert raw.execute("SELECT count(*) FROM drain_slots").fetchone()[0] == 0
            await drain.aclose()
            return int(rows)

    assert asyncio.run(drain_three()) == 4
    with sqlite3.connect(db_path) as raw:  # the older handler closes: slots again
        raw.execute("UPDATE owners SET closed_at = '2026-01-02' WHERE owner_id = 'older-release'")

    async def drain_one() -> int:
        async with BackgroundTaskHandler(database=db_path) as handler:
            drain = handler.drain_pending()
            assert (await anext(drain)).task_id == ids[2]
            with sqlite3.connect(db_path) as raw:
                slots = raw.execute("SELECT count(*) FROM drain_slots").fetchone()[0]
            await drain.aclose()
            return int(slots)

    assert asyncio.run(drain_one()) == 1


def test_a_live_drain_that_holds_no_row_keeps_its_slot(db_path: Path) -> None:
    # A drain between batches whose merged rows were all pushed again holds no row;
    # another drain's first claim must not take its slot (it would overwrite the
    # other's records: items before k back after a kill).
    asyncio.run(queue(db_path, 2))
    me = OwnerIdentity.of_this_process()
    with sqlite3.connect(db_path, isolation_level=None) as raw:
        raw.execute("BEGIN IMMEDIATE")
        db = Db(raw)
        raw.execute("INSERT INTO drain_slots (slot, claimer) VALUES (0, ?)", (f"{me.owner_id}/1",))
        raw.execute("UPDATE pending_queue SET claimed_by = ?", (f"{me.owner_id}/2",))
        acks = AckFile(acks_path(db_path))
        claim_next(
            db, me, {f"{me.owner_id}/1", f"{me.owner_id}/2"}, f"{me.owner_id}/2", None,
            after=0, upto=None, limit=10, acks=acks,
        )  # fmt: skip
        assert take_ack_slot(db, acks, f"{me.owner_id}/2", me) == 1
        # Once gone (not live any more), its slot is freed by the next claim.
        claim_next(
            db, me, {f"{me.owner_id}/2"}, f"{me.owner_id}/2", None,
            after=0, upto=None, limit=10, acks=acks,
        )  # fmt: skip
        assert raw.execute("SELECT slot FROM drain_slots").fetchall() == [(1,)]
        raw.execute("ROLLBACK")
        acks.close()


def test_a_downgrade_below_0005_waits_for_drains_to_give_back_their_slots(
    db_path: Path,
) -> None:
    ids = asyncio.run(queue(db_path, 10))
    drainer = start_child("drain_hold", str(db_path), "4")
    read_until(drainer, f"holding {ids[4]}")
    kill(drainer)
    with pytest.raises(RuntimeError, match=r"drain.*hold a slot"):
        downgrade(str(db_path), "0004")
    # A handler opened once settles the killed drain (its merged items go).
    assert inspect(db_path)["pending_size"] == 6
    assert downgrade(str(db_path), "0004") == "0004"
    assert inspect(db_path, "--drain")["drained"] == ids[4:]  # upgraded again at open


@pytest.mark.parametrize("how", ["push after the file was deleted", "requeue, file unreadable"])
def test_a_merged_item_queued_again_when_its_record_cannot_be_read(db_path: Path, how: str) -> None:
    # Not knowing whether the drain merged it, the push must not be absorbed: a second
    # delivery at worst, never a loss.
    ids = asyncio.run(queue(db_path, 5))

    async def run() -> list[str]:
        async with BackgroundTaskHandler(database=db_path) as handler:
            drain = handler.drain_pending()
            assert [(await anext(drain)).task_id for _ in range(3)] == ids[:3]
            acks_path(db_path).unlink()
            if how.startswith("push"):
                run_helper("child.py", "push_again", str(db_path), ids[1])
            else:
                acks_path(db_path).mkdir()
                subprocess.run(
                    [sys.executable, "-m", "orbiter.cli", "--db", str(db_path), "requeue", ids[1]],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            assert [task.task_id async for task in drain] == ids[3:]
            return [task.task_id async for task in handler.drain_pending()]

    assert asyncio.run(run()) == [ids[1]]


def test_a_drain_whose_ack_file_was_deleted_records_into_the_new_one(db_path: Path) -> None:
    # Its records went on into the deleted file, which no reader finds: killed, the
    # items it merged came back. Its next claim now lets go of the deleted file and
    # uses (creates) the one at the path, so only items of the batch in hand can.
    ids = asyncio.run(queue(db_path, QUEUED))
    batch = sql_store.DRAIN_BATCH
    drainer = start_child("drain_pause", str(db_path), "3", str(batch + 50))
    read_until(drainer, "paused")
    acks_path(db_path).unlink()
    Path(f"{db_path}.go").touch()
    read_until(drainer, f"holding {ids[batch + 50]}")
    kill(drainer)
    assert acks_path(db_path).exists()
    assert inspect(db_path, "--drain")["drained"] == ids[batch + 50 :]


# -- the file ----------------------------------------------------------------------------


def test_a_record_counts_for_its_own_drain_only(tmp_path: Path) -> None:
    acks = AckFile(tmp_path / "x.db-acks")
    assert acks.prepare(0) and acks.prepare(2)
    acks.record(0, claimer_key("a/1"), 41, 0)
    acks.record(2, claimer_key("b/1"), 7, 1)
    assert acks.merged_upto("a/1", 0) == 41
    assert acks.merged_upto("b/1", 2) == 7
    assert acks.merged_upto("b/2", 2) == 0  # b/2 now owns slot 2: b/1's record is not its
    assert acks.merged_upto("a/1", 1) == 0  # a slot never written (zeros)
    assert acks.merged_upto("a/1", 99) == 0  # past the end
    assert AckFile(tmp_path / "x.db-acks").merged_upto("a/1", 0) == 41  # another reader
    acks.close()


def test_a_torn_record_leaves_the_one_before_it(tmp_path: Path) -> None:
    path = tmp_path / "x.db-acks"
    acks = AckFile(path)
    assert acks.prepare(0)
    key = claimer_key("a/1")
    acks.record(0, key, 98, 0)
    acks.record(0, key, 99, 1)
    assert acks.merged_upto("a/1", 0) == 99
    acks.close()
    data = bytearray(path.read_bytes())
    data[HALF_BYTES + 8 : HALF_BYTES + 10] = b"\xff\xff"  # killed while copying 99's seq
    path.write_bytes(bytes(data))
    assert AckFile(path).merged_upto("a/1", 0) == 98
    path.write_bytes(os.urandom(SLOT_BYTES))
    assert AckFile(path).merged_upto("a/1", 0) == 0


def test_the_file_grows_by_zeroed_pages_and_never_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "x.db-acks"
    acks = AckFile(path)
    assert acks.prepare(0)
    page = path.stat().st_size
    assert page > 0 and path.read_bytes() == bytes(page)
    acks.record(0, claimer_key("a/1"), 5, 0)
    slot = page // SLOT_BYTES  # the first slot of the second page
    assert acks.prepare(slot)
    assert path.stat().st_size == 2 * page
    acks.record(slot, claimer_key("b/1"), 6, 0)
    assert acks.merged_upto("a/1", 0) == 5
    assert acks.merged_upto("b/1", slot) == 6
    assert acks.prepare(0)
    assert path.stat().st_size == 2 * page
    acks.close()


def test_no_file_means_nothing_merged_and_none_is_created_by_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.db-acks"
    assert AckFile(path).merged_upto("a/1", 0) == 0
    assert not path.exists()


def test_a_file_that_cannot_be_made_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "x.db-acks"
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        assert not AckFile(path).prepare(0)
    assert "commit each item's removal instead" in caplog.text


def test_a_symlink_or_fifo_at_the_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("important\n")
    path = tmp_path / "x.db-acks"
    path.symlink_to(victim)
    assert not AckFile(path).prepare(0)
    assert AckFile(path).merged_upto("a/1", 0) == 0
    assert victim.read_text() == "important\n"
    path.unlink()
    os.mkfifo(path)
    assert not AckFile(path).prepare(0)  # (would block a reader forever, if opened)
    assert AckFile(path).merged_upto("a/1", 0) == 0


async def test_concurrent_drains_get_their_own_slots_and_give_them_back(db_path: Path) -> None:
    ids = await queue(db_path, 6)
    async with BackgroundTaskHandler(database=db_path) as handler:
        first = handler.drain_pending(None)
        assert (await anext(first)).task_id == ids[0]
        with sqlite3.connect(db_path) as raw:  # the first drain holds every item
            assert raw.execute("SELECT slot FROM drain_slots").fetchall() == [(0,)]
        await first.aclose()
        with sqlite3.connect(db_path) as raw:
            assert raw.execute("SELECT count(*) FROM drain_slots").fetchone()[0] == 0
        assert [task.task_id async for task in handler.drain_pending()] == ids


async def test_a_new_ack_file_is_private(db_path: Path) -> None:
    await queue(db_path, 2)
    async with BackgroundTaskHandler(database=db_path) as handler:
        assert len([task async for task in handler.drain_pending()]) == 2
    assert acks_path(db_path).stat().st_mode & 0o777 == 0o600
