"""Reading lower files ahead from the store (``StoreLayers._read_ahead``, ``Env.read_ahead``).

The store's map has no kernel readahead (B-tree lookups touch scattered pages), so a
reader of a whole lower file asks for the store's next bytes itself: what follows the
chunk it has just read in data.mdb, where the import put the file's next chunks.
"""

from __future__ import annotations

import os
import random
import threading
import time
from bisect import bisect_right
from pathlib import Path

import pytest
from helpers_images import reg, tar_bytes

from layerstore.overlay import lower as lower_mod
from layerstore.overlay.fs import FULL, OverlayFS
from layerstore.overlay.lower import (
    PLACED_AHEAD_FIRST,
    READ_AHEAD,
    MergedLowers,
    StoreLayers,
    _next_request,
    _Runs,
)
from layerstore.store import Store
from layerstore.store.chunks import decode_chunk
from layerstore.store.images import resolve
from layerstore.store.txn import READ_AHEAD_INLINE, WARM_THREADS_MAX, Env

BIG = 12 << 20
HUGE = 40 << 20  # more than one of copy_to's requests (16 MiB)


@pytest.fixture
def lowers(tmp_path: Path, cli, root: Path):
    rnd = random.Random(7)
    big = rnd.randbytes(BIG)
    tar = tmp_path / "layer.tar"
    tar.write_bytes(tar_bytes([reg("big", big), reg("small", b"s" * 4096),
                               reg("huge", rnd.randbytes(HUGE))]))
    cli("import", tar, "--tag", "ra:1")
    # a second image: 2 MiB of new data, then the content of /big (stored already, so
    # the file's tail lies before its head in data.mdb)
    tar2 = tmp_path / "layer2.tar"
    tar2.write_bytes(tar_bytes([reg("shared", rnd.randbytes(2 << 20) + big)]))
    cli("import", tar2, "--tag", "ra:2")
    store = Store.open(root)
    views = {}
    for ref in ("ra:1", "ra:2"):
        with store.env.read() as txn:
            img = resolve(txn, store.env, ref)
        views[ref] = MergedLowers(StoreLayers(store, img.diff_ids))
    yield views["ra:1"]
    store.close()


def covered(asked: list[tuple[int, int]], offs: list[tuple[int, int]]) -> list[int]:
    """The indexes of the chunks whose stored value the requests did not cover (all of
    them together: a value may span two adjacent requests)."""
    merged: list[list[int]] = []
    for a, m in sorted(asked):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], a + m)
        else:
            merged.append([a, a + m])
    return [i for i, (o, n) in enumerate(offs)
            if not any(lo <= o and o + n <= hi for lo, hi in merged)]


def spy(view: MergedLowers, monkeypatch) -> list[tuple[int, int]]:
    """What is asked of data.mdb ahead of its reads, by the read-ahead thread or at
    once (``read_now``: a first read's own chunks)."""
    asked: list[tuple[int, int]] = []
    env = view.layers.store.env
    for name in ("read_ahead", "read_now"):
        real = getattr(env, name)
        monkeypatch.setattr(env, name, lambda off, n, real=real: asked.append((off, n))
                            or real(off, n))
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
                n = min(64, len(value))
                assert f.read(n) == bytes(value[:n])  # the offset is where the value is
            out.append((off, len(value)))
    return out


def no_places(monkeypatch) -> None:
    """Read as a store without ``places`` records is read (LMDB 1.0's file format,
    another py-lmdb): what a chunk's place tells about the next ones."""
    monkeypatch.setattr(StoreLayers, "_placed", lambda self, digest, rec: None)


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
    no_places(monkeypatch)
    asked = spy(lowers, monkeypatch)
    data = read_seq(lowers, b"/big", 128 << 10)
    assert len(data) == BIG
    offs = chunk_offsets(lowers, b"/big")
    first, last_end = offs[0][0], offs[-1][0] + offs[-1][1]
    ahead = [(o, n) for o, n in asked if n > (1 << 20)]  # not a guess for one chunk
    assert ahead, "no read-ahead for a sequential reader"
    assert all(n <= READ_AHEAD for _, n in asked)
    # forward, each region asked for once, about within the file's stored bytes (a
    # request is sized from the file bytes left, plus a quarter for the values' page
    # rounding, so the last ones may pass the end by a little)
    slack = 1 << 20
    assert all(a + n <= b for (a, n), (b, _) in zip(ahead, ahead[1:]))
    assert all(first - (1 << 20) <= o and o + n <= last_end + slack for o, n in asked)
    assert sum(n for _, n in ahead) <= last_end - first + slack
    assert sum(n for _, n in asked) <= 2 * (last_end - first)
    # every chunk after the first few was asked for by read-ahead
    assert [i for i in covered(ahead, offs) if offs[i][0] >= first + (1 << 20)] == []


