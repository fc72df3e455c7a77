"""Lowers: the read-only layers under a container, and the merged view of them.

``StoreLayers`` reads layers from the store (one short read transaction per call, so it
can be used from any thread and never holds a transaction between calls).
``MergedLowers`` merges them with OCI/overlayfs rules, top layer first:

- a whiteout hides the same path in the layers below it;
- a non-directory hides everything below it; a directory merges with the directories
  below it until one of them is opaque;
- a directory's attributes come from its topmost non-implicit entry.

Lowers never change, so every resolved path is cached for the life of the view (the
"flattened index", built lazily: one get per layer for each path the first time).

Inode numbers are derived from what a lower object *is*, so they are the same on every
mount: a directory from its path, a file from (layer, path), a hard-link group from
(layer, group) so that links share one inode; a layer is named by ``identity(layer)``
(a store layer by its diff_id).

``MergedLowers`` uses only this small protocol of its ``layers`` (``StoreLayers`` here;
``dirlower.DirLayers`` for host directories, ``dirlower.ChainedLayers`` for a mixed
stack): ``len()``, ``identity(layer)``, ``lookup(layer, vpath)``, ``list(layer, vpath)``,
``group_size(layer, group)`` and ``read(layer, vpath, entry, offset, size)``; layers are
numbered top first. A layer stack may also have ``read_into`` (see ``Send``).

This module imports neither fusepy nor anything above ``store``.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..digest import blake3_raw
from ..errors import IntegrityError, NoEntryError, OverlayError
from ..store import Store, places
from ..store.chunks import CODEC_RAW, decode_chunk
from ..store.filecache import FILL_FROM, FileCache
from ..store.layers import list_dir, lookup, walk
from ..store.records import (
    BLK,
    CHR,
    DIR,
    FIFO,
    REG,
    SYMLINK,
    WHITEOUT,
    Entry,
    FileRecord,
    LayerRecord,
    join_vpath,
    split_vpath,
)
from ..store.txn import PAGE, Env

#: runs of chunk values in data.mdb (``_value_runs``): (first chunk, after the last,
#: start, end)
Runs = list[tuple[int, int, int, int]]

#: decoded chunks kept in memory, bytes
CHUNK_CACHE_BYTES = 64 << 20
#: how much of the store's file a sequential reader of a lower file asks for ahead of
#: the chunk it has just read (see ``StoreLayers._read_ahead``)
READ_AHEAD = 4 << 20
#: a read this close to the furthest one so far of a file still counts as sequential
FRONTIER_SLACK = 2 << 20
#: ``StoreLayers._guess`` asks for this much more on each side of where it guesses a
#: chunk is (plus 2% of how far it is from the chunk the guess starts from)
GUESS_SLACK = 64 << 10
#: files whose reading ``StoreLayers`` follows at once (the table starts again beyond)
MAX_READING = 4096
#: how much of a file with places a sequential reader asks for ahead of its reads: the
#: first request, and the most one grows to (each next one is twice the last)
PLACED_AHEAD_FIRST = 4 << 20
PLACED_AHEAD = 32 << 20
#: a file this large or larger has its records asked for before they are read (``_file``)
ASK_RECORDS_FROM = 1 << 20
#: the places of at most this many chunks are kept (``StoreLayers._placed``)
MAX_PLACED_CHUNKS = 1 << 20

#: a reader of a whole file, chunk after chunk, asks for this much of the store's file
#: ahead of the chunks it has read, at most (``_Runs``: twice this)
COPY_BATCH = 8 << 20
#: and written with one pwritev per this many bytes. Not more: on this kind of VM
#: (free page reporting on, order 9) a write of 4 or 8 MiB gets its page cache in
#: 2 MiB folios from blocks the host has taken back, and the copy into them runs at
#: a tenth of its speed: 256 MiB took 290-350 ms in 8 MiB writes, 170-250 in 4 MiB,
#: 56-58 in 2 MiB, when the memory had been freed 3 s before (50-54 / 56 ms when it
#: had just been freed). A full copy-up of the suite took 64 ms or 290-440 ms by turns.
WRITE_BATCH = 2 << 20
#: values of a file this close in data.mdb are asked for as one stretch
SPAN_GAP = 64 << 10
#: a copy out of the store reads chunk values into a buffer of this size (``_copy_runs``)
COPY_BUFFER = WRITE_BATCH + (1 << 20)
#: bytes per read and write of a copy-up from the file cache's copy (``_copy_from_cache``)
CACHE_COPY_BLOCK = 1 << 20
#: a copy-up of a file of this many chunks or more has their keys looked up ahead
#: (``Env.warm_keys``), and so has a first read of a file of ``WARM_KEYS_READ_FROM``
#: (four threads cost ~0.2-0.4 ms: a read of a file warm in the store may be over
#: before they are)
WARM_KEYS_FROM = 32
WARM_KEYS_READ_FROM = 128
ROOT_ENTRY = Entry(DIR, mode=0o755)

#: what ``read_into`` hands a read's content to, once, in pieces: bytes, or views into
#: the store's map that are valid only during the call (the read transaction is open
#: then, so no page of them can be given to another value). The mount's transport
#: writes them to /dev/fuse as they are (one ``writev``), so a read of a file with
#: places copies its bytes once, map -> the kernel's page cache, where ``read`` joins
#: them first: a fresh daemon's reading of a 256 MiB file whose store pages were
#: cached ran at 3.9 GB/s instead of 3.2 (medians of 10, alternating).
Send = Callable[[list[bytes | memoryview]], None]


@dataclass
class _Reading:
    """What the readers of one lower file taught ``StoreLayers`` so far."""

    frontier: int = 0  #: the furthest end of a read (file bytes)
    asked: int = -1  #: the store's file is asked for up to here
    first: tuple[int, int] | None = None  #: (file offset, offset in data.mdb) of a chunk
    anchor: tuple[int, int] | None = None  #: the same for the last chunk fetched
    warmed: bool = False  #: the file's chunk keys were looked up ahead (``Env.warm_keys``)
    asked_chunks: int = 0  #: with places: the file's chunks before this one are asked for
    window: int = 0  #: with places: what the next request asks for (file bytes; it grows)


@dataclass
class _Placed:
    """A file's chunks as its ``places`` record says (``StoreLayers._read_placed``)."""

    generation: int  #: the store's generation the places were made at (``places``)
    spots: list[tuple[int, int, int]]  #: (offset in data.mdb or -1, length, fingerprint)
    #: per chunk: 0 not looked at yet, 1 a raw value that fits its place (read from the
    #: map), 2 anything else (read as before: fetched, decoded, cached)
    state: bytearray


