"""Where the chunks of a file lie in data.mdb: a hint, kept beside the file record.

Why: a chunk is found by its digest, so reading a file out of a cold store first reads
one B-tree leaf page per chunk, each from somewhere else in data.mdb, 4 KiB at a time:
a cold copy-up of a 256 MiB file (3,720 chunks) spent ~120 ms on those lookups alone,
more than fuse-overlayfs takes for the whole copy. The places of a file's chunks, kept
with the file, let a reader ask for all of its values at once and read them straight
from the map, with no lookup.

A place is the page number of a chunk value's first overflow page and the value's
length (a value larger than ~2 KB lives in pages of its own: "overflow" pages, which
LMDB never moves while the value is neither rewritten nor deleted). Chunks are never
rewritten (puts do not overwrite), and only ``gc`` deletes them: it counts each sweep
in ``meta/generation``, so a record made at another generation is ignored, and
``gc`` makes them all again at its end. A reader also checks each page's header
(its own number, the overflow flag, the page count) before it uses a place; any doubt
and it looks the chunks up as before. A place is never trusted for content: a wrong
one costs time, and a reader that finds one falls back to the lookups.

Record (db ``places``, key = file digest): ``<QI`` generation, count; then ``count``
page numbers (``<Q``, 0 = not in pages of its own: a small tail chunk), ``count``
value lengths (``<I``) and ``count`` fingerprints (``<Q``: the value's bytes 1-4 and
its last 4, which a reader compares before it uses the value: a page that another
value took since, as a gc by a layerstore that does not know this record could leave,
is told apart; and a value whose payload is not as long as the file record says is
looked up by key).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable

import lmdb

from ..errors import IntegrityError
from .records import FileRecord
from .txn import PAGE, Env

GENERATION_KEY = b"generation"
_HEAD = struct.Struct("<QI")
#: MDB_page header: page number, pad, flags, then the page count of an overflow run
_PAGE_HEAD = struct.Struct("<QHHI")
PAGE_HEADER = 16
P_OVERFLOW = 0x04
#: a value this long or longer is surely in overflow pages (LMDB's limit for a value
#: kept in its leaf page, with a 32-byte key and 4 KiB pages, is ~2,000 bytes)
OVERFLOW_FROM = 2048
#: a file of this many chunks or more gets a record (one chunk: looked up by digest)
PLACES_FROM = 2
#: chunks looked up between two ``Env.release_map`` calls (as the import's writer does)
RELEASE_EVERY = 64


def generation(txn: lmdb.Transaction, env: Env) -> int:
    value = txn.get(GENERATION_KEY, db=env.db("meta"))
    return int(value) if value is not None else 0


def bump_generation(txn: lmdb.Transaction, env: Env) -> None:
    """Count a sweep that deletes chunks (in its own transaction): records made
    before are not used again."""
    txn.put(GENERATION_KEY, str(generation(txn, env) + 1).encode(), db=env.db("meta"))


def encode(gen: int, pages: list[int], sizes: list[int], prints: list[int]) -> bytes:
    return (_HEAD.pack(gen, len(pages)) + array("Q", pages).tobytes()
            + array("I", sizes).tobytes() + array("Q", prints).tobytes())


def decode(value: bytes | memoryview) -> tuple[int, array[int], array[int], array[int]]:
    gen, n = _HEAD.unpack_from(value, 0)
    if len(value) != _HEAD.size + 20 * n:
        raise ValueError("places record of the wrong length")
    pages, sizes, prints = array("Q"), array("I"), array("Q")
    at = _HEAD.size
    pages.frombytes(bytes(value[at:at + 8 * n]))
    sizes.frombytes(bytes(value[at + 8 * n:at + 12 * n]))
    prints.frombytes(bytes(value[at + 12 * n:]))
    return gen, pages, sizes, prints


def fingerprint(head: bytes, tail: bytes) -> int:
    """Of a value, from its bytes 1-4 (after the codec byte) and its last 4."""
    return int.from_bytes(head + tail, "little")


def page_finder(txn: lmdb.Transaction,
                env: Env) -> Callable[[bytes], tuple[int, int, int]] | None:
    """A function giving (page number, length, fingerprint) of the chunk value of a digest, in any
    transaction (read or write): page 0 when the value is not in pages of its own.
    It reads the B-tree and the value's page header, not the value. None when values
    cannot be found without reading them (``Env.value_address``)."""
    address = env.value_address(txn, "chunks") if env.pages_known() else None
    if address is None:
        return None
    import ctypes

    def read(addr: int, n: int) -> bytes:
        # a committed value is read from data.mdb, not touched through the map: each
        # touch would map 16 pages into this process (fault-around), and an import
        # looks at the stored chunks of its files (a 1 GiB import peaked 30 MiB
        # higher); a value of the write transaction lives in LMDB's heap
        at = env.offset_of(addr)
        return ctypes.string_at(addr, n) if at is None else env.pread(at, n)

    looked = [0]

    def find(digest: bytes) -> tuple[int, int, int]:
        looked[0] += 1
        if looked[0] % RELEASE_EVERY == 0:
            # each lookup of a chunk stored by an earlier batch maps its B-tree leaf
            # with 15 neighbouring pages into this process (fault-around): out again
            # (``Env.release_map``; a 1 GiB import peaked 40 MiB higher without)
            env.release_map()
        got = address(digest)
        if got is None:
            raise KeyError(digest)
        addr, size = got
        if size < OVERFLOW_FROM:
            return 0, size, 0
        head = read(addr - PAGE_HEADER, PAGE_HEADER + 5)
        pgno, _, flags, count = _PAGE_HEAD.unpack_from(head)
        if not flags & P_OVERFLOW or count != -(-(size + PAGE_HEADER) // PAGE) \
                or len(head) != PAGE_HEADER + 5:
            return 0, size, 0
        return pgno, size, fingerprint(head[PAGE_HEADER + 1:], read(addr + size - 4, 4))

    return find


def make(find: Callable[[bytes], tuple[int, int, int]], gen: int,
         rec: FileRecord) -> bytes | None:
    """The record of one file's places, or None if a chunk is missing."""
    pages, sizes, prints = [], [], []
    for d, _ in rec.chunks:
        try:
            pgno, size, fp = find(d)
        except KeyError:
            return None
        pages.append(pgno)
        sizes.append(size)
        prints.append(fp)
    return encode(gen, pages, sizes, prints)