def test_reading_again_from_the_start_asks_again(lowers: MergedLowers, monkeypatch):
    no_places(monkeypatch)
    read_seq(lowers, b"/big", 128 << 10)
    lowers.layers._chunks.clear()  # the chunk cache forgot the file
    asked = spy(lowers, monkeypatch)
    read_seq(lowers, b"/big", 128 << 10)
    offs = chunk_offsets(lowers, b"/big")
    ahead = [(o, n) for o, n in asked if n > (1 << 20)]  # not the per-chunk guesses
    assert [i for i in covered(ahead, offs) if offs[i][0] >= offs[0][0] + (1 << 20)] == []


def test_a_tail_stored_earlier_is_asked_for_too(lowers: MergedLowers, root: Path, monkeypatch):
    no_places(monkeypatch)
    store = lowers.layers.store
    with store.env.read() as txn:
        img = resolve(txn, store.env, "ra:2")
    view = MergedLowers(StoreLayers(store, img.diff_ids))
    offs = chunk_offsets(view, b"/shared")
    head_end = offs[0][0] + (2 << 20)
    assert any(o < offs[0][0] for o, _ in offs)  # the shared tail lies before the head
    asked = spy(view, monkeypatch)
    assert len(read_seq(view, b"/shared", 128 << 10)) == (2 << 20) + BIG
    # after the jump back to the shared tail, read-ahead (not only the per-chunk
    # guesses) goes on there
    ahead = [(o, n) for o, n in asked if n > (1 << 20)]
    tail = [i for i, (o, _) in enumerate(offs) if o < head_end - (2 << 20)]
    missed = [i for i in covered(ahead, offs) if i in tail]
    assert len(missed) <= 8, missed


def test_random_reads_ask_only_where_the_chunk_is(lowers: MergedLowers, monkeypatch):
    no_places(monkeypatch)
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
        fh = ofs.open(b"/huge", os.O_WRONLY)
        ofs.release(fh)
    finally:
        ofs.close()
    by_copy = list(asked)
    assert (tmp_path / "u/huge").read_bytes() == read_seq(lowers, b"/huge", 1 << 20)
    offs = chunk_offsets(lowers, b"/huge")
    assert by_copy  # the stretch the file's places cover: one request here
    assert sum(n for _, n in by_copy) <= 1.1 * (offs[-1][0] + offs[-1][1] - offs[0][0])
    assert all(a + n <= b for (a, n), (b, _) in zip(by_copy, by_copy[1:]))
    assert covered(by_copy, offs) == []  # all of them asked for, from the places


def test_a_store_behind_a_symlink_still_finds_its_map(cli, root: Path, tmp_path: Path):
    """/proc/self/maps names data.mdb with symlinks resolved."""
    tar = tmp_path / "layer.tar"
    tar.write_bytes(tar_bytes([reg("f", random.Random(1).randbytes(1 << 20))]))
    cli("import", tar, "--tag", "ra:3")
    link = tmp_path / "via-link"
    link.symlink_to(root)
    store = Store.open(link)
    try:
        with store.env.read(buffers=True) as txn:
            key, value = next(iter(txn.cursor(db=store.env.db("chunks"))))
            assert store.env.map_offset(value) is not None
    finally:
        store.close()


def test_files_below_the_minimum_chunk_are_read_by_their_digest(cli, root: Path,
                                                                 tmp_path: Path, monkeypatch):
    """A file smaller than the store's minimum chunk is one chunk named by the file's
    digest: it is read, and copied up, without its file record (and without asking
    ahead); one of exactly the minimum size still goes through the record. Both read
    back whole and in pieces, and copy whole."""
    store = Store.open(root)
    low = store.params.min_size
    rnd = random.Random(3)
    files = {"below": rnd.randbytes(low - 1), "at": rnd.randbytes(low), "one": b"x"}
    tar = tmp_path / "small.tar"
    tar.write_bytes(tar_bytes([reg(n, d) for n, d in files.items()]))
    store.close()
    cli("import", tar, "--tag", "small:1")
    store = Store.open(root)
    try:
        with store.env.read() as txn:
            img = resolve(txn, store.env, "small:1")
        view = MergedLowers(StoreLayers(store, img.diff_ids))
        records: list[bytes] = []
        file_of = view.layers._file
        monkeypatch.setattr(view.layers, "_file",
                            lambda d, size=None: records.append(d) or file_of(d, size))
        for name, data in files.items():
            node = view.lookup(b"/" + name.encode())
            assert view.read(node, 0, 1 << 20) == data
            assert view.read(node, 5, 100) == data[5:105]
            assert read_seq(view, b"/" + name.encode(), 4096) == data
        assert len(records) and all(r == view.lookup(b"/at").entry.digest for r in records)
        records.clear()
        view.layers._files.clear()
        for name, data in files.items():
            out = tmp_path / f"copy-{name}"
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view.copy_to(view.lookup(b"/" + name.encode()), fd)
            finally:
                os.close(fd)
            assert out.read_bytes() == data, name
        assert records == [view.lookup(b"/at").entry.digest]
    finally:
        store.close()