def ino_of(*parts: bytes) -> int:
    """A stable 63-bit inode number (never 0 or 1, which FUSE reserves)."""
    n = int.from_bytes(blake3_raw(b"\0".join(parts))[:8], "big") >> 1
    return n if n > 1 else n + 2


#: entry type -> S_IFMT bits
IFMT = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHR: stat.S_IFCHR,
        BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


@dataclass
class Node:
    """A path of the merged lowers."""

    vpath: bytes
    entry: Entry
    ino: int
    layer: int = -1  #: index (top = 0) of the layer a non-directory comes from
    dir_layers: list[int] = field(default_factory=list)  #: layers a directory merges
    nlink: int = 1  #: names of this inode in its layer (hard-link group size)


def node_stat(node: Node) -> dict[str, int]:
    """A lower node's attributes as ``st_*`` fields (times in ns; a directory's nlink is
    1, as overlayfs and btrfs report when it is unknown)."""
    e = node.entry
    st = {
        "st_ino": node.ino,
        "st_mode": IFMT[e.type] | (e.mode & 0o7777),
        "st_nlink": node.nlink,
        "st_uid": e.uid,
        "st_gid": e.gid,
        "st_size": e.size if e.type == REG else (len(e.target) if e.type == SYMLINK else 0),
        "st_atime": e.mtime_ns,
        "st_mtime": e.mtime_ns,
        "st_ctime": e.mtime_ns,
        "st_blocks": (e.size + 511) // 512 if e.type == REG else 0,
    }
    if e.type in (CHR, BLK):
        st["st_rdev"] = os.makedev(*e.rdev)
    return st


