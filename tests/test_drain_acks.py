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
import struct
from pathlib import Path

import pytest

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.store import sql_store
from orbiter.store.drain_acks import SLOT_BYTES, AckFile, claimer_key
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


# -- the file ----------------------------------------------------------------------------


def test_slots_go_to_drains_that_hold_nothing(tmp_path: Path) -> None:
    acks = AckFile(tmp_path / "x.db-acks")
    assert acks.take_slot("a/1", holding=[]) == 0
    assert acks.take_slot("a/2", holding=["a/1"]) == 1
    assert acks.take_slot("b/1", holding=["a/1", "a/2"]) == 2
    # a/2 let go of its items: its slot is free again, its record no one's.
    assert acks.take_slot("b/2", holding=["a/1", "b/1"]) == 1
    acks.record(0, claimer_key("a/1"), 41)
    acks.record(2, claimer_key("b/1"), 7)
    assert acks.acknowledged("a/1") == 41
    assert acks.acknowledged("b/1") == 7
    assert acks.acknowledged("b/2") == 0  # taken, nothing merged yet
    assert acks.acknowledged("a/2") == 0  # its slot now holds b/2's record
    # Another process reads the same records.
    assert AckFile(tmp_path / "x.db-acks").acknowledged("a/1") == 41
    acks.close()


def test_a_torn_or_foreign_record_counts_as_nothing_merged(tmp_path: Path) -> None:
    path = tmp_path / "x.db-acks"
    acks = AckFile(path)
    assert acks.take_slot("a/1", holding=[]) == 0
    acks.record(0, claimer_key("a/1"), 99)
    data = bytearray(path.read_bytes())
    data[8:10] = b"\xff\xff"  # half of a new seq written, the rest of the record old
    path.write_bytes(bytes(data))
    assert AckFile(path).acknowledged("a/1") == 0
    path.write_bytes(b"\x00" * SLOT_BYTES + os.urandom(SLOT_BYTES))
    assert AckFile(path).acknowledged("a/1") == 0
    # A record is checked against its own key: another drain's cannot pass as a/1's.
    other = claimer_key("b/1")
    path.write_bytes(struct.pack("<QqQ", other, 5, other ^ 5 ^ 0x6F7262697465722D))
    assert AckFile(path).acknowledged("b/1") == 5
    assert AckFile(path).acknowledged("a/1") == 0
    acks.close()


def test_no_file_means_nothing_merged_and_none_is_created_by_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.db-acks"
    assert AckFile(path).acknowledged("a/1") == 0
    assert not path.exists()


def test_a_file_that_cannot_be_made_gives_no_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "x.db-acks"
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        assert AckFile(path).take_slot("a/1", holding=[]) is None
    assert "commit each item's removal instead" in caplog.text


async def test_a_new_ack_file_is_private(db_path: Path) -> None:
    await queue(db_path, 2)
    async with BackgroundTaskHandler(database=db_path) as handler:
        assert len([task async for task in handler.drain_pending()]) == 2
    assert acks_path(db_path).stat().st_mode & 0o777 == 0o600
