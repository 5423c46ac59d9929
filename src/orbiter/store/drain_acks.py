"""How far each drain has got, in a small file beside the database (``<db>-acks``).

A drain removes an item from the queue once the consumer asks for the next one, and the
removal must outlive a killed process. Committing a ``DELETE`` per item costs a SQLite
commit each (about 30 us); writing "merged up to item *seq*" into this file costs one
``pwrite`` (about 1 us) and outlives the process just as well: the kernel holds the
written page, whatever happens to the process after the call returns. The drain deletes
the items it recorded in bulk, inside its next claim's transaction and when it ends, and
whoever frees the items of a drain that died (see ``claims.py``) first deletes those its
record says were merged.

The file is an array of 32-byte slots, each holding one record: the drain's key (a hash
of its claimer name), the last ``seq`` it merged, and a check word. Which drain owns which
slot is kept in the database (table ``drain_slots``), taken in the transaction of the
drain's first claim, so a claim that rolls back takes no slot; the drain writes its slot
only after that claim committed. A record counts only for the drain whose key it carries,
so what a slot's earlier owner left there never passes for the new owner's progress.

What it does not cover: the file is not fsynced, so after a power loss (or a copy of the
database without it) items merged since their drain's last claim may be delivered again
(at-least-once, as for the item in hand), never lost. A file that cannot be opened
makes drains commit each removal instead (:meth:`AckFile.usable` is False).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref
from pathlib import Path
from struct import Struct

__all__ = ["SLOT_BYTES", "AckFile", "claimer_key"]

logger = logging.getLogger(__name__)

_RECORD = Struct("<QqQ")  # key, merged seq, check
SLOT_BYTES = 32  # a record per slot, never across a page boundary
_MAGIC = 0x6F7262697465722D  # b"orbiter-": a zeroed or foreign slot does not check out

#: Every AckFile with a descriptor open, so a forked child can drop its copies.
_OPEN: weakref.WeakSet[AckFile] = weakref.WeakSet()


def claimer_key(claimer: str) -> int:
    """The 64-bit key (never 0) under which ``claimer``'s progress is recorded."""
    digest = hashlib.blake2b(claimer.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") | 1


class AckFile:
    """The ``<db>-acks`` file of one database, opened on first use.

    :meth:`usable` and :meth:`merged_upto` run on the commit worker; :meth:`record`
    wherever the drain runs.
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
                _OPEN.add(self)
            return self._fd

    def usable(self) -> bool:
        """Whether drains can record here (the file opens, created if need be)."""
        try:
            return self._open(create=True) is not None
        except OSError as exc:
            logger.warning(
                "cannot use %s (%s): drains commit each item's removal instead", self.path, exc
            )
            return False

    def record(self, slot: int, key: int, seq: int) -> None:
        """Record that the drain with ``key`` in ``slot`` merged every item up to ``seq``
        (raises ``OSError`` if the write fails; the record before it stays valid)."""
        with self._lock:  # not while close() hands the descriptor back
            if self._fd is None:
                raise OSError(f"{self.path} is closed")
            os.pwrite(self._fd, _RECORD.pack(key, seq, key ^ seq ^ _MAGIC), slot * SLOT_BYTES)

    def merged_upto(self, claimer: str, slot: int) -> int:
        """The last ``seq`` ``claimer`` recorded in ``slot`` (0: none, or unreadable)."""
        try:
            fd = self._open(create=False)
            data = b"" if fd is None else os.pread(fd, _RECORD.size, slot * SLOT_BYTES)
        except OSError as exc:
            logger.warning("cannot read %s (%s): a drain's progress is lost", self.path, exc)
            return 0
        if len(data) < _RECORD.size:
            return 0
        key, seq, check = _RECORD.unpack(data)
        if key != claimer_key(claimer) or check != key ^ seq ^ _MAGIC:
            return 0  # not written yet, another drain's, or torn
        return int(seq)

    def close(self) -> None:
        """Close the file (drains of a closed handler write nothing more)."""
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _forget_in_forked_child(self) -> None:
        # The parent's drains own this descriptor: the child's copy writes nothing. (A
        # lock another thread held at the fork stays held in the child: a new one.)
        self._lock = threading.Lock()
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _after_fork_in_child() -> None:
    for acks in list(_OPEN):
        acks._forget_in_forked_child()  # pyright: ignore[reportPrivateUsage]


os.register_at_fork(after_in_child=_after_fork_in_child)
