"""Where a file's chunks lie in data.mdb (``store.places``), and the copy-up that uses it.

The places are a hint kept with each file record of two chunks or more: a full copy-up
reads the values straight from the map, with no B-tree lookup, and asks for all of
them at once. They are used only at the generation ``gc`` last left, and each page is
checked before it is read; ``check`` names a record that is wrong.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import assert_clean, run_cli
from helpers_images import reg, tar_bytes

from layerstore.overlay.fs import FULL, OverlayFS
from layerstore.overlay.lower import MergedLowers, StoreLayers
from layerstore.store import Store, places
from layerstore.store import txn as txn_mod
from layerstore.store.images import resolve
from layerstore.store.records import FileRecord

rnd = random.Random(11)
BIG = rnd.randbytes(6 << 20)
OTHER = rnd.randbytes(3 << 20)
# compressible: stored zstd-compressed, so copy-up decodes what it reads from the map
TEXT = b"".join(b"line %d of a text file that compresses well\n" % i for i in range(60_000))
#: raw chunks, then compressed ones, then raw again
MIXED = rnd.randbytes(1 << 20) + TEXT[:1 << 20] + rnd.randbytes(1 << 20)


@pytest.fixture
def imported(cli, tmp_path: Path, root: Path):
    tar = tmp_path / "a.tar"
    tar.write_bytes(tar_bytes([reg("big", BIG), reg("text", TEXT), reg("small", b"x" * 100),
                               reg("mixed", MIXED)]))
    cli("import", tar, "--tag", "a:1")
    tar2 = tmp_path / "b.tar"
    tar2.write_bytes(tar_bytes([reg("other", OTHER)]))
    cli("import", tar2, "--tag", "b:1")
    return root


def view(store: Store, ref: str) -> MergedLowers:
    with store.env.read() as txn:
        img = resolve(txn, store.env, ref)
    return MergedLowers(StoreLayers(store, img.diff_ids))


def chunk_places(store: Store, vpath: bytes, ref: str = "a:1") -> tuple[list, list]:
    """(recorded places, where the values really are) of a lower file's chunks."""
    v = view(store, ref)
    digest = v.resolve(vpath).entry.digest
    env = store.env
    with env.read(buffers=True) as txn:
        rec = FileRecord.decode(txn.get(digest, db=env.db("files")))
        loaded = places.load(txn, env, digest, rec)
        recorded = None if loaded is None else [(at, n) for at, n, _ in loaded]
        real = []
        for d, _ in rec.chunks:
            value = txn.get(d, db=env.db("chunks"))
            real.append((env.map_offset(value), len(value)))
    return recorded, real


