"""Helpers for the tests that drive ``OverlayFS`` in process (imported by them; not a
test file)."""

from __future__ import annotations

import os

from layerstore.overlay.fs import OverlayFS


def read_all(ofs: OverlayFS, vpath: bytes) -> bytes:
    """The whole content of ``vpath`` through an open handle."""
    fh = ofs.open(vpath, os.O_RDONLY)
    try:
        out, off = [], 0
        while True:
            b = ofs.read(fh, 1 << 20, off)
            if not b:
                return b"".join(out)
            out.append(b)
            off += len(b)
    finally:
        ofs.release(fh)


def count_lower_reads(ofs: OverlayFS, monkeypatch) -> list[tuple]:
    """Record every read of lower file data (reads, and whole-file copies)."""
    reads: list[tuple] = []
    read, copy = ofs.lowers.read, ofs.lowers.copy_to
    monkeypatch.setattr(ofs.lowers, "read", lambda n, o, s: reads.append((n.vpath, o, s)) or read(n, o, s))
    monkeypatch.setattr(ofs.lowers, "copy_to", lambda n, fd, *a: reads.append((n.vpath, "copy")) or copy(n, fd, *a))
    return reads