def test_runs_follow_chunks_that_alternate_between_two_places():
    """A file's chunks as a store that has seen a gc or a commit may hold them: two
    runs far apart in data.mdb, the chunks taking turns. Each run is asked for ahead,
    once: only the first chunk of each is not. (The single "what follows the last
    chunk" that came before asked for each run again at every turn: on the benchmark
    store's 256 MiB file, 206 requests for 3,165 MiB instead of 40 for 358.)"""
    rnd = random.Random(3)
    heads = [100 << 20, 140 << 20]
    offs: list[tuple[int, int]] = []
    firsts: dict[int, int] = {}
    for i in range(600):
        k = rnd.randrange(2)
        n = rnd.randrange(20_000, 130_000)
        firsts.setdefault(k, i)
        offs.append((heads[k], n))
        heads[k] += n + (-n) % 4096
    window = 16 << 20
    stored = (heads[0] - (100 << 20)) + (heads[1] - (140 << 20))

    def ask(after) -> list[tuple[int, int]]:
        asked, left = [], sum(n for _, n in offs)
        for at, n in offs:
            left -= n
            request = after(at + n, left) if left > 0 else None
            if request is not None:
                asked.append(request)
        return asked

    asked = ask(_Runs(window).after)
    assert set(covered(asked, offs)) <= set(firsts.values())
    assert sum(n for _, n in asked) <= 1.3 * stored + 2 * window
    to = [-1]

    def single(at: int, left: int) -> tuple[int, int] | None:
        request = _next_request(to[0], at, window, left)
        if request is None:
            return None
        start, to[0] = request
        return start, to[0] - start

    assert sum(n for _, n in ask(single)) > 4 * sum(n for _, n in asked)


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_a_large_read_ahead_fills_the_page_cache_in_a_thread(tmp_path: Path):
    env = Env(tmp_path / "db")
    try:
        size = 3 * READ_AHEAD_INLINE
        env.write(lambda txn: txn.put(b"k", os.urandom(size), db=env.db("chunks")))
        with env.read(buffers=True) as txn:
            value = txn.get(b"k", db=env.db("chunks"))
            at = env.map_offset(value)
            assert at is not None
        fd = os.open(env.path / "data.mdb", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        env._map_ranges = None
        env.release_map()  # nothing of it mapped here: DONTNEED drops it all
        fd = os.open(env.path / "data.mdb", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        last = at + size - 4096
        if env._resident(last):
            pytest.skip("the kernel kept the page cached (cannot make it cold here)")
        env.read_ahead(at, size)
        deadline = time.monotonic() + 10
        while not env._resident(last) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert env._resident(last) and env._resident(at + size // 2)
        assert len(_threads("layerstore read-ahead")) == 1
    finally:
        env.close()
    assert _threads("layerstore read-ahead") == []
    env.read_ahead(0, 8 << 20)  # after close: nothing, no error
    assert _threads("layerstore read-ahead") == []


def test_warm_keys_threads_end_and_close_stops_them(tmp_path: Path):
    env = Env(tmp_path / "db")
    keys = [os.urandom(32) for _ in range(3000)]
    env.write(lambda txn: [txn.put(k, b"v" * 100, db=env.db("chunks")) for k in keys])
    done = env.warm_keys("chunks", keys)
    done()
    assert _threads("layerstore warm keys") == []
    env.warm_keys("chunks", keys * 200)  # still running when the store closes
    env.close()
    assert _threads("layerstore warm keys") == []
    assert env.warm_keys("chunks", keys)() is None  # closed: starts nothing
    assert _threads("layerstore warm keys") == []


def test_warm_threads_are_capped_and_stop_before_a_remap(tmp_path: Path):
    env = Env(tmp_path / "db")
    try:
        keys = [os.urandom(32) for _ in range(2000)]
        env.write(lambda txn: [txn.put(k, b"v" * 100, db=env.db("chunks")) for k in keys])
        for _ in range(5):  # 20 threads asked for
            env.warm_keys("chunks", keys * 500)
        assert 0 < len(_threads("layerstore warm keys")) <= WARM_THREADS_MAX
        # growing the map remaps it: the lookups in flight stop first
        env._set_mapsize(env.env.info()["map_size"] * 2)
        assert _threads("layerstore warm keys") == []
        with env.read() as txn:
            assert txn.get(keys[0], db=env.db("chunks")) == b"v" * 100
    finally:
        env.close()


def test_no_thread_to_start_is_no_error(tmp_path: Path, monkeypatch):
    """Under a pids limit a thread may not start: read-ahead falls back to the
    caller's WILLNEED, key lookups are skipped, and the store still closes."""
    env = Env(tmp_path / "db")
    keys = [os.urandom(32) for _ in range(100)]
    env.write(lambda txn: [txn.put(k, os.urandom(50_000), db=env.db("chunks")) for k in keys])

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    env.read_ahead(0, 8 << 20)
    env.warm_keys("chunks", keys)()
    env.close()
    assert _threads("layerstore read-ahead") == []


def test_locate_map_reads_proc_maps_once(tmp_path: Path, monkeypatch):
    """The daemon's warm-up finds the map (``Env.locate_map``), so a first copy-up does
    not read /proc/self/maps (~0.7 ms) itself."""
    import layerstore.store.txn as txn_mod

    env = Env(tmp_path / "db")
    try:
        env.write(lambda txn: txn.put(b"k", os.urandom(100_000), db=env.db("chunks")))
        env.locate_map()
        monkeypatch.setattr(txn_mod, "_mapped_ranges", lambda path: pytest.fail("read again"))
        with env.read(buffers=True) as txn:
            value = txn.get(b"k", db=env.db("chunks"))
            at = env.map_offset(value)
            assert at is not None
            with open(tmp_path / "db" / "data.mdb", "rb") as f:
                f.seek(at)
                assert f.read(64) == bytes(value[:64])
    finally:
        env.close()


# --- reads of a file whose chunks' places are recorded (``StoreLayers._read_placed``) ---


def test_a_sequential_reader_of_a_placed_file_asks_for_each_stretch_once(
        lowers: MergedLowers, monkeypatch):
    asked = spy(lowers, monkeypatch)
    fetched: list[bytes] = []
    real = lowers.layers._fetch
    monkeypatch.setattr(lowers.layers, "_fetch", lambda d, **kw: fetched.append(d) or real(d, **kw))
    data = read_seq(lowers, b"/huge", 128 << 10)
    assert data == read_seq_by_key(lowers, b"/huge")
    offs = chunk_offsets(lowers, b"/huge")
    assert covered(asked, offs) == []  # every chunk asked for ahead of its reads
    assert all(a + n <= b for (a, n), (b, _) in zip(asked, asked[1:]))  # forward, once
    assert sum(n for _, n in asked) <= 1.1 * (offs[-1][0] + offs[-1][1] - offs[0][0])
    assert len(fetched) <= 1  # from the map, not looked up (but a small tail)
    # 4 MiB of the file first (a reader that stops early asks for little), then more
    assert asked[0][1] <= PLACED_AHEAD_FIRST + (1 << 20)
    assert max(n for _, n in asked) > 2 * PLACED_AHEAD_FIRST
    # again from the start: asked for again (the pages may have gone meanwhile)
    del asked[:]
    assert read_seq(lowers, b"/huge", 1 << 20) == data
    assert covered(asked, offs) == []


def test_random_reads_of_a_placed_file_ask_only_for_their_chunks(lowers: MergedLowers,
                                                                 monkeypatch):
    """A reader that jumps about asks for the value of each chunk it reads the first
    time (its header, first and last page are looked at then: one request rather than
    three 4 KiB faults), and for nothing else; the data comes from the map."""
    asked = spy(lowers, monkeypatch)
    fetched: list[bytes] = []
    real = lowers.layers._fetch
    monkeypatch.setattr(lowers.layers, "_fetch", lambda d, **kw: fetched.append(d) or real(d, **kw))
    node = lowers.resolve(b"/big")
    want = read_seq_by_key(lowers, b"/big")
    offs = chunk_offsets(lowers, b"/big")
    rec, starts = lowers.layers._file(node.entry.digest)
    reads = (5 << 20, 1 << 20, 19 << 19, 3 << 20, 29 << 18, BIG - 100)
    for off in reads:
        assert lowers.read(node, off, 4096) == want[off:off + 4096]
    read_chunks = {bisect_right(starts, off) - 1 for off in reads}
    read_chunks |= {bisect_right(starts, min(off + 4095, BIG - 1)) - 1 for off in reads}
    for o, n in asked:  # each request lies within the value of a chunk that was read
        assert any(at - 4096 <= o and o + n <= at + vlen for i, (at, vlen) in enumerate(offs)
                   if i in read_chunks), (o, n)
    assert len(asked) <= 2 * len(read_chunks)
    pl = lowers.layers._places[node.entry.digest]
    assert pl is not None and all(pl.state[i] == 1 for i in read_chunks)
    assert fetched == []


def test_a_place_that_does_not_fit_is_read_by_key(lowers: MergedLowers, monkeypatch):
    layers = lowers.layers
    node = lowers.resolve(b"/big")
    rec, _ = layers._file(node.entry.digest)
    pl = layers._placed(node.entry.digest, rec)
    assert pl is not None
    at, n, fp = pl.spots[3]
    pl.spots[3] = (at, n, fp ^ 1)  # as if another value had taken its pages
    assert read_seq(lowers, b"/big", 1 << 20) == read_seq_by_key(lowers, b"/big")
    assert pl.state[3] == 2 and pl.state[4] == 1


def test_a_map_moved_during_a_read_is_read_again_by_key(lowers: MergedLowers, monkeypatch):
    layers = lowers.layers
    env = layers.store.env
    real = env.map_view

    def moving(need: int = 0) -> memoryview | None:
        env.map_epoch += 1  # another thread remapped data.mdb while this read ran
        return real(need)

    monkeypatch.setattr(env, "map_view", moving)
    called: list[int] = []
    real_placed = layers._read_placed
    monkeypatch.setattr(layers, "_read_placed",
                        lambda *a: called.append(1) or real_placed(*a))
    assert read_seq(lowers, b"/big", 1 << 20) == read_seq_by_key(lowers, b"/big")
    assert called


def read_seq_by_key(view: MergedLowers, vpath: bytes) -> bytes:
    """A lower file's content from its chunks, each looked up by key."""
    env = view.layers.store.env
    rec, _ = view.layers._file(view.resolve(vpath).entry.digest)
    with env.read() as txn:
        return b"".join(bytes(decode_chunk(txn.get(d, db=env.db("chunks"))))
                        for d, _ in rec.chunks)


def test_a_first_read_asks_for_its_own_chunks_at_once(lowers: MergedLowers, monkeypatch):
    """The first read of a file with places starts the reads of its own chunks in the
    reader's thread (WILLNEED), and of its records, not only the read-ahead window
    behind them: a cold first read waits for those alone."""
    env = lowers.layers.store.env
    now: list[tuple[int, int]] = []  # chunks (asked for unless cached already)
    real = env.read_now
    monkeypatch.setattr(env, "read_now", lambda off, n: now.append((off, n)) or real(off, n))
    records: list[tuple[int, int]] = []  # the file's records
    real_now = env._read_ahead.now
    monkeypatch.setattr(env._read_ahead, "now", lambda off, n: records.append((off, n))
                        or real_now(off, n))
    offs = chunk_offsets(lowers, b"/huge")
    lowers.layers._files.clear()
    lowers.layers._places.clear()
    node = lowers.resolve(b"/huge")
    asked_before_file: list[list[tuple[int, int]]] = []  # when the file record is decoded
    real_decode = lower_mod.FileRecord.decode
    monkeypatch.setattr(lower_mod.FileRecord, "decode", classmethod(
        lambda cls, data: asked_before_file.append(list(records)) or real_decode(data)))
    assert lowers.read(node, 0, 1 << 20) == read_seq(lowers, b"/huge", 1 << 20)[:1 << 20]
    _, starts = lowers.layers._file(node.entry.digest)
    mine = [offs[i] for i, s in enumerate(starts) if s < 1 << 20]
    assert len(mine) > 1 and covered(now, mine) == []
    later = [offs[i] for i, s in enumerate(starts) if s >= 2 << 20]
    assert covered(now, later) == list(range(len(later)))  # the window: the thread's
    with env.read(buffers=True) as txn:  # both records (several pages each) were asked
        for db in ("files", "places"):  # for together, before the first was read
            value = txn.get(node.entry.digest, db=env.db(db))
            assert len(value) > 2 * 4096
            at = env.map_offset(value)
            assert covered(asked_before_file[0], [(at, len(value))]) == []
