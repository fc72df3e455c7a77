"""The libfuse3 binding's own protocol code (``layerstore/fuse/binding.py``), without a
mount: attributes written in one ``pack_into`` equal mfusepy's field-by-field ones, and
listings go out in offset mode, so that libfuse passes each entry's attributes on to the
kernel (readdirplus) instead of dropping them."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from layerstore.fuse import binding

pytestmark = pytest.mark.skipif(binding.FUSE_MAJOR != 3, reason="libfuse3 through mfusepy only")

STATS = [
    {"st_ino": 5, "st_mode": 0o100644, "st_nlink": 2, "st_uid": 1000, "st_gid": 100,
     "st_size": 12345, "st_blocks": 32, "st_atime": 1_700_000_000_123_456_789,
     "st_mtime": 1_600_000_000_000_000_001, "st_ctime": 0},
    {"st_ino": 2**63 + 7, "st_mode": 0o020600, "st_rdev": (1 << 8) | 3, "st_nlink": 1,
     "st_uid": 2**32 - 2, "st_gid": 0, "st_mtime": -1_500_000_000, "st_atime": -1,
     "st_ctime": 5, "st_dev": 77, "st_blksize": 4096},
    {"st_mode": 0o040755},
]


@pytest.mark.parametrize("attrs", STATS)
def test_fill_stat_equals_field_by_field(attrs: dict[str, int]):
    fast, slow = binding.fusepy.c_stat(), binding.fusepy.c_stat()
    ctypes.memset(ctypes.byref(fast), 0xAB, ctypes.sizeof(fast))  # every byte written
    binding.fill_stat(fast, attrs)
    binding.fusepy.set_st_attrs(slow, attrs, use_ns=True)
    assert bytes(fast) == bytes(slow)


def test_fill_stat_out_of_range_falls_back():
    st = binding.fusepy.c_stat()
    binding.fill_stat(st, {"st_uid": 2**40, "st_mode": 0o100600})
    assert st.st_mode == 0o100600


class _Ops:
    def __init__(self, listing: list[tuple[str, Any, int]]):
        self.listing = listing
        self.listed = 0
        self.released: list[int] = []

    def opendir(self, path: str) -> int:
        return 42

    def readdir(self, path: str, fh: int) -> list[tuple[str, Any, int]]:
        assert fh == 42
        self.listed += 1
        return list(self.listing)

    def releasedir(self, path: str | None, fh: int) -> int:
        self.released.append(fh)
        return 0


def _fuse(ops: _Ops) -> Any:
    """A binding ``FUSE`` that is not mounted (``__init__`` would mount)."""
    f = object.__new__(binding.FUSE)
    f.operations, f.encoding, f.errors = ops, "latin-1", "surrogateescape"
    f._dirs, f._dir_ids = {}, iter(range(1, 100))
    return f


def test_listings_go_out_in_offset_mode_with_attributes():
    entries = [(".", {"st_ino": 1, "st_mode": 0o040755}, 0), ("..", None, 0)]
    entries += [(f"f{i}", {"st_ino": 100 + i, "st_mode": 0o100644, "st_size": i}, 0)
                for i in range(10)]
    ops = _Ops(entries)
    f = _fuse(ops)
    fi = binding.fusepy.fuse_file_info()
    fip = ctypes.pointer(fi)
    assert f.opendir(b"/d", fip) == 0
    sent: list[tuple[str, int | None, int, int]] = []

    def filler(room: int):
        def fill(buf: Any, name: bytes, st: Any, off: int, flags: int) -> int:
            if len(sent) >= room:
                return 1  # the reply buffer is full
            sent.append((name.decode(), st.st_ino if st is not None else None, off, flags))
            return 0
        return fill

    # the kernel asks for the listing in pieces; each starts at the last offset given
    offset = 0
    while True:
        before = len(sent)
        f.readdir_fuse_3(b"/d", None, filler(before + 5), offset, fip,
                         binding.READDIR_PLUS)
        if len(sent) == before:
            break
        offset = sent[-1][2]
    assert ops.listed == 1  # made once per open directory
    assert [s[0] for s in sent] == [e[0] for e in entries]
    assert [s[2] for s in sent] == list(range(1, len(entries) + 1))
    assert sent[0][3] == 0 and sent[1] == ("..", None, 2, 0)  # no attributes for . and ..
    assert all(s[3] == binding.FILL_DIR_PLUS for s in sent[2:])
    assert [s[1] for s in sent[2:]] == [100 + i for i in range(10)]
    # plain READDIR: the same entries and offsets, without FILL_DIR_PLUS
    sent.clear()
    f.readdir_fuse_3(b"/d", None, filler(100), 0, fip, 0)
    assert ops.listed == 2  # offset 0 lists again (rewinddir)
    assert all(s[3] == 0 for s in sent) and len(sent) == len(entries)
    assert f.releasedir(b"/d", fip) == 0
    assert ops.released == [42] and f._dirs == {}


class _AttrOps:
    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        self.asked.append(path)
        return {"st_ino": 1, "st_mode": 0o100644}


def test_getattr_right_after_a_change_takes_what_the_change_gave():
    """libfuse's setattr asks getattr right after chmod/chown/utimens: that one call is
    answered from ``remember_attrs``; any other getattr goes to the operations."""
    ops = _AttrOps()
    f = _fuse(ops)  # type: ignore[arg-type]
    st = binding.fusepy.c_stat()
    changed = {"st_ino": 9, "st_mode": 0o100600, "st_uid": 7}

    def callback(fn: Any) -> Any:  # what the binding's _wrapper counts
        binding._calls.n = getattr(binding._calls, "n", 0) + 1
        return fn()

    callback(lambda: binding.remember_attrs("/a", changed))
    callback(lambda: f.fgetattr(b"/a", ctypes.pointer(st), None))
    assert (st.st_ino, st.st_mode, st.st_uid) == (9, 0o100600, 7) and ops.asked == []
    callback(lambda: f.fgetattr(b"/a", ctypes.pointer(st), None))  # used once only
    assert ops.asked == ["/a"] and st.st_ino == 1
    callback(lambda: binding.remember_attrs("/a", changed))
    callback(lambda: f.fgetattr(b"/b", ctypes.pointer(st), None))  # another path
    callback(lambda: binding.remember_attrs("/a", changed))
    callback(lambda: None)  # another callback came between
    callback(lambda: f.fgetattr(b"/a", ctypes.pointer(st), None))
    assert ops.asked == ["/a", "/b", "/a"] and st.st_ino == 1


def test_later_pieces_carry_attributes_only_while_nothing_changed():
    """A piece after the first sends attributes only if the operations' ``changes()``
    is what it was when the listing was made: the kernel would keep old attributes of
    a file changed (or removed) in between for the attribute timeout."""
    entries = [(f"f{i}", {"st_ino": 100 + i, "st_mode": 0o100644}, 0) for i in range(6)]
    ops = _Ops(entries)
    count = [0]
    ops.changes = lambda: count[0]  # type: ignore[attr-defined]
    f = _fuse(ops)
    fip = ctypes.pointer(binding.fusepy.fuse_file_info())
    f.opendir(b"/d", fip)
    sent: list[tuple[str, int, int]] = []

    def filler(room: int):
        def fill(buf: Any, name: bytes, st: Any, off: int, flags: int) -> int:
            if len(sent) >= room:
                return 1
            sent.append((name.decode(), off, flags))
            return 0
        return fill

    f.readdir_fuse_3(b"/d", None, filler(2), 0, fip, binding.READDIR_PLUS)
    f.readdir_fuse_3(b"/d", None, filler(4), 2, fip, binding.READDIR_PLUS)  # unchanged
    count[0] += 1  # something changed through the mount
    f.readdir_fuse_3(b"/d", None, filler(6), 4, fip, binding.READDIR_PLUS)
    assert [s[0] for s in sent] == [e[0] for e in entries] and ops.listed == 1
    assert [s[2] for s in sent] == [binding.FILL_DIR_PLUS] * 4 + [0, 0]
    # listed again from the start: attributes again
    sent.clear()
    f.readdir_fuse_3(b"/d", None, filler(6), 0, fip, binding.READDIR_PLUS)
    assert [s[2] for s in sent] == [binding.FILL_DIR_PLUS] * 6 and ops.listed == 2
