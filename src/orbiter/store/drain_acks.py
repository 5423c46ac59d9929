"""How far each drain has got, in a small file beside the database (``<db>-acks``).

A drain removes an item from the queue once the consumer asks for the next one, and the
removal must outlive a killed process. Committing a ``DELETE`` per item costs a SQLite
commit each (about 30 us); writing "done up to item *seq*" into this file costs one
``pwrite`` (about 1 us) and outlives the process just as well: the kernel holds the
written page, whatever happens to the process after the call returns. The drain deletes
the items it recorded in bulk, inside its next claim's transaction and when it ends, and
whoever frees the items of a drain that died (see ``claims.py``) first deletes those its
record says were merged.

The file is an array of 32-byte slots, each holding one record: the drain's key (a hash
of its claimer name), the last ``seq`` it acknowledged, and a check word. A drain takes a
slot in the transaction of its first claim, while it holds SQLite's write lock: a slot
is free unless its record belongs to a drain that holds items. A record is valid only for
the drain whose key it carries, so a slot's earlier owner never leaks into the next one.

What it does not cover: the file is not fsynced, so after a power loss (or a copy of the
database without it) items merged since their drain's last claim may be delivered again
(at-least-once, as for the item in hand), never lost. A file that cannot be opened
makes drains commit each removal instead (``None`` from :meth:`AckFile.take_slot`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from collections.abc import Collection
from pathlib import Path

__all__ = ["AckFile", "claimer_key"]

logger = logging.getLogger(__name__)

_RECORD = struct.Struct("<QqQ")  # key, acknowledged seq, check
SLOT_BYTES = 32  # a record per slot, never across a page boundary
_MAGIC = 0x6F7262697465722D  # b"orbiter-": a zeroed or foreign slot does not check out


def claimer_key(claimer: str) -> int:
    """The 64-bit key (never 0) under which ``claimer``'s progress is recorded."""
    digest = hashlib.blake2b(claimer.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") | 1


def _pack(key: int, seq: int) -> bytes:
    return _RECORD.pack(key, seq, key ^ seq ^ _MAGIC)  # seq >= 0: enqueue numbers


class AckFile:
    """The ``<db>-acks`` file of one database, opened on first use.

    :meth:`take_slot`, :meth:`acknowledged` run on the commit worker, inside its
    transaction; :meth:`record` runs wherever the drain runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _open(self, *, create: bool) -> int | None:
        with self._lock:
            if self._fd is None and not self._closed:
                flags = os.O_RDWR | (os.O_CREAT if create else 0)
                try:
                    self._fd = os.open(self.path, flags, 0o600)
                except FileNotFoundError:
                    if create:
                        raise
                    return None
            return self._fd

    def take_slot(self, claimer: str, holding: Collection[str]) -> int | None:
        """Give ``claimer`` a slot no drain in ``holding`` (those that hold items) uses,
        recorded as having acknowledged nothing; None if the file cannot be used."""
        try:
            fd = self._open(create=True)
            if fd is None:
                return None
            keys = {claimer_key(other) for other in holding}
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            count = _slot_count(data)
            slot = next((i for i in range(count) if _valid_key(data, i) not in keys), count)
            os.pwrite(fd, _pack(claimer_key(claimer), 0), slot * SLOT_BYTES)
        except OSError as exc:
            logger.warning(
                "cannot use %s (%s): drains commit each item's removal instead", self.path, exc
            )
            return None
        return slot

    def record(self, slot: int, key: int, seq: int) -> None:
        """Record that the drain with ``key`` in ``slot`` merged every item up to ``seq``
        (raises ``OSError`` if the write fails; the record before it stays valid)."""
        with self._lock:  # not while close() hands the descriptor back
            if self._fd is None:
                raise OSError(f"{self.path} is closed")
            os.pwrite(self._fd, _pack(key, seq), slot * SLOT_BYTES)

    def acknowledged(self, claimer: str) -> int:
        """The last ``seq`` ``claimer`` recorded as merged (0: none, or none readable)."""
        try:
            fd = self._open(create=False)
            if fd is None:
                return 0
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        except OSError as exc:
            logger.warning("cannot read %s (%s): a drain's progress is lost", self.path, exc)
            return 0
        key = claimer_key(claimer)
        for slot in range(_slot_count(data)):
            if _valid_key(data, slot) == key:
                return int(_RECORD.unpack_from(data, slot * SLOT_BYTES)[1])
        return 0

    def close(self) -> None:
        """Close the file (drains of a closed handler write nothing more)."""
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _slot_count(data: bytes) -> int:
    """Slots in the file's ``data`` (the last one holds a record but no padding)."""
    return -(-len(data) // SLOT_BYTES)


def _valid_key(data: bytes, slot: int) -> int | None:
    """The key of the record in ``slot``, or None if the slot holds no valid record."""
    offset = slot * SLOT_BYTES
    if offset + _RECORD.size > len(data):
        return None
    key, seq, check = _RECORD.unpack_from(data, offset)
    if key == 0 or check != key ^ seq ^ _MAGIC:  # (a negative seq never checks out)
        return None
    return int(key)
