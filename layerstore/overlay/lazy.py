"""Lazy, block-level copy-up (DESIGN.md §4, mode 3): an upper file whose data is partly
still in the lowers.

The first write to a big lower file (``LAZY_MIN`` or more) does not copy the file: the
upper file is made sparse at the full size and marked with ``LAZY_XATTR``, and every
write first fills only the units (``unit`` bytes, 256 KiB or more, aligned) it touches
but does not cover, from the lowers. A read takes each unit from the upper file when it
has been filled and from the lowers when not. When every unit is filled the mark goes
and the file is an ordinary upper file.

The mark (one xattr, so it changes atomically): version, log2 of the unit, ``limit``,
the lower path with the data (absolute, so renames and links need no redirect), and a
bitmap of the filled units. ``limit`` is where the lower data ends: the lower file's
size, lowered by a truncate to a smaller size (what lies past it reads from the upper
file, so a file truncated and extended again reads zeros there). The order of every
change keeps the file right after a crash at any point: the data of a unit is written
before its bit is set, so a unit is taken from the upper file only once it is complete.

Kernel overlayfs does not know this mark (no peer has this mode): it would read the
unfilled units as zeros. ``layerstore commit``/``diff`` read such files through this
module; ``OverlayFS.materialize`` fills them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ..store.records import REG
from .lower import MergedLowers, Node

#: ours, under ``trusted.overlay.`` like the origin, so containers neither see nor forge it
LAZY_XATTR = b"trusted.overlay.layerstore.lazy"
#: lower files smaller than this are copied whole on the first write (cheap enough)
LAZY_MIN = 1 << 20
#: the smallest unit of a lazy copy-up (a write fills at most two of these)
UNIT_MIN_LOG2 = 18
#: the bitmap stays within this many bits (2 KiB, well inside ext4's in-inode xattr
#: space): files over 4 GiB get bigger units
MAX_UNITS = 16384

_HEAD = struct.Struct(">BBQH")  # version, unit log2, limit, length of the source path
_VERSION = 1


def unit_log2(size: int) -> int:
    """The unit (log2 of its bytes) of a lazy copy-up of a ``size``-byte file."""
    log2 = UNIT_MIN_LOG2
    while (size + (1 << log2) - 1) >> log2 > MAX_UNITS:
        log2 += 1
    return log2


@dataclass
class LazyFile:
    """The in-memory state of one lazily copied-up upper inode (shared by its handles
    and hard links)."""

    source: bytes  #: the lower path with the data
    node: Node  #: the lower file at ``source``
    limit: int  #: lower data ends here (see module doc)
    log2: int  #: unit = 1 << log2 bytes
    bits: bytearray = field(default_factory=bytearray)  #: filled units
    done: bool = False  #: every unit filled: the mark is gone, the upper file is whole
    missing: int = -1  #: units below ``limit`` not filled yet

    def __post_init__(self) -> None:
        self._count()

    def _count(self) -> None:
        units = (self.limit + self.unit - 1) >> self.log2
        self.missing = sum(1 for u in range(units) if not self.filled(u))

    @classmethod
    def new(cls, node: Node, limit: int | None = None) -> LazyFile:
        """Nothing filled yet; lower data up to ``limit`` (default: all of it)."""
        size = node.entry.size
        log2 = unit_log2(size)
        units = (size + (1 << log2) - 1) >> log2
        return cls(node.vpath, node, size if limit is None else min(limit, size), log2,
                   bytearray((units + 7) // 8))

    @property
    def unit(self) -> int:
        return 1 << self.log2

    def encode(self) -> bytes:
        return _HEAD.pack(_VERSION, self.log2, self.limit, len(self.source)) + self.source \
            + bytes(self.bits)

    @staticmethod
    def decode_head(value: bytes) -> tuple[bytes, int, int, bytes]:
        """(source, limit, log2, bitmap) of a mark; ValueError if it is not one."""
        if len(value) < _HEAD.size:
            raise ValueError("short lazy mark")
        version, log2, limit, n = _HEAD.unpack_from(value)
        if version != _VERSION or not 12 <= log2 <= 40:
            raise ValueError("unknown lazy mark")
        source = value[_HEAD.size:_HEAD.size + n]
        if len(source) != n or not source.startswith(b"/"):
            raise ValueError("bad lazy mark")
        return source, limit, log2, value[_HEAD.size + n:]

    @classmethod
    def load(cls, value: bytes, lowers: MergedLowers, upper_size: int) -> LazyFile:
        """The state a mark ``value`` records, for an upper file of ``upper_size``
        bytes; ValueError if it is not a mark or the lowers do not have its data. The
        limit never exceeds the upper file's size (a crash between a truncate and its
        mark leaves it larger)."""
        source, limit, log2, bits = cls.decode_head(value)
        node = lowers.resolve(source)
        if node is None or node.entry.type != REG:
            raise ValueError("the lowers do not have its data")
        units = (node.entry.size + (1 << log2) - 1) >> log2
        if len(bits) != (units + 7) // 8 or limit > node.entry.size:
            raise ValueError("lazy mark does not fit its lower file")
        return cls(source, node, min(limit, upper_size), log2, bytearray(bits))

    def filled(self, u: int) -> bool:
        return bool(self.bits[u >> 3] & (1 << (u & 7)))

    def _set(self, u: int) -> None:
        if not self.filled(u):
            self.bits[u >> 3] |= 1 << (u & 7)
            if u << self.log2 < self.limit:
                self.missing -= 1

    # --- reading and writing (the caller serialises calls on one LazyFile) -----------

    def read(self, lowers: MergedLowers, fd: int, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset``: filled units and what lies past ``limit``
        from the upper file ``fd``, the rest from the lowers. Short at the upper
        file's end (``limit`` never exceeds it: a truncate lowers it)."""
        end = offset + size
        if self.done or offset >= self.limit:
            return os.pread(fd, size, offset)
        out = []
        pos = offset
        while pos < end:
            if pos >= self.limit:
                out.append(os.pread(fd, end - pos, pos))
                break
            u = pos >> self.log2
            filled = self.filled(u)
            stop = min((u + 1) << self.log2, end)
            while stop < end and stop < self.limit and self.filled(stop >> self.log2) == filled:
                stop = min(stop + self.unit, end)
            if not filled:
                stop = min(stop, self.limit)
            part = (os.pread(fd, stop - pos, pos) if filled
                    else lowers.read(self.node, pos, stop - pos))
            out.append(part)
            if len(part) < stop - pos:  # the upper file ends here
                break
            pos = stop
        return b"".join(out)

    def write(self, lowers: MergedLowers, fd: int, data: bytes, offset: int) -> int:
        """Write ``data`` at ``offset`` into the upper file ``fd``: first the lower data
        of every unfilled unit the write touches but does not cover, then the write,
        then the mark with the new units (so a crash before the mark reads the old
        data). Returns the bytes written."""
        end = offset + len(data)
        touched = []  # (unit, covered by this write)
        if offset < self.limit and data:
            for u in range(offset >> self.log2, ((min(end, self.limit) - 1) >> self.log2) + 1):
                if not self.filled(u):
                    lo, hi = u << self.log2, min((u + 1) << self.log2, self.limit)
                    covered = offset <= lo and end >= hi
                    if not covered:
                        self._fill(lowers, fd, lo, hi)
                    touched.append((u, covered))
        n = os.pwrite(fd, data, offset)
        for u, covered in touched:
            lo, hi = u << self.log2, min((u + 1) << self.log2, self.limit)
            if covered and offset + n < hi:  # a short write left part of it unwritten
                self._fill(lowers, fd, max(lo, offset + n), hi)
            self._set(u)
        if touched:
            self._save(fd)
        return n

    def _fill(self, lowers: MergedLowers, fd: int, lo: int, hi: int) -> None:
        pos = lo
        while pos < hi:
            data = lowers.read(self.node, pos, hi - pos)
            if not data:
                raise OSError(5, "lower file shorter than its entry")  # EIO
            pos += os.pwrite(fd, data, pos)

    def truncate(self, fd: int, length: int) -> None:
        """The upper file is about to be (or was) truncated to ``length``."""
        if length < self.limit:
            self.limit = length
            self._count()
            self._save(fd)

    def materialize(self, lowers: MergedLowers, fd: int) -> None:
        """Fill every unit that is still in the lowers, then drop the mark."""
        units = (self.limit + self.unit - 1) >> self.log2
        for u in range(units):
            if not self.filled(u):
                self._fill(lowers, fd, u << self.log2, min((u + 1) << self.log2, self.limit))
                self._set(u)
        self._save(fd)

    def _save(self, fd: int) -> None:
        if self.missing <= 0:
            try:
                os.removexattr(fd, LAZY_XATTR)
            except OSError as exc:
                if exc.errno != 61:  # ENODATA
                    raise
            self.done = True
        else:
            os.setxattr(fd, LAZY_XATTR, self.encode())
