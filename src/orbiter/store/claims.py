"""Claims on pending items: which drain holds which item, taken and freed in SQL.

A drain claims items (``pending_queue.claimed_by`` = ``"<owner_id>/<drain number>"``)
before it hands them out, so concurrent drains, in this process or another, never share
an item while its holder lives. The next claim frees the items of drains that are gone:
those of a handler that is provably gone, and those of this handler's drains that ended
without freeing theirs (a drain dropped on a loop that was closed before it could close
the drain, or whose release failed). Items a gone drain recorded as merged in the ack
file (``drain_acks.py``) are removed first, the rest freed. Each function here is an
operation for the commit worker: it runs inside the worker's transaction, on ``db``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Sequence
from typing import Any

from orbiter.store import queries
from orbiter.store.codec import utc_now_text
from orbiter.store.drain_acks import AckFile
from orbiter.store.executor import Db
from orbiter.store.owner import OwnerIdentity, owner_gone_reason, owner_rows

__all__ = [
    "acknowledge",
    "any_free_item",
    "claim_next",
    "enqueue",
    "merged_upto",
    "release_gone_claims",
    "remove_merged_of_owner",
    "settle",
    "take_ack_slot",
]

logger = logging.getLogger(__name__)


def claim_next(
    db: Db,
    me: OwnerIdentity,
    live: Collection[str],
    claimer: str,
    parent: str | None,
    *,
    after: int,
    upto: int | None,
    limit: int,
    acks: AckFile | None,
) -> list[Sequence[Any]]:
    """Free items held by gone drains (``live``: this handler's drains still running),
    remove the items ``claimer`` merged (up to enqueue number ``after``), then claim for
    it up to ``limit`` free items (-1: all) after ``after`` and up to ``upto`` (None: the
    newest), of run ``parent`` or of every run; return what ``claimer`` holds, in enqueue
    order."""
    now = utc_now_text()
    _release_dead_claims(db, me, live, now, acks)
    _remove_merged(db, claimer, after)
    if upto is None:
        upto = db.scalar(queries.max_pending_seq())
        if upto is None:
            return []
    params = {
        "claimer": claimer,
        "now": now,
        "after": after,
        "upto": upto,
        "limit": limit,
        "parent": parent,
    }
    db.execute(queries.claim_pending(parent is not None), params)
    return db.all(queries.claimed_items(), {"claimer": claimer})


def take_ack_slot(db: Db, acks: AckFile, claimer: str, me: OwnerIdentity) -> int | None:
    """The slot of the ack file where ``claimer``, which holds items, records its progress:
    the one it has, or a new one taken in this transaction (should it roll back, none was
    taken). None: the drain commits each removal instead, because the file cannot be
    used or a handler from before it is alive (it would free a killed drain's items
    without reading the file, and absorb a push of a merged item)."""
    slot: int | None = db.scalar(queries.slot_of_claimer(), {"claimer": claimer})
    if slot is not None:
        return slot if acks.prepare(slot) else None  # (the file may have been replaced)
    now = utc_now_text()
    for row in db.mappings(queries.owners_without_acks()):
        if owner_gone_reason(row, me, now) is None:
            logger.info(
                "a handler of an earlier release is open (pid %s on %s): this drain "
                "commits each item's removal",
                row["pid"],
                row["host"],
            )
            return None
    taken = {row[0] for row in db.all(queries.taken_slots())}
    slot = next(number for number in itertools.count() if number not in taken)
    if not acks.prepare(slot):
        return None
    db.execute(queries.take_slot(), {"slot": slot, "claimer": claimer})
    return slot


def merged_upto(db: Db, acks: AckFile | None, claimer: str) -> int:
    """The last item ``claimer`` recorded as merged in the ack file (0: none)."""
    if acks is None:
        return 0
    slot = db.scalar(queries.slot_of_claimer(), {"claimer": claimer})
    return 0 if slot is None else acks.merged_upto(claimer, slot)


def settle(db: Db, claimer: str, merged_upto: int) -> None:
    """End ``claimer``'s hold: remove its items up to ``merged_upto``, free the rest and
    its slot."""
    _remove_merged(db, claimer, merged_upto)
    db.execute(queries.release_claims(), {"claimer": claimer})
    db.execute(queries.free_slot(), {"claimer": claimer})


def enqueue(db: Db, task_id: str, acks: AckFile | None) -> bool:
    """Queue ``task_id`` for a wake-up merge; False if it is queued already. A row a
    drain may have merged but not deleted yet does not count: it goes, and a new row (a
    new place at the end of the queue) comes, or the drain would delete the new result.
    "May": unless the drain's record shows it has not got that far (a record that cannot
    be read risks a second delivery, not a loss)."""
    params = {"task_id": task_id, "now": db.now}
    if db.changes(queries.enqueue(), params):
        return True
    row = db.first(queries.pending_item_of_task(), {"task_id": task_id})
    if row is None:
        return False
    seq, claimer = row
    slot = None if claimer is None else db.scalar(queries.slot_of_claimer(), {"claimer": claimer})
    if slot is None:
        return False  # free, or held by a drain that deletes each item as it goes (but
        # see README: a push of the very item a consumer holds is absorbed, as always)
    merged = 0 if acks is None else acks.merged_upto(claimer, slot)
    if merged and seq > merged:
        return False  # not handed out yet: the drain delivers it
    db.execute(queries.delete_pending_item(), {"seq": seq})
    db.execute(queries.enqueue(), params)
    return True


def release_gone_claims(db: Db, me: OwnerIdentity, acks: AckFile | None) -> None:
    """Settle the items of drains of other handlers that are gone (at open: so a new
    handler's ``size`` does not count what a killed drain had merged)."""
    _release_dead_claims(db, me, (), utc_now_text(), acks)


def remove_merged_of_owner(db: Db, owner_id: str, acks: AckFile | None) -> None:
    """Remove the items the drains of gone owner ``owner_id`` recorded as merged."""
    if acks is None:
        return
    for (claimer,) in db.all(queries.claimers_of_owner(), {"prefix": owner_id + "/%"}):
        _remove_merged(db, claimer, merged_upto(db, acks, claimer))


def acknowledge(claimer: str, seq: int, db: Db) -> None:
    """Remove item ``seq``, which ``claimer`` holds (its merge is done)."""
    deleted = db.changes(queries.acknowledge_claimed(), {"seq": seq, "claimer": claimer})
    if deleted == 0:
        logger.warning(
            "pending item %d was taken over by another drain while this one held it "
            "(this process was thought gone): it may be merged twice",
            seq,
        )


def any_free_item(db: Db, me: OwnerIdentity, live: Collection[str]) -> bool:
    """Whether an item is free to drain, counting those a gone drain still holds."""
    if db.scalar(queries.has_free_pending()):
        return True
    return bool(_gone_claimers(db, me, live, utc_now_text(), with_slots=False))


def _remove_merged(db: Db, claimer: str, upto: int) -> None:
    """Remove the items ``claimer`` holds up to enqueue number ``upto`` (0: none)."""
    if upto:
        db.execute(queries.acknowledge_claimed_upto(), {"claimer": claimer, "seq": upto})


def _release_dead_claims(
    db: Db, me: OwnerIdentity, live: Collection[str], now: str, acks: AckFile | None
) -> None:
    for claimer, reason in _gone_claimers(db, me, live, now):
        logger.warning("released pending items held by a gone drain (%s)", reason)
        settle(db, claimer, merged_upto(db, acks, claimer))


def _gone_claimers(
    db: Db, me: OwnerIdentity, live: Collection[str], now: str, *, with_slots: bool = True
) -> list[tuple[str, str]]:
    """Drains that hold items (or, ``with_slots``, an ack-file slot) and are gone (see
    the module docstring), with why."""
    held = [row[0] for row in db.all(queries.claimers())]
    if with_slots:
        held = list(dict.fromkeys(held + [row[0] for row in db.all(queries.slot_claimers())]))
    mine = me.owner_id + "/"
    gone = [
        (claimer, "a drain of this handler ended without freeing them")
        for claimer in held
        if claimer.startswith(mine) and claimer not in live
    ]
    others = [claimer for claimer in held if not claimer.startswith(mine)]
    if not others:
        return gone
    owners_by_id = owner_rows(db)
    for claimer in others:
        owner_row = owners_by_id.get(claimer.split("/", 1)[0])
        reason = owner_gone_reason(owner_row, me, now)
        if reason is not None:
            gone.append((claimer, reason))
    return gone