class StoreLayers:
    """The layers of an image, top first, read from the store."""

    def __init__(self, store: Store, diff_ids: Sequence[str]):
        self.store = store
        env = store.env
        recs = []
        with env.read() as txn:
            for d in diff_ids:
                value = txn.get(bytes.fromhex(d.split(":", 1)[1]), db=env.db("layers"))
                if value is None:
                    raise IntegrityError(f"layer {d} is missing from the store")
                recs.append(LayerRecord.decode(value))
        self.records = list(reversed(recs))  #: top first
        #: a file smaller than this is one chunk, whose digest is the file's (FastCDC
        #: never cuts below the minimum chunk size; ``store.chunks.FileWriter``)
        self.one_chunk_below = store.params.min_size
        self._files: dict[bytes, tuple[FileRecord, list[int]]] = {}
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._chunk_bytes = 0
        self._groups: dict[int, dict[int, list[bytes]]] = {}
        #: file digest -> how it is being read (see ``_read_ahead``)
        self._ahead: dict[bytes, _Reading] = {}
        #: file digest -> its chunks' places, or None if it has none (``_placed``)
        self._places: dict[bytes, _Placed | None] = {}
        self._placed_chunks = 0  #: chunks of the files in ``_places``
        self._lock = threading.Lock()
        #: the buffer of ``_copy_runs``, kept for the next copy (``_buffer``)
        self._copy_buffer: mmap.mmap | None = None
        self._copy_buffer_lock = threading.Lock()
        #: whole copies of big files for FUSE passthrough (``backing``), made on first use
        self._file_cache: FileCache | None = None

    @property
    def file_cache(self) -> FileCache:
        fc = self._file_cache
        if fc is None:
            with self._lock:
                if self._file_cache is None:
                    self._file_cache = FileCache(self.store.root)
                fc = self._file_cache
        return fc

    def backing(self, layer: int, vpath: bytes, entry: Entry) -> int | None:
        """A read-only fd of a plain file that holds the whole content of a regular file
        of the layers (the caller owns it), for FUSE passthrough: the store's file cache
        (``store.filecache``) has big files once a mount has read them (``keep``). None
        if there is none."""
        if entry.size < FILL_FROM or not entry.digest:
            return None
        fc = self.file_cache
        if not fc.enabled:
            return None
        return fc.open(entry.digest, entry.size)

    def keep(self, layer: int, vpath: bytes, entry: Entry) -> None:
        """After a reader of a big file closed it: ask the file cache's filler for a
        copy (made in the background from the store's chunks, not while the reader
        read), for the next opens."""
        if entry.size < FILL_FROM or not entry.digest:
            return
        fc = self.file_cache
        if fc.enabled and not fc.path(entry.digest).exists():
            fc.want(entry.digest, entry.size,
                    lambda out: self.copy_to(layer, vpath, entry, out))

    def close(self) -> bool:
        """Let the file cache's filler finish the copies asked for (see
        ``FileCache.close``); False if it has not (the store must stay open)."""
        return self._file_cache is None or self._file_cache.close()

    def __len__(self) -> int:
        return len(self.records)

    def identity(self, layer: int) -> bytes:
        """What names the layer in inode numbers: its diff_id."""
        return self.records[layer].diff_id.encode()

    def _group_map(self, layer: int) -> dict[int, list[bytes]]:
        """Hard-link group -> its paths, for one layer: from its record, or, in a
        record written before session 17, from a walk of the layer (once, the first
        time; ~36 ms for a 5,000-entry layer, in the request that met the first hard
        link)."""
        with self._lock:
            groups = self._groups.get(layer)
        recorded = self.records[layer].links
        if groups is None and recorded is not None:
            groups = recorded
            with self._lock:
                self._groups[layer] = groups
        if groups is None:
            groups = {}
            env = self.store.env
            with env.read() as txn:
                for vpath, e in walk(txn, env, self.records[layer].layer_no):
                    if e.link_group:
                        groups.setdefault(e.link_group, []).append(vpath)
            with self._lock:
                self._groups[layer] = groups
        return groups

    def group_size(self, layer: int, group: int) -> int:
        """How many entries of a layer share hard-link group ``group``."""
        return len(self._group_map(layer).get(group, ())) or 1

    def group_paths(self, layer: int, group: int) -> list[bytes]:
        """The paths of a layer that share hard-link group ``group``."""
        return list(self._group_map(layer).get(group, ()))

    def lookup(self, layer: int, vpath: bytes) -> Entry | None:
        env = self.store.env
        with env.read() as txn:
            return lookup(txn, env, self.records[layer].layer_no, vpath)

    def list(self, layer: int, vpath: bytes) -> list[tuple[bytes, Entry]]:
        env = self.store.env
        with env.read() as txn:
            return list_dir(txn, env, self.records[layer].layer_no, vpath)

    def _file(self, digest: bytes, size: int | None = None) -> tuple[FileRecord, list[int]]:
        """A file's record and where each of its chunks starts (kept); ``size``, if
        known, decides whether its records are worth asking for ahead."""
        with self._lock:
            hit = self._files.get(digest)
        if hit is not None:
            return hit
        env = self.store.env
        with env.read(buffers=True) as txn:
            if size is None or size >= ASK_RECORDS_FROM:
                # both of the file's records asked for at once, before this one is read
                # (each a read of its own when cold, ~1 ms here, the second after the
                # first); ``_placed`` then finds its pages coming. A smaller file's
                # records fit in a page or two: asking costs more than it saves
                for db in ("files", "places"):
                    env.ask_value(txn, digest, db)
            value = txn.get(digest, db=env.db("files"))
            value = None if value is None else bytes(value)
        if value is None:
            raise IntegrityError(f"file {digest.hex()[:16]} is missing")
        rec = FileRecord.decode(value)
        starts, pos = [], 0
        for _, n in rec.chunks:
            starts.append(pos)
            pos += n
        with self._lock:
            self._files[digest] = (rec, starts)
        return rec, starts

    def _cached(self, digest: bytes) -> bytes | None:
        with self._lock:
            data = self._chunks.get(digest)
            if data is not None:
                self._chunks.move_to_end(digest)
            return data

    def _fetch(self, digest: bytes, locate: bool = True) -> tuple[bytes, int | None, int]:
        """A chunk's content from the store (kept in the cache), where its value starts
        in the store's file (None if unknown or not ``locate``) and the value's length."""
        env = self.store.env
        with env.read(buffers=True) as txn:
            value = txn.get(digest, db=env.db("chunks"))
            if value is None:
                raise IntegrityError(f"chunk {digest.hex()[:16]} is missing")
            at = env.map_offset(value) if locate else None
            data = bytes(decode_chunk(value))  # a raw chunk is a view into the map
            n = len(value)
        self._keep(digest, data)
        return data, at, n

    def _reading(self, digest: bytes) -> _Reading:
        with self._lock:
            r = self._ahead.get(digest)
            if r is None:
                if len(self._ahead) >= MAX_READING:
                    self._ahead.clear()
                r = self._ahead[digest] = _Reading()
            return r

    def _placed(self, digest: bytes, rec: FileRecord) -> _Placed | None:
        """A file's places (``store.places``), loaded once per file and used while the
        store's generation is the one they were loaded at (``_read_placed``)."""
        with self._lock:
            if digest in self._places:
                return self._places[digest]
        env = self.store.env
        with env.read(buffers=True) as txn:
            gen = places.generation(txn, env)
            spots = places.load(txn, env, digest, rec)
        got = None if spots is None else _Placed(gen, spots, bytearray(len(spots)))
        with self._lock:
            if len(self._places) >= MAX_READING or self._placed_chunks > MAX_PLACED_CHUNKS:
                self._places.clear()
                self._placed_chunks = 0
            self._places[digest] = got
            self._placed_chunks += len(rec.chunks)
        return got

    def _keep(self, digest: bytes, data: bytes) -> None:
        """Put a decoded chunk in the chunk cache."""
        with self._lock:
            self._chunks[digest] = data
            self._chunk_bytes += len(data)
            while self._chunk_bytes > CHUNK_CACHE_BYTES and len(self._chunks) > 1:
                _, old = self._chunks.popitem(last=False)
                self._chunk_bytes -= len(old)

    def _read_placed(self, digest: bytes, r: _Reading, rec: FileRecord, starts: list[int],
                     pl: _Placed, offset: int, end: int, send: Send) -> bool:
        """``read`` of a file whose chunks' places are known: a raw chunk is sliced
        straight out of the map (no lookup, only the pages asked for, one copy into
        the reply), after the read-ahead thread has passed it; other chunks are looked
        up, decoded and cached as before. A sequential reader asks for the file ahead
        through its places, 4 MiB at first, twice as much each time after, up to
        ``PLACED_AHEAD``; another reader asks for the pieces it reads. All in one read
        transaction, so no page it reads can be given to another value meanwhile
        (a mounted image may be removed, ``rmi --force``, and its chunks swept); the
        pieces are handed to ``send`` inside it. False, and nothing sent, if the
        store's generation moved since the places were loaded (they are forgotten) or
        the map moved meanwhile: the caller reads as before."""
        env = self.store.env
        i0 = bisect_right(starts, offset) - 1
        with self._lock:
            if offset == 0:  # (again) from the start: what was asked for may be gone
                r.frontier, r.asked_chunks, r.window = 0, 0, 0
            # the kernel sends a sequential reader's requests from several threads, so
            # they come a little out of order, as far apart as its readahead window:
            # a read within what was asked for, or near the furthest one, is forward
            forward = offset == 0 or abs(offset - r.frontier) <= max(FRONTIER_SLACK, r.window) \
                or (r.window and i0 < r.asked_chunks and offset >= r.frontier - r.window)
            r.frontier = max(r.frontier, end)
            if not forward:
                r.window = 0
            ask = None
            if forward and (r.asked_chunks <= i0 or (
                    r.asked_chunks < len(starts) and starts[r.asked_chunks] < end + r.window // 2)):
                r.window = min(max(2 * r.window, PLACED_AHEAD_FIRST), PLACED_AHEAD)
                ask = (max(r.asked_chunks, i0), bisect_left(starts, end + r.window))
                r.asked_chunks = ask[1]
        if ask is not None:
            lo = ask[0]
            if lo == i0:
                # this read's own chunks first, at once, in this thread (WILLNEED): a
                # first read waits for them, not for the thread's first piece of the
                # window (its first 1 MiB came in 5.6-6.5 ms instead of 7.4-9.3)
                lo = min(bisect_left(starts, end), ask[1])
                for a, b in _spans([(at, n) for at, n, _ in pl.spots[i0:lo] if at >= 0]):
                    env.read_now(a, b - a)
            for a, b in _spans([(at, n) for at, n, _ in pl.spots[lo:ask[1]] if at >= 0]):
                env.read_ahead(a, b - a)
        with env.read(buffers=True) as txn:
            if places.generation(txn, env) != pl.generation:
                with self._lock:
                    self._places.pop(digest, None)
                return False
            epoch = env.map_epoch
            j = bisect_left(starts, end)
            view = env.map_view(max(at + n for at, n, _ in pl.spots[i0:j]))
            if view is None:
                return False
            db = env.db("chunks")
            parts: list[bytes | tuple[int, int]] = []
            i = i0
            while i < len(starts) and starts[i] < end:
                d, n = rec.chunks[i]
                at, vlen, fp = pl.spots[i]
                lo = max(offset - starts[i], 0)
                hi = min(end - starts[i], n)
                state = pl.state[i]
                if state == 0:
                    if at >= 0 and vlen == n + 1:
                        if not forward:
                            # the header's page and the pages to read, asked for at
                            # once; the header, the codec and half the fingerprint
                            # (on that page) are checked, not the value's last page
                            env.read_ahead(at - places.PAGE_HEADER, PAGE)
                            env.read_ahead(at + 1 + lo, hi - lo)
                        env.wait_read(at, at + vlen)
                        state = 1 if (places.fits(view, at, vlen, fp, whole=forward)
                                      and view[at] == CODEC_RAW) else 2
                    else:
                        state = 2
                    pl.state[i] = state
                if state == 1:
                    parts.append((at + 1 + lo, at + 1 + hi))
                else:
                    data = self._cached(d)
                    if data is None:
                        value = txn.get(d, db=db)
                        if value is None:
                            raise IntegrityError(f"chunk {d.hex()[:16]} is missing")
                        data = bytes(decode_chunk(value))
                        self._keep(d, data)
                    parts.append(data[lo:hi] if (lo, hi) != (0, n) else data)
                i += 1
            # the map's pages last, right before the copy into the reply
            pieces: list[bytes | memoryview] = []
            for part in parts:
                if isinstance(part, tuple):
                    a, b = part
                    if not forward and b - a > PAGE:
                        env.read_ahead(a, b - a)
                    env.wait_read(a, b)
                    pieces.append(view[a:b])
                else:
                    pieces.append(part)
            if env.map_epoch != epoch:
                return False  # another thread mapped data.mdb anew: the views may be stale
            send(pieces)
        return True

    def _guess(self, r: _Reading, pos: int, n: int) -> None:
        """Before fetching the chunk at file offset ``pos`` (``n`` bytes) from the store:
        ask for where it probably is, from where an earlier chunk of the same file was
        (a file's chunks lie in order in the store's file, see ``_read_ahead``), so
        that the fetch reads it in one request instead of a page at a time."""
        with self._lock:
            if r.anchor is None:
                return
            (l0, s0), (l1, s1) = r.first or r.anchor, r.anchor
            ratio = (s1 - s0) / (l1 - l0) if l1 != l0 else 1.0
            ratio = min(max(ratio, 0.02), 1.1)
            guess = s1 + int((pos - l1) * ratio)
            if r.asked - 2 * READ_AHEAD <= guess and guess + n <= r.asked:
                return  # asked for already
            slack = GUESS_SLACK + abs(pos - l1) // 50
        start = max(0, guess - slack)
        self.store.env.read_ahead(start, min(n, 1 << 20) + 2 * slack)

    def _read_ahead(self, r: _Reading, offset: int, end: int, at: int | None,
                    size: int) -> None:
        """After a read of [offset, end) of a file of ``size`` bytes whose last chunk
        came from the store and ends at ``at`` in its file: if the reads of this file go
        forward (from 0, or near the furthest one so far: the kernel sends a
        sequential reader's requests from several threads, not quite in order), ask
        the kernel for the next ``READ_AHEAD`` bytes of the store's file (no more than
        the file has left), unless they were asked for already.

        The store's map has no readahead (see ``txn.Env``): with it, every B-tree page
        a lookup touched read 4 MiB around it here (the device's readahead; a small
        file's first copy-up took 24-44 ms cold, ~4-5 ms without). The chunks of a file
        are written one after the other by the import, so what follows a chunk in the
        store's file is most likely the file's next chunks; where it is not, the guess
        costs one read of ``READ_AHEAD`` bytes."""
        with self._lock:
            if offset == 0:  # (again) from the start: what was asked for may be gone
                r.frontier, r.asked = 0, -1
            forward = offset == 0 or abs(offset - r.frontier) <= FRONTIER_SLACK
            r.frontier = max(r.frontier, end)
            if at is None or not forward or end >= size:
                return
            request = _next_request(r.asked, at, READ_AHEAD, size - end)
            if request is None:
                return
            start, r.asked = request
        self.store.env.read_ahead(start, r.asked - start)

    def read(self, layer: int, vpath: bytes, entry: Entry, offset: int, size: int) -> bytes:
        """``size`` bytes of a regular file's content from ``offset`` (short at EOF); the
        content is found by ``entry.digest`` alone."""
        got: list[bytes] = []
        self.read_into(layer, vpath, entry, offset, size, lambda p: got.append(joined(p)))
        return got[0]

    def read_into(self, layer: int, vpath: bytes, entry: Entry, offset: int, size: int,
                  send: Send) -> None:
        """``read``, with the content handed to ``send`` (see ``Send``), once, unless an
        error is raised first."""
        if not entry.digest or offset >= entry.size or size <= 0:
            send([])
            return
        if entry.size < self.one_chunk_below:
            # one chunk named by the file's digest: no file record, and nothing to read
            # ahead (most files of a root filesystem; a first tar of the suite's tree
            # reads ~1,400 of them)
            data = self._cached(entry.digest)
            if data is None:
                data = self._fetch(entry.digest, locate=False)[0]
            send([data if offset == 0 and size >= len(data)
                  else memoryview(data)[offset:offset + size]])
            return
        rec, starts = self._file(entry.digest, entry.size)
        r = self._reading(entry.digest)
        end = min(offset + size, rec.size)
        pl = self._placed(entry.digest, rec) if len(rec.chunks) > 1 else None
        if pl is not None and self._read_placed(entry.digest, r, rec, starts, pl, offset, end,
                                                send):
            return
        if len(rec.chunks) >= WARM_KEYS_READ_FROM and (not r.warmed or (
                offset == 0 and self._cached(rec.chunks[0][0]) is None)):
            # a first read of a big file, or a read from its start that finds nothing
            # cached: the lookups of its chunks go ahead in the background (a few such
            # readers at a time: ``Env.warm_keys`` starts no more than its maximum)
            r.warmed = True
            self.store.env.warm_keys("chunks", [d for d, _ in rec.chunks])
        i = bisect_right(starts, offset) - 1
        out = []
        at_end = None
        while i < len(starts) and starts[i] < end:
            d, n = rec.chunks[i]
            data = self._cached(d)
            if data is None:
                self._guess(r, starts[i], n)
                data, at, vlen = self._fetch(d)
                if at is not None:
                    at_end = at + vlen
                    with self._lock:
                        if r.first is None:
                            r.first = (starts[i], at)
                        r.anchor = (starts[i], at)
            lo = max(offset - starts[i], 0)
            hi = min(end - starts[i], n)
            out.append(memoryview(data)[lo:hi] if (lo, hi) != (0, n) else data)
            i += 1
        self._read_ahead(r, offset, end, at_end, rec.size)
        send(out)

    def copy_to(self, layer: int, vpath: bytes, entry: Entry, fd: int) -> None:
        """Write a regular file's whole content to ``fd`` from offset 0, straight from
        the store's map (a raw chunk is written without a copy in Python; one read
        transaction; the chunk cache is left alone). A file whose copy is in the store's
        file cache is copied from that copy instead (``_copy_from_cache``): one
        sequential file, as fuse-overlayfs copies a lower file."""
        if not entry.digest or entry.size == 0:
            return
        if entry.size >= FILL_FROM and self._copy_from_cache(entry, fd):
            return
        if entry.size < self.one_chunk_below:
            # one chunk named by the file's digest (see ``read_into``): its record need
            # not be read (a first small copy-up of a fresh mount spent 0.15-0.26 ms on it)
            rec = FileRecord(entry.size, [(entry.digest, entry.size)])
        else:
            rec, _ = self._file(entry.digest, entry.size)
        env = self.store.env
        stop = None  # the warm_keys threads: stopped out of the transaction (txn._Gate)
        try:
            with env.read(buffers=True) as txn:
                if len(rec.chunks) == 1:  # one value: nothing to find or ask for ahead
                    self._copy_chunks_following(rec, env, txn, fd)
                    return
                spots = places.load(txn, env, entry.digest, rec)
                trusted = spots is None
                if spots is None:
                    # no record: each chunk is looked up (the B-tree, not the value:
                    # ``Env.value_locator``), its keys ahead in threads of their own
                    where = env.value_locator(txn, "chunks")
                    if where is None:
                        self._copy_chunks_following(rec, env, txn, fd)
                        return
                    if len(rec.chunks) >= WARM_KEYS_FROM:
                        stop = env.warm_keys("chunks", [d for d, _ in rec.chunks])
                    spots = []
                    for d, _ in rec.chunks:
                        got = where(d)
                        if got is None:
                            raise IntegrityError(f"chunk {d.hex()[:16]} is missing")
                        spots.append((got[0], got[1], 0))
                self._copy_placed(rec, env, txn, fd, spots, trusted)
        finally:
            if stop is not None:
                stop()

    def _copy_from_cache(self, entry: Entry, fd: int) -> bool:
        """``copy_to`` from the file cache's copy of ``entry``, if it has one (False if
        not). ``preadv``/``pwrite`` of 1 MiB at a time: a 256 MiB copy took 49-50 ms warm
        and 59 cold that way, against 62 and 67 with ``copy_file_range``."""
        fc = self.file_cache
        src = fc.open(entry.digest, entry.size) if fc.enabled else None
        if src is None:
            return False
        try:
            with self._buffer(CACHE_COPY_BLOCK) as mem, mem[:CACHE_COPY_BLOCK] as buf:
                off = 0
                while off < entry.size:
                    n = os.preadv(src, [buf], off)
                    if n <= 0:
                        raise IntegrityError("the file cache's copy of "
                                             f"{entry.digest.hex()[:16]} ended early")
                    off = _pwrite_all(fd, [buf[:n]], off)
            return True
        finally:
            os.close(src)

    def _copy_placed(self, rec: FileRecord, env: Env, txn: Any, fd: int,
                     spots: list[tuple[int, int, int]], trusted: bool = False) -> None:
        """``copy_to`` from where each chunk value lies in data.mdb (a ``places`` record,
        whose places are checked before they are used, or the lookups of this
        transaction, ``trusted``): all of it asked for at once (``Env.read_ahead`` reads
        a large stretch in its thread; each run waits for what it needs of it), then
        read run by run with ``pread`` (``_copy_runs``)."""
        runs = _value_runs(rec, spots)
        for start, stop in _spans([(a, b - a) for _, _, a, b in runs if a >= 0]):
            env.read_ahead(start, stop - start)
        src = env.open_data()
        try:
            self._copy_runs(rec, env, txn, fd, spots, runs, src, trusted)
        finally:
            os.close(src)

    def _copy_runs(self, rec: FileRecord, env: Env, txn: Any, fd: int,
                   spots: list[tuple[int, int, int]], runs: Runs, src: int,
                   trusted: bool) -> None:
        """Each run of values (``_value_runs``) is read from data.mdb (fd ``src``), page
        headers and all, with one ``preadv`` into a buffer (``_buffer``), and
        ``WRITE_BATCH`` bytes at a time are written from there with one ``pwritev``.
        Not from the store's map: the pages a copy reads there must first be mapped
        into the daemon, page by page (~1.3 us each when faulted, ~0.4 with
        MADV_POPULATE_READ), and a read copies into memory that stays mapped and in the
        cache. Copying the 3,720 values of a 256 MiB file out of data.mdb took 58-60 ms
        so, 61 ms from the populated map, 73-77 ms faulting the map in, 95 ms with
        ``copy_file_range`` per value."""
        db = env.db("chunks")
        spans = [end - start for _, _, start, end in runs]
        off, pos, batched = 0, 0, 0
        bufs: list[memoryview | bytes] = []
        with self._buffer(max([min(sum(spans), COPY_BUFFER), *spans])) as mem:
            for (i, j, start, end), span in zip(runs, spans):
                if bufs and (pos + span > len(mem) or batched >= WRITE_BATCH):
                    off = _pwrite_all(fd, bufs, off)
                    bufs, pos, batched = [], 0, 0
                got = 0
                if start >= 0:
                    env.wait_read(start, end)
                    got = os.preadv(src, [mem[pos:pos + span]], start)
                base = start - pos  # the file offset at mem[0]
                for k in range(i, j):
                    at, n, fp = spots[k]
                    d, length = rec.chunks[k]
                    data: memoryview | bytes | None = None
                    if at >= 0 and at + n - start <= got and (
                            trusted or places.fits(mem, at, n, fp, base=base)):
                        data = decode_chunk(mem[at - base:at - base + n])
                    if data is None or len(data) != length:
                        # a small value, in its leaf page, or a place that does not fit
                        value = txn.get(d, db=db)
                        if value is None:
                            raise IntegrityError(f"chunk {d.hex()[:16]} is missing")
                        data = bytes(decode_chunk(value))  # not a view of the map: it moves
                    bufs.append(data)
                    batched += length
                pos += span
            if bufs:
                _pwrite_all(fd, bufs, off)

    @contextmanager
    def _buffer(self, size: int) -> Iterator[memoryview]:
        """A buffer of at least ``size`` bytes for ``_copy_runs``: the one kept for the
        next copy, or, while another copy uses that, one of its own. An anonymous map,
        mapped in one go and not zeroed here (a zeroed 3 MiB bytearray made a 1 MiB
        copy-up take 2.9 ms instead of 1.8)."""
        size = -(-max(size, 1) // PAGE) * PAGE
        kept = self._copy_buffer_lock.acquire(blocking=False)
        try:
            buf = self._copy_buffer if kept else None
            if buf is None or len(buf) < size:
                buf = mmap.mmap(-1, size, flags=(
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE))
                if kept:
                    self._copy_buffer = buf
            with memoryview(buf) as mem:
                yield mem
        finally:
            if kept:
                self._copy_buffer_lock.release()

    def _copy_chunks_following(self, rec: FileRecord, env: Env, txn: Any, fd: int) -> None:
        """``copy_to`` where values cannot be located before they are read: each
        chunk's place tells where the next ones probably are (``_Runs``)."""
        off = 0
        db = env.db("chunks")
        batch: list[memoryview | bytes] = []
        size = 0
        runs = _Runs(2 * COPY_BATCH)  # what data.mdb is asked for (see _read_ahead)
        left = rec.size  # bytes of the file after the chunk
        for i, (d, n) in enumerate(rec.chunks):
            value = txn.get(d, db=db)
            if value is None:
                raise IntegrityError(f"chunk {d.hex()[:16]} is missing")
            left -= n
            if left > 0:  # (the last chunk, a one-chunk file's only one: nothing after it)
                at = env.map_offset(value)
                request = None if at is None else runs.after(at + len(value), left)
                if request is not None:
                    env.read_ahead(*request)
            batch.append(decode_chunk(value))
            size += len(batch[-1])
            if size >= WRITE_BATCH or i == len(rec.chunks) - 1:
                off = _pwrite_all(fd, batch, off)
                batch, size = [], 0


def joined(pieces: list[bytes | memoryview]) -> bytes:
    """The pieces a ``Send`` is handed, as one bytes object."""
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return pieces[0]
    return b"".join(pieces)


def _spans(spots: list[tuple[int, int]], gap: int = SPAN_GAP) -> list[tuple[int, int]]:
    """The stretches of data.mdb that hold the values at ``spots`` ((offset, length),
    in the order they are needed): values less than ``gap`` apart are one stretch
    (each value starts a page of its own), and the stretches are in the order of
    their first value."""
    out: list[list[int]] = []
    for at, n in spots:
        for span in reversed(out):  # most often the last one
            if span[0] - gap <= at <= span[1] + gap:
                span[0], span[1] = min(span[0], at), max(span[1], at + n)
                break
        else:
            out.append([at, at + n])
    return [(a, b) for a, b in out]


def _value_runs(rec: FileRecord, spots: list[tuple[int, int, int]]) -> Runs:
    """The chunks of a file as runs ``(i, j, start, end)``: chunks ``i`` to ``j - 1``,
    whose values lie one after the other in data.mdb (each one's page header starts the
    page after the last one's end, as an import writes them), ``[start, end)`` with the
    first one's header, of at most ``WRITE_BATCH`` bytes of the file and
    ``COPY_BUFFER`` bytes of data.mdb (a longer value is a run of its own, looked up:
    start -1, as is a chunk with no place)."""
    runs: Runs = []
    header = places.PAGE_HEADER
    i, count = 0, len(spots)
    while i < count:
        at, n, _ = spots[i]
        if at < header or header + n > COPY_BUFFER:
            runs.append((i, i + 1, -1, -1))
            i += 1
            continue
        start, end = at - header, at + n
        size = rec.chunks[i][1]
        j = i + 1
        while j < count and size < WRITE_BATCH:
            at, n, _ = spots[j]
            if at != -(-end // PAGE) * PAGE + header or at + n - start > COPY_BUFFER:
                break
            end = at + n
            size += rec.chunks[j][1]
            j += 1
        runs.append((i, j, start, end))
        i = j
    return runs


def _next_request(asked: int, at: int, window: int, left: int) -> tuple[int, int] | None:
    """What a reader of a file should ask the store's file for next, as (start, stop),
    after a chunk whose value ends at ``at``, with ``left`` bytes of the file after it;
    None if what was asked for (up to ``asked``) still reaches far enough. The request
    goes on from the last one, unless the chunk lies elsewhere in the store (a part of
    the file shared with an earlier import is stored before it), and covers at most
    ``window`` bytes and about what the rest of the file takes in the store: each
    chunk's value has a codec byte and a page header and fills whole 4 KiB pages."""
    if asked - window // 2 >= at >= asked - 2 * window:
        return None
    start = asked if asked - 2 * window <= at <= asked else at
    stop = at + min(window, left + left // 4 + 4096)
    return (start, stop) if stop > start else None


class _Runs:
    """What a reader of a whole file, chunk after chunk, has asked the store's file for:
    one range per run of the file's chunks in data.mdb. An import stores a file's
    chunks one after the other, but LMDB puts a value in pages freed earlier when it
    has some, so in a store that has seen a gc or a commit, the chunks of a file
    alternate between two or more places (a 256 MiB file of the benchmark store: a
    jump of 11-14 MB every few chunks). A single "next bytes after the last chunk",
    as before, asked for a run again at each turn: 206 requests for 3,165 MiB to copy
    that file, against 40 for 358 MiB here."""

    KEEP = 4  #: runs remembered (the oldest is dropped)

    def __init__(self, window: int):
        self.window = window
        self.runs: list[list[int]] = []  #: [start, stop) asked for, most recent last

    def after(self, at: int, left: int) -> tuple[int, int] | None:
        """After a chunk whose stored value ends at ``at``, with ``left`` bytes of the
        file after it: what to ask for next, as (offset, length), or None. A run is
        asked for further when less than half a window of it is left ahead, from where
        it stopped, and no further than the rest of the file can take (a chunk value
        fills whole 4 KiB pages, and has a header)."""
        want = min(self.window, left + left // 4 + 4096)
        for i, run in enumerate(self.runs):
            if run[0] <= at <= run[1]:
                if at + want // 2 <= run[1]:
                    return None
                start, run[1] = run[1], at + want
                self.runs.append(self.runs.pop(i))
                return (start, run[1] - start) if run[1] > start else None
        self.runs.append([at, at + want])
        if len(self.runs) > self.KEEP:
            self.runs.pop(0)
        return (at, want)


def _pwrite_all(fd: int, bufs: list[memoryview | bytes], off: int) -> int:
    """Write ``bufs`` at ``off`` (one pwritev, more if the kernel writes less); returns
    the offset after them."""
    want = off + sum(len(b) for b in bufs)
    while bufs:
        n = os.pwritev(fd, bufs, off)
        off += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        if bufs and n:
            bufs = [memoryview(bufs[0])[n:], *bufs[1:]]
    assert off == want
    return off


_UNSEEN: Any = object()  #: not resolved yet (``MergedLowers._nodes`` holds None for "none")


@dataclass
class Prefetched:
    """What ``MergedLowers.prefetch`` did: files (and their bytes) copied into the file
    cache, found there already, and left out for want of room in its budget."""

    copied: int = 0
    copied_bytes: int = 0
    had: int = 0
    had_bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0


class MergedLowers:
    """The merged, read-only tree of a stack of layers (see the module docstring)."""

    def __init__(self, layers: StoreLayers):
        self.layers = layers
        self._nodes: dict[bytes, Node | None] = {}
        #: directory -> its visible children, made once (layers never change)
        self._listings: dict[bytes, list[tuple[bytes, Node]]] = {}
        self._lock = threading.Lock()
        #: ``close`` found no copy for the file cache still being made (the daemon)
        self.closed_quietly = True

    def _ino(self, vpath: bytes, layer: int, e: Entry) -> int:
        if e.type == DIR:
            return ino_of(b"d", vpath)
        ident = self.layers.identity(layer)
        if e.link_group:
            return ino_of(b"h", ident, str(e.link_group).encode())
        return ino_of(b"f", ident, vpath)

    def resolve(self, vpath: bytes) -> Node | None:
        """The node at ``vpath``, or None if no visible lower has it."""
        with self._lock:
            if vpath in self._nodes:
                return self._nodes[vpath]
        node = self._resolve(vpath)
        with self._lock:
            self._nodes[vpath] = node
        return node

    def _resolve(self, vpath: bytes) -> Node | None:
        if vpath == b"/":
            candidates: Sequence[int] = range(len(self.layers))
        else:
            parent_path, _ = split_vpath(vpath)
            parent = self.resolve(parent_path)
            if parent is None or parent.entry.type != DIR:
                return None
            candidates = parent.dir_layers
        return self._merge(vpath, candidates, lambda li: self.layers.lookup(li, vpath))

    def _merge(self, vpath: bytes, candidates: Sequence[int],
               entry_of: Callable[[int], Entry | None]) -> Node | None:
        """The node at ``vpath`` from its entry in each layer that may have it
        (``candidates``, top first: its parent's directory layers), as ``entry_of(layer)``
        gives them (None: the layer has none)."""
        dir_layers: list[int] = []
        attrs: Entry | None = None
        for li in candidates:
            e = entry_of(li)
            if e is None:
                continue
            if e.type == WHITEOUT:
                break
            if e.type != DIR:
                if not dir_layers:
                    nlink = self.layers.group_size(li, e.link_group) if e.link_group else 1
                    return Node(vpath, e, self._ino(vpath, li, e), layer=li, nlink=nlink)
                break  # a non-directory under a directory is hidden by it
            dir_layers.append(li)
            if attrs is None and not e.implicit:
                attrs = e
            if e.opaque:
                break
        if not dir_layers:
            if vpath == b"/":
                return Node(vpath, ROOT_ENTRY, ino_of(b"d", vpath), dir_layers=[])
            return None
        entry = attrs or entry_of(dir_layers[0]) or ROOT_ENTRY
        return Node(vpath, entry, self._ino(vpath, dir_layers[0], entry), dir_layers=dir_layers)

    def lookup(self, vpath: bytes) -> Node:
        node = self.resolve(vpath)
        if node is None:
            raise NoEntryError(vpath)
        return node

    def listdir(self, vpath: bytes) -> list[tuple[bytes, Node]]:
        """The visible children of a directory, sorted by name (a list kept for the
        next call: callers must not change it)."""
        with self._lock:
            listing = self._listings.get(vpath)
        if listing is None:
            listing = self._listdir(vpath)
            with self._lock:
                self._listings[vpath] = listing
        return listing

    def _listdir(self, vpath: bytes) -> list[tuple[bytes, Node]]:
        node = self.lookup(vpath)
        if node.entry.type != DIR:
            raise OverlayError(20, vpath)  # ENOTDIR
        names: dict[bytes, bool] = {}  # name -> visible (False: hidden by a whiteout)
        listed: dict[int, dict[bytes, Entry]] = {}  # layer -> its entries here
        for li in node.dir_layers:
            entries = listed[li] = dict(self.layers.list(li, vpath))
            for name, e in entries.items():
                if name not in names:
                    names[name] = e.type != WHITEOUT
        out = []
        for name in sorted(n for n, visible in names.items() if visible):
            # each child merged from the listings (as ``resolve`` would from a lookup in
            # each layer: one decode of each entry, not two)
            path = join_vpath(vpath, name)
            with self._lock:
                child = self._nodes.get(path, _UNSEEN)
            if child is _UNSEEN:
                child = self._merge(path, node.dir_layers,
                                    lambda li, n=name: listed[li].get(n))  # type: ignore[misc]
                with self._lock:
                    child = self._nodes.setdefault(path, child)
            if child is not None:
                out.append((name, child))
        return out

    def links(self, node: Node) -> list[bytes]:
        """The other paths of ``node``'s layer that are hard links of it and that the
        merged lowers show as that same inode."""
        if node.entry.type == DIR or not node.entry.link_group or node.nlink < 2:
            return []
        paths = getattr(self.layers, "group_paths", None)
        if paths is None:
            return []
        out = []
        for p in paths(node.layer, node.entry.link_group):
            if p != node.vpath:
                other = self.resolve(p)
                if other is not None and other.ino == node.ino:
                    out.append(p)
        return out

    def read(self, node: Node, offset: int, size: int) -> bytes:
        return self.layers.read(node.layer, node.vpath, node.entry, offset, size)

    def read_into(self, node: Node, offset: int, size: int, send: Send) -> None:
        """``read``, handed to ``send`` (``Send``): with no copy of the store's pages
        where the layers can (``StoreLayers.read_into``)."""
        into = getattr(self.layers, "read_into", None)
        if into is None:
            send([self.layers.read(node.layer, node.vpath, node.entry, offset, size)])
        else:
            into(node.layer, node.vpath, node.entry, offset, size, send)

    def backing(self, node: Node) -> int | None:
        """A read-only fd (the caller's) of a plain file holding the whole content of
        regular file ``node``, for FUSE passthrough, or None (see ``StoreLayers.backing``,
        ``DirLayers.backing``)."""
        backing = getattr(self.layers, "backing", None)
        if backing is None or node.entry.type != REG:
            return None
        return backing(node.layer, node.vpath, node.entry)  # type: ignore[no-any-return]

    def keep(self, node: Node) -> None:
        """A reader read ``node``'s data through the daemon and closed it
        (``StoreLayers.keep``)."""
        keep = getattr(self.layers, "keep", None)
        if keep is not None and node.entry.type == REG:
            keep(node.layer, node.vpath, node.entry)

    def prefetch(self, tick: Callable[[int], None] | None = None) -> Prefetched:
        """Copy every big regular file the view shows (``FILL_FROM`` bytes and up) into
        the store's file cache now (``layerstore prefetch``), so that a mount passes
        even its first read through to the kernel instead of serving it from the
        chunks. Up to the cache's budget, the copies already there counted in it (and
        touched, so that they are the last to leave); a file that does not fit what
        is left is skipped. ``tick(n)``: bytes copied."""
        fc: FileCache | None = getattr(self.layers, "file_cache", None)
        out = Prefetched()
        if fc is None or not fc.enabled:
            return out
        room = fc.budget
        seen: set[bytes] = set()  # one copy per content (hard links, equal files)
        dirs = [b"/"]
        while dirs:
            d = dirs.pop()
            for name, node in reversed(self.listdir(d)):
                e = node.entry
                if e.type == DIR:
                    dirs.append(join_vpath(d, name))
                if e.type != REG or e.size < FILL_FROM or not e.digest or e.digest in seen:
                    continue
                seen.add(e.digest)
                fd = fc.open(e.digest, e.size)  # (touches it)
                if fd is not None:
                    os.close(fd)
                    out.had += 1
                    out.had_bytes += e.size
                    room -= e.size
                elif e.size > room:
                    out.skipped += 1
                    out.skipped_bytes += e.size
                else:
                    if fc.fill(e.digest, e.size, functools.partial(self.copy_to, node)):
                        out.copied += 1
                        out.copied_bytes += e.size
                    else:  # made meanwhile (by a mount's filler)
                        out.had += 1
                        out.had_bytes += e.size
                    room -= e.size
                    if tick is not None:
                        tick(e.size)
        return out

    def close(self) -> bool:
        """Close the layers; False (and ``closed_quietly``) if a copy for the file
        cache is still being made from the store, which must then stay open
        (``StoreLayers.close``)."""
        close = getattr(self.layers, "close", None)
        self.closed_quietly = close is None or close() is not False
        return self.closed_quietly

    def copy_to(self, node: Node, fd: int, block: int = 1 << 20) -> None:
        """Write a regular file's whole content to ``fd`` from offset 0 (a copy-up)."""
        copy = getattr(self.layers, "copy_to", None)
        if copy is not None:
            copy(node.layer, node.vpath, node.entry, fd)
            return
        off, size = 0, node.entry.size
        while off < size:
            data = self.read(node, off, block)
            if not data:
                break
            off = _pwrite_all(fd, [data], off)