def copy_up(store: Store, ref: str, vpath: bytes, tmp_path: Path) -> bytes:
    for d in ("u", "w"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    ofs = OverlayFS(view(store, ref), tmp_path / "u", tmp_path / "w", FULL)
    try:
        ofs.release(ofs.open(vpath, os.O_WRONLY))
    finally:
        ofs.close()
    return (tmp_path / "u" / vpath.lstrip(b"/").decode()).read_bytes()


def test_import_records_where_each_chunk_is(imported: Path):
    with Store.open(imported) as store:
        for vpath in (b"/big", b"/text"):
            recorded, real = chunk_places(store, vpath)
            assert recorded is not None and len(recorded) > 10
            placed = [(r, q) for r, q in zip(recorded, real) if r[0] >= 0]
            # values under ~2 KB (a small tail; text compressed well) are kept in their
            # leaf page, and looked up by key
            assert placed and all(r == q for r, q in placed)
            assert all(n < places.OVERFLOW_FROM for (at, n) in recorded if at < 0)
            if vpath == b"/big":
                assert len(placed) >= len(real) - 1
        with store.env.read() as txn:
            assert places.check(txn, store.env) == []
            assert places.generation(txn, store.env) == 0
    assert_clean(imported)


def test_full_copy_up_from_the_places_reads_no_chunk_by_key(imported: Path, tmp_path: Path,
                                                            monkeypatch):
    with Store.open(imported) as store:
        looked_up = []
        real = txn_mod.Env.value_locator
        monkeypatch.setattr(txn_mod.Env, "value_locator",
                            lambda self, *a: looked_up.append(a) or real(self, *a))
        assert copy_up(store, "a:1", b"/big", tmp_path / "1") == BIG
        assert copy_up(store, "a:1", b"/text", tmp_path / "2") == TEXT
        # both came through their places (the records are located, not the chunks)
        assert [db for _, db in looked_up if db not in ("files", "places")] == []


def test_a_record_of_another_generation_is_not_used(imported: Path, tmp_path: Path):
    with Store.open(imported) as store:
        store.env.write(lambda txn: places.bump_generation(txn, store.env))
        recorded, _ = chunk_places(store, b"/big")
        assert recorded is None
        assert copy_up(store, "a:1", b"/big", tmp_path) == BIG  # by key, as before
        with store.env.read() as txn:
            assert places.check(txn, store.env) == []  # stale, so not checked
    assert_clean(imported)


def test_a_place_that_does_not_fit_its_page_is_read_by_key(imported: Path, tmp_path: Path):
    """A record whose pages do not hold the values it names (here: each chunk's place
    moved by one page) costs lookups, never wrong content; ``check`` names it."""
    with Store.open(imported) as store:
        env = store.env
        spoil_places(store, b"/big", lambda pages: [p + 1 for p in pages])
        assert copy_up(store, "a:1", b"/big", tmp_path) == BIG
        with env.read() as txn:
            assert any("wrong pages" in m for m in places.check(txn, env))
    p = run_cli("check", root=imported, check=False)
    assert p.returncode != 0 and "wrong pages" in p.stdout + p.stderr


def test_places_swapped_between_chunks_are_read_by_key(imported: Path, tmp_path: Path):
    """Two chunks' places swapped (each names another value's pages, with a valid page
    header), and one pointing past the end of data.mdb: the copy, which reads runs of
    adjacent values in one go, uses neither and gets the content right."""
    def swap(pages: list[int]) -> list[int]:
        assert len(pages) >= 4 and all(pages[:4])
        pages[1], pages[2] = pages[2], pages[1]
        pages[3] = 1 << 40
        return pages

    with Store.open(imported) as store:
        spoil_places(store, b"/big", swap)
        assert copy_up(store, "a:1", b"/big", tmp_path) == BIG


def spoil_places(store: Store, vpath: bytes, change) -> None:
    """Rewrite the page numbers of the ``places`` record of image a:1's ``vpath``."""
    digest = view(store, "a:1").resolve(vpath).entry.digest
    env = store.env

    def spoil(txn):
        gen, pages, sizes, prints = places.decode(txn.get(digest, db=env.db("places")))
        txn.put(digest, places.encode(gen, change(list(pages)), list(sizes), list(prints)),
                db=env.db("places"))

    env.write(spoil)


def test_gc_moves_to_a_new_generation_and_records_places_again(cli, imported: Path,
                                                                tmp_path: Path):
    cli("rmi", "b:1")
    cli("gc")
    with Store.open(imported) as store:
        with store.env.read() as txn:
            assert places.generation(txn, store.env) == 1
            n = txn.stat(store.env.db("places"))["entries"]
        assert n == 3  # big, text and mixed; other's went with its file
        recorded, real = chunk_places(store, b"/big")
        assert recorded is not None
        assert all(r == q for r, q in zip(recorded, real) if r[0] >= 0)
        assert copy_up(store, "a:1", b"/big", tmp_path) == BIG
    assert_clean(imported)


def test_without_the_cursor_layout_copy_up_looks_chunks_up(imported: Path, tmp_path: Path,
                                                          monkeypatch):
    """Another py-lmdb, whose cursors keep their value elsewhere: no places are
    recorded or read, and copy-up finds each chunk by key, one after the other."""
    monkeypatch.setattr(txn_mod, "_VALUE_SLOT", -1)
    with Store.open(imported) as store:
        env = store.env
        with env.read(buffers=True) as txn:
            assert env.value_locator(txn, "chunks") is None
        env.write(lambda txn: places.bump_generation(txn, env))  # the records: stale
        assert copy_up(store, "a:1", b"/big", tmp_path / "1") == BIG
        assert copy_up(store, "a:1", b"/text", tmp_path / "2") == TEXT


def test_the_value_slot_is_found_on_this_py_lmdb(store: Store):
    store.env.write(lambda txn: txn.put(b"k" * 32, b"v" * 5000, db=store.env.db("chunks")))
    with store.env.read(buffers=True) as txn:
        where = store.env.value_locator(txn, "chunks")
        assert where is not None
        at, n = where(b"k" * 32)
        assert n == 5000
        with open(store.env.path / "data.mdb", "rb") as f:
            f.seek(at)
            assert f.read(n) == b"v" * 5000
        assert where(b"z" * 32) is None


def test_a_page_another_value_took_is_told_by_its_fingerprint(imported: Path, tmp_path: Path):
    """The pages of a deleted chunk hold another value of the same size (a gc that did
    not count its sweep, as an older layerstore's would): header and page count fit,
    the fingerprint does not, and the chunk is read by key."""
    with Store.open(imported) as store:
        env = store.env
        big = view(store, "a:1").resolve(b"/big").entry.digest
        other = view(store, "b:1").resolve(b"/other").entry.digest

        def swap(txn):
            gen, pages, sizes, prints = places.decode(txn.get(big, db=env.db("places")))
            _, opages, osizes, _ = places.decode(txn.get(other, db=env.db("places")))
            pages, sizes = list(pages), list(sizes)
            pages[0], sizes[0] = opages[0], osizes[0]  # /other's first value, /big's print
            txn.put(big, places.encode(gen, pages, sizes, list(prints)), db=env.db("places"))

        env.write(swap)
        assert copy_up(store, "a:1", b"/big", tmp_path) == BIG


def test_gc_makes_records_left_stale_by_a_killed_gc_again(cli, imported: Path):
    with Store.open(imported) as store:
        store.env.write(lambda txn: places.bump_generation(txn, store.env))  # as a kill leaves
        assert places.stale(store.env)
    cli("gc")  # nothing to sweep
    with Store.open(imported) as store:
        assert not places.stale(store.env)
        recorded, _ = chunk_places(store, b"/big")
        assert recorded is not None
    assert_clean(imported)


def read_all(v: MergedLowers, vpath: bytes, piece: int = 128 << 10) -> bytes:
    node = v.resolve(vpath)
    out, off = [], 0
    while b := v.read(node, off, piece):
        out.append(b)
        off += len(b)
    return b"".join(out)


def test_a_read_of_raw_and_compressed_chunks_is_one_transaction(imported: Path, monkeypatch):
    """Raw chunks come from the map, compressed ones are looked up, in the same read
    transaction: a second one could map the store anew (another process grew it)
    under the map slices the read holds."""
    with Store.open(imported) as store:
        v = view(store, "a:1")
        env = store.env
        assert read_all(v, b"/mixed") == MIXED
        opened = []
        real = env.read
        monkeypatch.setattr(env, "read", lambda *a, **kw: opened.append(1) or real(*a, **kw))
        v.layers._chunks.clear()
        node = v.resolve(b"/mixed")
        across = v.read(node, (1 << 20) - 4096, 8192)  # the last raw page, a compressed one
        assert across == MIXED[(1 << 20) - 4096:(1 << 20) + 4096]
        assert len(opened) == 1
        pl = v.layers._places[node.entry.digest]
        assert pl is not None and 1 in pl.state and 2 in pl.state


def test_places_of_an_older_generation_are_forgotten_by_a_reader(imported: Path):
    """A gc (another process) moved the store to a new generation while a view read a
    file through its places: the next read forgets them and looks the chunks up."""
    with Store.open(imported) as store:
        v = view(store, "a:1")
        assert read_all(v, b"/big") == BIG
        digest = v.resolve(b"/big").entry.digest
        assert v.layers._places[digest] is not None
        store.env.write(lambda txn: places.bump_generation(txn, store.env))
        assert read_all(v, b"/big") == BIG
        assert v.layers._places[digest] is None  # its record is of the old generation


def test_read_into_hands_map_pieces_inside_the_read_transaction(imported: Path):
    """``read_into`` hands a read's raw chunks as views into the map, while the read
    transaction that keeps their pages is open, and compressed ones as bytes; the
    pieces are the same bytes ``read`` returns, across chunk boundaries."""
    with Store.open(imported) as store:
        v = view(store, "a:1")
        node = v.resolve(b"/mixed")
        gate = store.env._gate
        seen: list[tuple[list, int]] = []

        def send(pieces):
            seen.append(([bytes(p) for p in pieces], gate.depth()))
            seen[-1][0].append(any(isinstance(p, memoryview) for p in pieces))

        for off, size in ((0, 1 << 20), ((1 << 20) - 4096, 8192), (123_457, 700_000),
                          (len(MIXED) - 10, 100), (len(MIXED) + 1, 10)):
            seen.clear()
            v.read_into(node, off, size, send)
            assert len(seen) == 1  # once
            parts, depth = seen[0]
            assert b"".join(parts[:-1]) == MIXED[off:off + size] == v.read(node, off, size)
            assert depth == 1 or not parts[-1]  # map views only inside the transaction
            assert gate.depth() == 0
        seen.clear()
        v.read_into(node, 0, 1 << 20, send)
        assert seen[0][0][-1], "the raw chunks of the first MiB came as map views"