def put_places(txn: lmdb.Transaction, env: Env, files: Iterable[tuple[bytes, FileRecord]]) -> None:
    """Record where the chunks of ``files`` lie (those of ``PLACES_FROM`` chunks or
    more), inside the write transaction that stores them."""
    find = page_finder(txn, env)
    if find is None:
        return
    gen = generation(txn, env)
    db = env.db("places")
    for digest, rec in files:
        if len(rec.chunks) >= PLACES_FROM:
            value = make(find, gen, rec)
            if value is not None:
                txn.put(digest, value, db=db)


def refresh(env: Env, batch: int = 2048) -> int:
    """Make the record of every file again, at the current generation (``gc`` calls
    this after a sweep); returns how many files have one."""
    with env.read() as txn:
        todo = list(txn.cursor(db=env.db("files")).iternext(values=False))
    done = 0
    for i in range(0, len(todo), batch):
        part = todo[i:i + batch]

        def fn(txn: lmdb.Transaction, part: list[bytes] = part) -> int:
            files = []
            for k in part:
                value = txn.get(k, db=env.db("files"))
                if value is not None:
                    files.append((k, FileRecord.decode(value)))
            put_places(txn, env, files)
            return sum(1 for _, r in files if len(r.chunks) >= PLACES_FROM)

        done += env.write(fn)
    return done


def stale(env: Env) -> bool:
    """Whether a record of another generation is left (a gc killed before its
    ``refresh``): the next gc makes them again, even with nothing to sweep."""
    with env.read() as txn:
        gen = generation(txn, env)
        return any(_HEAD.unpack_from(v, 0)[0] != gen for v in
                   txn.cursor(db=env.db("places")).iternext(keys=False))


def load(txn: lmdb.Transaction, env: Env, digest: bytes,
         rec: FileRecord) -> list[tuple[int, int, int]] | None:
    """Where each chunk value of a file lies, as (offset in data.mdb, length; offset
    -1 for one to look up); None if the file has no record, or one made at another
    generation. Each place is to be checked (``fits``) when its page is read, not
    here: that would read the first page of every chunk, 4 KiB at a time, before
    any of them is asked for."""
    if not env.pages_known():
        return None
    value = txn.get(digest, db=env.db("places"))
    if value is None:
        return None
    try:
        gen, pages, sizes, prints = decode(value)
    except (ValueError, struct.error):
        return None
    if gen != generation(txn, env) or len(pages) != len(rec.chunks):
        return None
    return [(pgno * PAGE + PAGE_HEADER if pgno else -1, size, fp)
            for pgno, size, fp in zip(pages, sizes, prints)]


def fits(view: memoryview, at: int, size: int, fp: int, whole: bool = True,
         base: int = 0) -> bool:
    """Whether ``view``, data.mdb from its offset ``base`` (the map: 0), has, at the
    file's offset ``at``, the start of an overflow value of ``size`` bytes with
    fingerprint ``fp``: the page header before it names its own page, the overflow flag
    and the page count such a value takes. Not ``whole``: only the fingerprint's first
    half, on the header's page (a reader of a few KiB of the value need not read its
    last page as well)."""
    pgno, rem = divmod(at - PAGE_HEADER, PAGE)
    i = at - base
    if rem or i < PAGE_HEADER or i + size > len(view) or size < 8:
        return False
    got, _, flags, count = _PAGE_HEAD.unpack_from(view, i - PAGE_HEADER)
    if got != pgno or not flags & P_OVERFLOW or count != -(-(size + PAGE_HEADER) // PAGE):
        return False
    if not whole:
        return bytes(view[i + 1:i + 5]) == (fp & 0xFFFFFFFF).to_bytes(4, "little")
    return fingerprint(bytes(view[i + 1:i + 5]), bytes(view[i + size - 4:i + size])) == fp


def check(txn: lmdb.Transaction, env: Env) -> list[str]:
    """What is wrong with the records of the current generation: one whose file is
    gone, or that names pages where the chunk's value is not."""
    bad: list[str] = []
    find = page_finder(txn, env)
    gen = generation(txn, env)
    files = env.db("files")
    for k, v in txn.cursor(db=env.db("places")):
        value = txn.get(k, db=files)
        if value is None:
            bad.append(f"places of file {k.hex()[:16]}: the file is missing")
            continue
        try:
            g = decode(v)[0]
        except (ValueError, struct.error):
            bad.append(f"places of file {k.hex()[:16]} do not decode")
            continue
        if g != gen or find is None:
            continue  # not used
        try:
            want = make(find, gen, FileRecord.decode(value))
        except IntegrityError:
            continue  # the file record is named as damaged on its own
        if want is not None and want != bytes(v):
            bad.append(f"places of file {k.hex()[:16]} name the wrong pages")
    return bad

