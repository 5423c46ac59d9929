"""How far each drain has got, in a small file beside the database (``<db>-acks``).

A drain removes an item from the queue once the consumer asks for the next one, and the
removal must outlive a killed process. Committing a ``DELETE`` per item costs a SQLite
commit each (about 30 us); storing "merged up to item *seq*" into this file, mapped into
memory, costs about 0.2 us and outlives the process just as well: the page belongs to
the kernel's page cache, whatever happens to the process after the store. The drain
deletes the items it recorded in bulk, inside its next claim's transaction and when it
ends, and whoever frees the items of a drain that died (see ``claims.py``) first deletes
those its record says were merged.

The file is an array of 64-byte slots, each holding two records that the drain writes in
turn: the drain's key (a hash of its claimer name), the last ``seq`` it merged, and a
check word; a reader takes the newer valid one, so a record torn by a kill mid-copy
costs one item's progress, never a wrong one. Which drain owns which slot is kept in the
database (table ``drain_slots``), taken in the transaction of the drain's first claim,
so a claim that rolls back takes no slot; the drain writes its slot only after that
claim committed. A record counts only for the drain whose key it carries, so what a
slot's earlier owner left there never passes for the new owner's progress.

What it does not cover: the file is not fsynced, so after a power loss (or a copy of the
database without it) items merged since their drain's last claim may be delivered again
(at-least-once, as for the item in hand), never lost. The file only grows, by zeros
written to disk before a slot is used (so a full disk shows as a refused slot, and the
drain commits each removal instead); shrinking it under a running drain (by hand) would
crash that process with SIGBUS, as with SQLite's own ``-shm``.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import stat
import threading
import weakref
from pathlib import Path
from struct import Struct

__all__ = ["HALF_BYTES", "SLOT_BYTES", "AckFile", "claimer_key"]

logger = logging.getLogger(__name__)

_RECORD = Struct("<QqQ")  # key, merged seq, check
HALF_BYTES = 32  # one record, never across a page boundary
SLOT_BYTES = 2 * HALF_BYTES  # a drain writes its two records in turn (see record())
_PAGE = mmap.PAGESIZE
_MAGIC = 0x6F7262697465722D  # b"orbiter-": a zeroed or foreign record does not check out

#: Every AckFile with the file open, so a forked child can drop its copies.
_OPEN: weakref.WeakSet[AckFile] = weakref.WeakSet()


def claimer_key(claimer: str) -> int:
    """The 64-bit key (never 0) under which ``claimer``'s progress is recorded."""
    digest = hashlib.blake2b(claimer.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") | 1


class AckFile:
    """The ``<db>-acks`` file of one database, opened on first use.

    :meth:`prepare` and :meth:`merged_upto` run on the commit worker; :meth:`record`
    wherever the drain runs.
    """

    @classmethod
    def beside(cls, database: Path | str) -> AckFile:
        """The ack file of the database file at ``database``: ``<database>-acks``."""
        return cls(Path(f"{database}-acks"))

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._map: mmap.mmap | None = None  # the file's first len(_map) bytes, shared
        self._lock = threading.Lock()
        self._closed = False

    def _open(self) -> int | None:
        """The descriptor, the file created if need be (``self._lock`` held); None once
        this object is closed."""
        if self._fd is None and not self._closed:
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT)
            _OPEN.add(self)
        return self._fd

    def prepare(self, slot: int) -> bool:
        """Make ``slot`` writable: create the file, grow it with zeros written to disk
        (so a full disk shows here, not as a lost write later), map it. False, with a
        warning, if that fails: the drain then commits each removal instead.

        Runs inside each claim's transaction: SQLite's write lock keeps another process
        from growing the file at the same time, and below its end nothing is written. A
        file deleted or replaced since it was opened is let go of, and the one now at the
        path used (as large as the old mapping, for this handler's other drains): records
        written to a file no reader finds would bring their items back after a kill."""
        need = (slot + 1) * SLOT_BYTES
        try:
            with self._lock:
                if self._fd is not None and not self._is_at_path(self._fd):
                    if self._map is not None:
                        need = max(need, len(self._map))
                    self._release()
                fd = self._open()
                if fd is None:
                    raise OSError(f"{self.path} is closed")
                if self._map is not None and len(self._map) >= need:
                    return True
                size = os.fstat(fd).st_size
                if size < need:
                    grown = -(-need // _PAGE) * _PAGE
                    os.pwrite(fd, bytes(grown - size), size)
                    size = grown
                old, self._map = self._map, mmap.mmap(fd, size)
                if old is not None:
                    old.close()
        except (OSError, ValueError) as exc:
            logger.warning(
                "cannot use %s (%s): drains commit each item's removal instead", self.path, exc
            )
            return False
        return True

    def _is_at_path(self, fd: int) -> bool:
        """Whether ``fd`` is the file now at the path (not deleted or replaced since)."""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def record(self, slot: int, key: int, seq: int, turn: int) -> None:
        """Record that the drain with ``key`` in ``slot`` merged every item up to ``seq``.

        A store into the shared mapping (~0.2 us), which the kernel keeps whatever then
        happens to the process, like a write. The drain alternates ``turn`` (0, 1): a
        process killed in the middle of copying one record leaves that one torn and the
        other, one item older, intact. Raises ``OSError`` once the file is closed."""
        with self._lock:  # not while close() or prepare() replaces the mapping
            mapped = self._map
            if mapped is None:
                raise OSError(f"{self.path} is closed")
            offset = slot * SLOT_BYTES + turn * HALF_BYTES
            if offset + _RECORD.size > len(mapped):  # (prepare() keeps this from happening)
                raise OSError(f"{self.path}: slot {slot} is past the mapped file")
            mapped[offset : offset + _RECORD.size] = _RECORD.pack(key, seq, key ^ seq ^ _MAGIC)

    def merged_upto(self, claimer: str, slot: int) -> int:
        """The last ``seq`` ``claimer`` recorded in ``slot`` (0: none, or unreadable).

        Reads the file now at the path (opened for each read: one deleted or replaced
        since this handler opened it is not the one drains now write)."""
        try:
            fd = _open_regular(self.path, os.O_RDONLY)
            try:
                data = os.pread(fd, SLOT_BYTES, slot * SLOT_BYTES)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            logger.warning("cannot read %s (%s): a drain's progress is lost", self.path, exc)
            return 0
        key = claimer_key(claimer)
        merged = 0
        for offset in range(0, len(data) - _RECORD.size + 1, HALF_BYTES):
            owner, seq, check = _RECORD.unpack_from(data, offset)
            if owner == key and check == key ^ seq ^ _MAGIC:  # else another's, or torn
                merged = max(merged, int(seq))
        return merged

    def close(self) -> None:
        """Close the file (drains of a closed handler write nothing more)."""
        with self._lock:
            self._closed = True
            self._release()

    def _release(self) -> None:
        mapped, self._map = self._map, None
        fd, self._fd = self._fd, None
        if mapped is not None:
            mapped.close()
        if fd is not None:
            os.close(fd)

    def _forget_in_forked_child(self) -> None:
        # The parent's drains own the file: the child's copy writes nothing. (A lock
        # another thread held at the fork stays held in the child: a new one.)
        self._lock = threading.Lock()
        self._closed = True
        self._release()


def _open_regular(path: Path, flags: int) -> int:
    """Open ``path`` (created ``0600`` with ``O_CREAT``), refusing anything but a regular
    file: not a symlink swapped in (whose target the drain would overwrite), nor a FIFO
    (which would block the commit thread)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def _after_fork_in_child() -> None:
    for acks in list(_OPEN):
        acks._forget_in_forked_child()  # pyright: ignore[reportPrivateUsage]


os.register_at_fork(after_in_child=_after_fork_in_child)
