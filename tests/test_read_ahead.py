"""Reading lower files ahead from the store (``StoreLayers._read_ahead``, ``Env.read_ahead``).

The store's map has no kernel readahead (B-tree lookups touch scattered pages), so a
reader of a whole lower file asks for the store's next bytes itself: what follows the
chunk it has just read in data.mdb, where the import put the file's next chunks.
"""

from __future__ import annotations

import os
import random
from bisect import bisect_right
from pathlib import Path

import pytest
from helpers_images import reg, tar_bytes

from layerstore.overlay.fs import FULL, OverlayFS
from layerstore.overlay.lower import READ_AHEAD, MergedLowers, StoreLayers
from layerstore.store import Store
from layerstore.store.images import resolve

BIG = 12 << 20


@pytest.fixture
def lowers(tmp_path: Path, cli, root: Path):
    rnd = random.Random(7)
    tar = tmp_path / "layer.tar"
    tar.write_bytes(tar_bytes([reg("big", rnd.randbytes(BIG)), reg("small", b"s" * 4096)]))
    cli("import", tar, "--tag", "ra:1")
    store = Store.open(root)
    with store.env.read() as txn:
        img = resolve(txn, store.env, "ra:1")
    view = MergedLowers(StoreLayers(store, img.diff_ids))
    yield view
    store.close()


def spy(view: MergedLowers, monkeypatch) -> list[tuple[int, int]]:
    asked: list[tuple[int, int]] = []
    env = view.layers.store.env
    real = env.read_ahead
    monkeypatch.setattr(env, "read_ahead", lambda off, n: asked.append((off, n)) or real(off, n))
    return asked


def chunk_offsets(view: MergedLowers, vpath: bytes) -> list[tuple[int, int]]:
    """(offset in data.mdb, length) of each stored chunk value of a lower file."""
    env = view.layers.store.env
    rec, _ = view.layers._file(view.resolve(vpath).entry.digest)
    out = []
    with env.read(buffers=True) as txn:
        for d, _n in rec.chunks:
            value = txn.get(d, db=env.db("chunks"))
            off = env.map_offset(value)
            assert off is not None
            with open(env.path / "data.mdb", "rb") as f:
                f.seek(off)
                assert f.read(64) == bytes(value[:64])  # the offset is where the value is
            out.append((off, len(value)))
    return out


def read_seq(view: MergedLowers, vpath: bytes, piece: int, start: int = 0) -> bytes:
    node = view.resolve(vpath)
    out, off = [], start
    while True:
        b = view.read(node, off, piece)
        if not b:
            return b"".join(out)
        out.append(b)
        off += len(b)


def test_import_keeps_a_files_chunks_in_order(lowers: MergedLowers):
    offs = chunk_offsets(lowers, b"/big")
    assert len(offs) > 50
    # one after the other in the store's file: what read-ahead relies on
    assert all(a + n <= b for (a, n), (b, _) in zip(offs, offs[1:]))
    assert offs[-1][0] - offs[0][0] < 2 * BIG


def test_a_sequential_reader_asks_ahead_within_the_file(lowers: MergedLowers, monkeypatch):
    asked = spy(lowers, monkeypatch)
    data = read_seq(lowers, b"/big", 128 << 10)
    assert len(data) == BIG
    offs = chunk_offsets(lowers, b"/big")
    first, last_end = offs[0][0], offs[-1][0] + offs[-1][1]
    ahead = [(o, n) for o, n in asked if n > (1 << 20)]  # not a guess for one chunk
    assert ahead, "no read-ahead for a sequential reader"
    assert all(n <= READ_AHEAD for _, n in asked)
    # forward, each region asked for once, within the file's stored bytes (the last
    # request may pass its end by less than one chunk: it is sized in file bytes
    # from the read's end, and starts after the chunk that holds that end)
    slack = (256 << 10) + len(offs)
    assert all(a + n <= b for (a, n), (b, _) in zip(ahead, ahead[1:]))
    assert all(first - (1 << 20) <= o and o + n <= last_end + slack for o, n in asked)
    assert sum(n for _, n in ahead) <= last_end - first + slack
    assert sum(n for _, n in asked) <= 2 * (last_end - first)


def test_random_reads_ask_only_where_the_chunk_is(lowers: MergedLowers, monkeypatch):
    asked = spy(lowers, monkeypatch)
    node = lowers.resolve(b"/big")
    offs = chunk_offsets(lowers, b"/big")
    rec, starts = lowers.layers._file(node.entry.digest)
    # far from each other (a read near the furthest one so far counts as sequential)
    for off in (5 << 20, 1 << 20, 19 << 19, 3 << 20, 29 << 18):
        before = len(asked)
        assert len(lowers.read(node, off, 4096)) == 4096
        if off == 5 << 20:
            assert len(asked) == before  # nothing known about the file yet
            continue
        # one request, around the stored chunk: guessed from the chunk read before
        assert len(asked) == before + 1
        o, n = asked[-1]
        at, vlen = offs[bisect_right(starts, off) - 1]
        assert o <= at and at + vlen <= o + n
        assert n < READ_AHEAD // 2
    assert read_seq(lowers, b"/small", 1 << 20) == b"s" * 4096
    assert all(n < READ_AHEAD // 2 for _, n in asked)


def test_full_copy_up_asks_ahead_and_not_past_the_file(lowers: MergedLowers, tmp_path: Path,
                                                       monkeypatch):
    asked = spy(lowers, monkeypatch)
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    ofs = OverlayFS(lowers, tmp_path / "u", tmp_path / "w", FULL)
    try:
        fh = ofs.open(b"/small", os.O_WRONLY)
        ofs.release(fh)
        assert asked == []  # one chunk: nothing to ask for
        fh = ofs.open(b"/big", os.O_WRONLY)
        ofs.release(fh)
    finally:
        ofs.close()
    by_copy = list(asked)
    assert (tmp_path / "u/big").read_bytes() == read_seq(lowers, b"/big", 1 << 20)
    offs = chunk_offsets(lowers, b"/big")
    assert by_copy and sum(n for _, n in by_copy) <= offs[-1][0] + offs[-1][1] - offs[0][0]
    assert all(a + n <= b for (a, n), (b, _) in zip(by_copy, by_copy[1:]))
