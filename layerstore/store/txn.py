"""The LMDB environment, and the only place that opens transactions.

Contract (py-lmdb docs, "Threads" and "Forking & multiprocessing"):

- One ``Env`` per process, opened after any fork; never inherited by a child.
- ``Env.read()`` yields a read-only transaction; ``Env.write(fn)`` runs ``fn(txn)`` in a
  write transaction and commits, or aborts on any exception. No transaction outlives the
  call that opened it, and none is held by a generator that yields to its caller.
- ``MapFullError`` is handled here only: the write is aborted, the map doubled and
  ``fn`` run again from the start, so ``fn`` must not have side effects outside ``txn``.
  ``MapResizedError`` (another process grew the map) adopts the new size and retries.

Named databases (one per record type) are listed in ``DBS``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ..errors import StoreAccessError, StoreError

T = TypeVar("T")

#: One named database per record type (DESIGN.md §2).
DBS = ("chunks", "files", "entries", "layers", "images", "names", "containers", "meta",
       "places")

#: Initial map size. On 64-bit Linux it is only reserved address space; the file grows
#: as pages are written, and the map doubles on ``MapFullError``.
DEFAULT_MAP_SIZE = 1 << 30
MAX_MAP_SIZE = 1 << 44


_MADV_DONTNEED = 4
_SYNC_FILE_RANGE_WRITE = 2
#: what the read-ahead thread reads at a time, and how many requests may wait for it
READ_AHEAD_PIECE = 4 << 20
READ_AHEAD_WAITING = 4
#: a request up to this size is a posix_fadvise(WILLNEED) in the caller's thread
READ_AHEAD_INLINE = 2 << 20
#: the longest a remap waits for the transactions of other threads to end (s)
REMAP_WAIT = 120.0
#: the longest a reader waits for the read-ahead thread to reach what it needs (s), and
#: how far the thread may be from it (bytes still to read before) for a reader to wait
READ_AHEAD_WAIT = 2.0
READ_AHEAD_WAIT_BYTES = 64 << 20
#: threads looking up the keys a reader of many chunks will ask for (``Env.warm_keys``),
#: and at most this many of them at once in a process (each holds a reader slot)
WARM_THREADS = 4
WARM_THREADS_MAX = 8
PAGE = 4096
_libc: Any = None
_buffer_address: Any = None


def _c() -> Any:
    """libc through ctypes (madvise, sync_file_range); calls release the GIL."""
    global _libc
    if _libc is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        lib.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_uint)
        lib.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
        _libc = lib
    return _libc


def buffer_address(buf: Any) -> int:
    """The address of the memory behind a buffer (a memoryview into the map), through
    the buffer protocol: read-only buffers cannot be given to ``ctypes.from_buffer``."""
    global _buffer_address
    if _buffer_address is None:
        import ctypes

        class _PyBuffer(ctypes.Structure):
            _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                        ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                        ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                        ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                        ("internal", ctypes.c_void_p)]

        get = ctypes.pythonapi.PyObject_GetBuffer
        get.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = (ctypes.POINTER(_PyBuffer),)

        def address(b: Any) -> int:
            view = _PyBuffer()
            get(b, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises if b is no buffer
            try:
                return int(view.buf or 0)
            finally:
                release(ctypes.byref(view))

        _buffer_address = address
    return int(_buffer_address(buf))


#: where a py-lmdb ``Cursor`` keeps its current value, as an MDB_val (size, then
#: address), bytes into the object; found once per process (``_value_slot``), -1 if not
_VALUE_SLOT: int | None = None


def _value_slot(txn: lmdb.Transaction, dbi: Any) -> int:
    """Where a cursor object keeps the MDB_val of its current value (-1: unknown).

    py-lmdb touches every page of a value before it hands the value over (its
    ``preload``, in ``get`` and ``Cursor.value``), so a reader learns where a value
    lies only after reading all of it: one 4 KiB page fault at a time when the store
    is cold (the map has no readahead). A cursor put on a key (``set_key``) reads
    only the B-tree, and keeps the value's size and address in its object. Found here
    by looking, in the object's own memory, for the (size, address) of a value whose
    address is known (one got through ``Cursor.value``), on two entries. Any other
    layout (another py-lmdb) finds no single place, and readers go on without it."""
    global _VALUE_SLOT
    if _VALUE_SLOT is not None:
        return _VALUE_SLOT
    import ctypes
    import struct

    def offsets(cur: Any) -> set[int]:
        value = cur.value()
        want = (len(value), buffer_address(value))
        size = type(cur).__basicsize__
        raw = ctypes.string_at(id(cur), size)
        return {o for o in range(0, size - 15, 8) if struct.unpack_from("=QQ", raw, o) == want}

    try:
        cur = txn.cursor(db=dbi)
        if not cur.first() or not isinstance(cur.value(), memoryview):
            return -1  # nothing to learn from (yet): not remembered
        found = offsets(cur)
        if cur.last():
            found &= offsets(cur)
        _VALUE_SLOT = found.pop() if len(found) == 1 else -1
    except Exception:  # noqa: BLE001 - an optimisation only
        _VALUE_SLOT = -1
    return _VALUE_SLOT


def _in_page_cache(addr: int) -> bool:
    """Whether the page of a file map at ``addr`` (page-aligned) is in the page cache:
    mincore of that one page."""
    import ctypes

    vec = ctypes.create_string_buffer(1)
    return bool(_c().mincore(addr, PAGE, vec) == 0 and vec.raw[0] & 1)


def _madvise(ranges: list[tuple[int, int]], advice: int) -> None:
    try:
        libc = _c()
        for lo, hi in ranges:
            libc.madvise(lo, hi - lo, advice)
    except (OSError, AttributeError):
        pass  # an optimisation only


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Where ``path`` is mapped in this process (from /proc/self/maps)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith(path):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    out.append((lo, hi))
    except (OSError, ValueError):
        pass
    return out


class _ReadAhead:
    """Reads ranges of data.mdb into the page cache without the caller waiting.

    A large range is read in a thread of its own, in the order asked, by ``sendfile``
    to /dev/null from an fd with sequential readahead: the kernel reads it in large
    folios and big requests, and nothing is copied. ``posix_fadvise(WILLNEED)`` in
    the caller's thread, which this replaced for large ranges, fills the page cache
    one 4 KiB folio at a time and costs the caller the allocation of each: the 313 MB
    of data.mdb holding a 256 MiB file came in in 81 ms (3.9 GB/s) through sendfile,
    where WILLNEED took 59 ms of CPU only to start the reads. A small range (up to
    ``READ_AHEAD_INLINE``) is still a WILLNEED: its reads start at once, where the
    thread may first have to wait for the GIL (a cold 1 MiB copy-up took 9.9 ms
    instead of 7.4 through the thread). So is a large one while ``READ_AHEAD_WAITING``
    requests wait already (several readers at once: each gets its reads started, as
    before, rather than queue behind the others), or when no thread can be started."""

    def __init__(self, path: str):
        self.path = path
        self.cv = threading.Condition()
        self.waiting: deque[tuple[int, int]] = deque()
        self.thread: threading.Thread | None = None
        self.fd = -1  #: data.mdb (-2: closed)
        self.closed = False
        #: [where the thread is, end] of the request it reads now (None: none)
        self.current: list[int] | None = None

    def _fd(self) -> int:
        with self.cv:
            if self.fd == -1:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # twice the window
            return self.fd

    def ask(self, offset: int, length: int) -> None:
        if length > READ_AHEAD_INLINE and self._queue(offset, length):
            return
        self.now(offset, length)

    def now(self, offset: int, length: int) -> None:
        """Start the reads of the range at once (WILLNEED), in the caller's thread."""
        # without the lock: readers of different files do not wait for each other
        # (closed meanwhile: EBADF, or advice about another file; harmless)
        fd = self._fd()
        if fd >= 0:
            for start in range(offset, offset + length, READ_AHEAD_INLINE):
                os.posix_fadvise(fd, start, min(READ_AHEAD_INLINE, offset + length - start),
                                 os.POSIX_FADV_WILLNEED)

    def _queue(self, offset: int, length: int) -> bool:
        """Hand a request to the thread; False if it is busy or cannot be started."""
        with self.cv:
            if self.closed:
                return True
            if len(self.waiting) >= READ_AHEAD_WAITING:
                return False
            if self.thread is None:
                thread = threading.Thread(target=self._run, name="layerstore read-ahead",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no more threads here (a pids limit)
                    return False
                self.thread = thread
            self.waiting.append((offset, length))
            self.cv.notify()
            return True

    def _run(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            while True:
                with self.cv:
                    while not self.waiting and not self.closed:
                        self.cv.wait()
                    if self.closed:
                        return
                    offset, length = self.waiting[0]
                    end = offset + length
                    self.current = [offset, end]  # before it leaves ``waiting``: see wait_for
                    self.waiting.popleft()
                try:
                    src = self._fd()
                    while offset < end and not self.closed:
                        n = os.sendfile(null, src, offset, min(READ_AHEAD_PIECE, end - offset))
                        if n <= 0:
                            break  # past the end of the file
                        offset += n
                        with self.cv:
                            self.current = [offset, end]
                            self.cv.notify_all()
                except OSError:
                    pass  # an optimisation only: the reader reads what it needs anyway
                finally:
                    with self.cv:
                        self.current = None
                        self.cv.notify_all()
        finally:
            os.close(null)

    def _ahead(self, offset: int, end: int) -> int | None:
        """How many bytes the thread is to read before it has read [offset, end), if it
        is to read some of it; None if not (holding ``cv``)."""
        cur = self.current
        if cur is not None and cur[0] < end and offset < cur[1]:
            return end - cur[0]
        before = cur[1] - cur[0] if cur is not None else 0
        for o, n in self.waiting:
            if o < end and offset < o + n:
                return before + end - o
            before += n
        return None

    def wait_for(self, offset: int, end: int, timeout: float = READ_AHEAD_WAIT) -> None:
        """Wait until the thread has read what it was asked for of [offset, end), if
        anything: a reader that touched those pages first would read them one page
        fault (4 KiB) at a time, in its own thread, and the thread would then find
        them there (5,000 such faults made a cold 256 MiB copy-up 2x fuse-overlayfs's
        time). Gives up after ``timeout`` seconds: the pages are read anyway."""
        if not self.waiting and self.current is None:
            return  # idle (read without the lock, in this order: a request is made
            # ``current`` before it leaves ``waiting``)
        with self.cv:
            far = self._ahead(offset, end)
            if far is None or far > READ_AHEAD_WAIT_BYTES:
                return  # not asked for, or far behind other requests: read it now
            deadline = time.monotonic() + timeout
            while not self.closed and self._ahead(offset, end) is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not (self.thread and self.thread.is_alive()):
                    return
                self.cv.wait(left)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
            thread = self.thread
        if thread is not None and thread.ident is not None:
            thread.join()  # at most one piece to finish
        with self.cv:
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -2


class _Gate:
    """Who reads the map (transactions, map views) against who maps it anew.

    When another process grows the store, the next transaction begun here fails with
    MapResizedError and LMDB must be mapped anew (``Env._set_mapsize``). Other threads
    may be inside transactions then, holding values and slices of the old map; py-lmdb
    aborts their transactions, but not what they hold (a helper showed a SIGBUS). So
    every transaction holds the gate shared, and a remap holds it exclusive: it waits
    for the readers to finish, and new ones wait for it. A thread counts its holds, so
    a transaction begun inside another one does not wait; such a thread cannot remap
    (it would wait for itself), and gets a "try again" error instead."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.readers = 0  #: threads holding the gate shared
        self.remapping = False
        self.local = threading.local()

    def depth(self) -> int:
        return getattr(self.local, "depth", 0)  # type: ignore[no-any-return]

    # enter and leave run for every transaction: the lock itself, not the condition,
    # on the way that does not wait (~0.5 us a pair); the thread's depth changes with
    # the count, under the lock
    def enter(self) -> None:
        local = self.local
        depth = getattr(local, "depth", 0)
        if depth:
            local.depth = depth + 1
            return
        with self.lock:
            while self.remapping:
                self.cv.wait()
            self.readers += 1
            local.depth = 1

    def leave(self) -> None:
        local = self.local
        depth = getattr(local, "depth", 0)
        if depth > 1:
            local.depth = depth - 1
            return
        if depth == 1:
            with self.lock:
                local.depth = 0
                self.readers -= 1
                if self.readers == 0 and self.remapping:
                    self.cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if self.depth():
            raise StoreError("the store grew meanwhile; try again")
        with self.lock:
            while self.remapping:
                self.cv.wait()
            self.remapping = True
            try:
                deadline = time.monotonic() + REMAP_WAIT
                while self.readers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreError("the store grew meanwhile, and a reader did not "
                                         "finish; try again")
                    self.cv.wait(left)
            except BaseException:
                self.remapping = False
                self.cv.notify_all()
                raise
        try:
            yield
        finally:
            with self.lock:
                self.remapping = False
                self.cv.notify_all()


class Env:
    """An open LMDB environment with its named databases."""

    def __init__(self, path: Path, *, map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False):
        self.path = path
        #: where data.mdb is mapped; found again after anything that remaps it
        self._map_ranges: list[tuple[int, int]] | None = None
        #: counts the times this process mapped data.mdb anew (``_set_mapsize``)
        self.map_epoch = 0
        self._pages_known: bool | None = None
        self._gate = _Gate()  #: transactions against remaps (``_Gate``)
        self._view: tuple[int, memoryview] | None = None  #: (map_epoch, ``map_view``)
        #: data.mdb as /proc/self/maps names it (symlinks resolved)
        self._data_path = os.path.realpath(path / "data.mdb")
        self._read_ahead = _ReadAhead(self._data_path)
        #: ``warm_keys`` threads (with the event that stops them), stopped by ``close``
        self._warmers: list[tuple[threading.Event, threading.Thread]] = []
        self._warm_lock = threading.Lock()
        self._warm_closed = False
        try:
            if not readonly:
                path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=len(DBS) + 2,
                subdir=True,
                readonly=readonly,
                lock=True,
                # MDB_NORDAHEAD (MADV_RANDOM): B-tree lookups touch scattered pages, and
                # with readahead every fault read 128 KiB around its page (a small
                # file's first copy-up through a mount: 24-31 ms cold, ~4 ms without).
                # Readers of whole files ask for what follows themselves (``read_ahead``;
                # without: cold sequential reads at 50-60 MB/s).
                readahead=False,
                # Commits do not fsync; ``sync()`` makes them durable at the end of each
                # command. A killed process loses nothing (the page cache has it all); a
                # power cut may lose the work of the command that was running.
                sync=False,
                max_readers=256,
                create=not readonly,
            )
        except lmdb.ReadonlyError as exc:
            raise StoreAccessError(f"store {path.parent} is read-only") from exc
        except (lmdb.Error, OSError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            if isinstance(exc, PermissionError) or (
                isinstance(exc, lmdb.Error) and "Permission denied" in str(exc)
            ):
                reason = "permission denied"
            raise StoreAccessError(f"cannot open store at {path.parent}: {reason}") from exc
        if not readonly:
            with self.env.begin(write=True) as txn:
                self.dbs = {name: self.env.open_db(name.encode(), txn=txn) for name in DBS}
        else:
            self.dbs = {name: self.env.open_db(name.encode(), create=False) for name in DBS}

    def db(self, name: str) -> Any:
        return self.dbs[name]

    @contextlib.contextmanager
    def read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read-only transaction, closed when the block ends. With ``buffers``, values
        are memoryviews into the map, valid only inside the block (no copy). It holds
        the map in place (``_Gate``) until then."""
        self._gate.enter()
        try:
            for _ in range(3):
                try:
                    txn = self.env.begin(write=False, buffers=buffers)
                    break
                except lmdb.MapResizedError:
                    self._remap(0)
            else:  # pragma: no cover - the map cannot keep growing under us
                raise StoreError("store map kept resizing; try again")
            try:
                yield txn
            finally:
                txn.abort()
        finally:
            self._gate.leave()

    def _remap(self, size: int | None) -> None:
        """From inside ``read``/``write``: let go of the gate, map the store anew (at
        ``size``; 0: its size now; None: twice as big), and hold the gate again."""
        if self._gate.depth() > 1:
            raise StoreError("the store grew meanwhile; try again")
        self._gate.leave()
        try:
            if size is None:
                self._grow()
            else:
                self._set_mapsize(size)
        finally:
            self._gate.enter()

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn(txn)`` in one write transaction; commit on success, abort on error.

        ``fn`` may run more than once (after the map grows), so it must only act on txn.
        """
        self._gate.enter()
        try:
            return self._write(fn)
        finally:
            self._gate.leave()

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            try:
                txn = self.env.begin(write=True)
            except lmdb.MapResizedError:
                self._remap(0)
                continue
            try:
                result = fn(txn)
                txn.commit()
                return result
            except lmdb.MapFullError:
                txn.abort()
                self._remap(None)
            except lmdb.MapResizedError:
                txn.abort()
                self._remap(0)
            except lmdb.DiskError as exc:
                txn.abort()
                raise StoreError(f"store disk error: {exc}") from exc
            except lmdb.Error as exc:
                txn.abort()
                if "No space left" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
                    raise StoreError("no space left on the store's disk") from exc
                raise
            except BaseException:
                txn.abort()
                raise

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        if size >= MAX_MAP_SIZE:
            raise StoreError("store map is at its maximum size")
        self._set_mapsize(min(size * 2, MAX_MAP_SIZE))

    def _set_mapsize(self, size: int) -> None:
        self._stop_warmers()  # they read the map without the caller knowing
        with self._gate.exclusive():  # no transaction, or view of the map, is open
            self._map_ranges = None  # LMDB maps the file anew
            self._view = None
            self.map_epoch += 1  # readers of ``map_view`` see it moved (``places``)
            try:
                self.env.set_mapsize(size)
            finally:
                # again: a caller outside any transaction (read_ahead) may have read
                # /proc/self/maps meanwhile; ``_ranges`` keeps no answer read across
                # a change of the epoch
                self._map_ranges = None
                self.map_epoch += 1

    def locate_map(self) -> None:
        """Find where data.mdb is mapped now, ahead of the first ``map_offset`` or
        ``read_ahead`` (reading /proc/self/maps took ~0.7 ms in a mount's daemon, and
        its first copy-up paid it)."""
        self._ranges()

    def _ranges(self) -> list[tuple[int, int]]:
        """Where data.mdb is mapped (found again after anything that remaps it; not
        kept when the map moved, or may have, while it was being found)."""
        ranges = self._map_ranges
        if ranges is None:
            epoch = self.map_epoch
            ranges = _mapped_ranges(self._data_path)
            if epoch == self.map_epoch and not self._gate.remapping:
                self._map_ranges = ranges
        return ranges

    def release_map(self) -> None:
        """Unmap the pages of the data file that this process has touched.

        LMDB reads its B-tree through a shared, read-only map of data.mdb, and the
        kernel's fault-around maps up to 16 neighbouring pages with every page read, when
        they are in the page cache. During an import they are: they are the chunk values
        it has just written. So each leaf page an import looks at brings ~64 KiB of
        unrelated chunk data into its resident set; a 1 GiB import looked at enough
        leaves to show 200+ MiB of the map as resident memory. MADV_DONTNEED only drops
        this process's page-table entries: the data stays in the page cache and on disk,
        and the next access maps it again. It is safe at any time, also inside a
        transaction, because the map is never written through (no ``writemap``): dirty
        pages of a write transaction live in LMDB's own heap buffers until the commit.
        Cheap (one madvise) after the first call, so writers call it every few hundred
        operations.
        """
        self._gate.enter()  # MADV_DONTNEED where the map was would zero what is there now
        try:
            _madvise(self._ranges(), _MADV_DONTNEED)
        finally:
            self._gate.leave()

    def map_offset(self, value: Any) -> int | None:
        """Where ``value`` (a memoryview from a ``buffers`` read transaction that is
        still open) starts in data.mdb, which LMDB maps from offset 0; None if unknown."""
        try:
            addr = buffer_address(value)
        except (TypeError, ValueError, AttributeError, OSError):
            return None
        return self.offset_of(addr)

    def offset_of(self, addr: int) -> int | None:
        """Where the map's address ``addr`` lies in data.mdb (LMDB maps the file from
        offset 0, at the start of the first range); None if not in the map."""
        ranges = self._ranges()
        for lo, hi in ranges:
            if lo <= addr < hi:
                return addr - ranges[0][0]
        return None

    def value_address(self, txn: lmdb.Transaction,
                      db: str) -> Callable[[bytes], tuple[int, int] | None] | None:
        """A function that says where the value of a key of ``db`` is in memory, as
        (address, length), or None if the key is not there. It reads the B-tree and not
        the value (see ``_value_slot``). Valid while ``txn`` is open (a read transaction
        opened with ``buffers``, or a write transaction). None if this py-lmdb keeps its
        cursors otherwise."""
        import ctypes

        dbi = self.db(db)
        slot = _VALUE_SLOT
        if slot is None and self._gate.depth() == 0:
            slot = self.learn_value_slot(db)
        if slot is None or slot < 0:
            return None
        cur = txn.cursor(db=dbi)
        val = (ctypes.c_uint64 * 2).from_address(id(cur) + slot)

        def address(key: bytes) -> tuple[int, int] | None:
            return (val[1], val[0]) if cur.set_key(key) else None

        return address

    def learn_value_slot(self, db: str = "chunks") -> int | None:
        """Find where py-lmdb's cursors keep their value (``_value_slot``), in a read
        transaction of its own (py-lmdb's MDB_NOTLS allows one beside a write
        transaction); ``Store.open`` does, so that no transaction has to nest one."""
        slot = _VALUE_SLOT
        if slot is None:
            with self.read(buffers=True) as rtxn:
                # meta first: its values are a few bytes (a chunk is read whole, and
                # cold that is 4 KiB at a time)
                for name in ("meta", db):
                    slot = _value_slot(rtxn, self.db(name))
                    if _VALUE_SLOT is not None:
                        break
        return slot

    def value_locator(self, txn: lmdb.Transaction,
                      db: str) -> Callable[[bytes], tuple[int, int] | None] | None:
        """A function that says where the value of a key of ``db`` lies in data.mdb, as
        (offset, length), or None if the key is not there, without reading the value
        (``value_address``): a reader can ask for all of a file's chunks before it
        touches the first. Valid while ``txn`` (a ``buffers`` read transaction) is
        open. None if values cannot be found so, or the map is not found."""
        address = self.value_address(txn, db)
        if address is None:
            return None

        def where(key: bytes) -> tuple[int, int] | None:
            got = address(key)
            at = None if got is None else self.offset_of(got[0])
            return None if at is None else (at, got[1])  # type: ignore[index]

        return where

    def pages_known(self) -> bool:
        """Whether data.mdb's pages are laid out as ``places`` reads them: LMDB 0.9's
        format (py-lmdb 3 can also open 1.0's, whose page header is longer) and 4 KiB
        pages."""
        if self._pages_known is None:
            try:
                self._pages_known = (self.env.lib_version()[:2] == (0, 9)
                                     and self.env.stat()["psize"] == PAGE)
            except (AttributeError, lmdb.Error):
                self._pages_known = False
        return self._pages_known

    def open_data(self) -> int:
        """A new read-only fd on data.mdb, for a reader that reads much of it with
        ``pread`` (its own readahead state: not the read-ahead thread's fd)."""
        return os.open(self._data_path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, offset: int, n: int) -> bytes:
        """``n`` bytes of data.mdb from ``offset``, read from the file (the map is not
        touched)."""
        return os.pread(self._read_ahead._fd(), n, offset)

    def map_view(self, need: int = 0) -> memoryview | None:
        """The map of data.mdb as bytes (no copy), up to the file's end: a read
        transaction open now finds all of its pages in it. Valid until the map moves
        (``_set_mapsize``), like the values of a ``buffers`` transaction; None if the
        map is not found. The last one is given again while the map has not moved and
        it reaches ``need`` (a view costs a stat of data.mdb)."""
        import ctypes

        epoch = self.map_epoch
        last = self._view
        if last is not None and last[0] == epoch and len(last[1]) >= need:
            return last[1]
        ranges = self._ranges()
        if len(ranges) != 1:
            return None
        lo, hi = ranges[0]
        try:
            size = min(hi - lo, os.stat(self._data_path).st_size)
        except OSError:
            return None
        view = memoryview((ctypes.c_char * size).from_address(lo)).cast("B")
        self._view = (epoch, view)
        return view

    def _resident(self, offset: int) -> bool:
        """Whether the page of data.mdb at ``offset`` is in the page cache (mincore of
        one page of the map); False when unsure."""
        try:
            ranges = self._ranges()
            if not ranges:
                return False
            lo, hi = ranges[0]
            addr = lo + offset - offset % PAGE
            return addr < hi and _in_page_cache(addr)
        except (OSError, AttributeError):
            return False

    def read_ahead(self, offset: int, length: int) -> None:
        """Have data.mdb[offset, offset + length) read into the page cache, without
        waiting (``_ReadAhead``; the map itself is opened without readahead, see
        ``__init__``), unless the pages in its middle and at its end are there already
        (two one-page mincore calls): asking for what is there walks the page cache
        page by page (WILLNEED did: 21% of a warm 256 MiB copy-up), and so does a
        mincore of the whole range. Not the first page: the caller has just read the
        chunk that ends there. An optimisation only: errors are ignored."""
        if length <= 0 or (self._resident(offset + length // 2)
                           and self._resident(offset + length - 1)):
            return
        try:
            self._read_ahead.ask(offset, length)
        except (OSError, RuntimeError):
            pass

    def ask_value(self, txn: lmdb.Transaction, key: bytes, db: str) -> None:
        """Start reading the pages of the value of ``key`` now (WILLNEED: one read
        request), if it spans several, without touching them (``value_locator``;
        ``txn`` a ``buffers`` one). py-lmdb's ``get`` touches a value's every page
        before it returns, and the map has no readahead, so a cold value comes in one
        4 KiB fault at a time: the file record of a 256 MiB file (3,800 chunks,
        137 KB) took ~2.8 ms to load cold, its places ~1.5 ms."""
        where = self.value_locator(txn, db)
        got = None if where is None else where(key)
        if got is not None and got[1] > 2 * PAGE:
            try:
                self._read_ahead.now(*got)
            except OSError:
                pass  # an optimisation only

    def read_now(self, offset: int, length: int) -> None:
        """Start reading data.mdb[offset, offset + length) into the page cache now, in
        the caller's thread (WILLNEED), without waiting for it, unless its middle and
        last pages are there (as ``read_ahead``). An optimisation only."""
        if length <= 0 or (self._resident(offset + length // 2)
                           and self._resident(offset + length - 1)):
            return
        try:
            self._read_ahead.now(offset, length)
        except OSError:
            pass

    def wait_read(self, offset: int, end: int) -> None:
        """Wait until the read-ahead thread has read data.mdb[offset, end), if it is to
        read some of it (``_ReadAhead.wait_for``); at once otherwise."""
        self._read_ahead.wait_for(offset, end)

    def warm_keys(self, db: str, keys: Sequence[bytes],
                  threads: int = WARM_THREADS) -> Callable[[], None]:
        """Look ``keys`` up in ``db`` in ``threads`` threads of their own, in order,
        touching the B-tree pages that lead to them and not their values (a cursor put
        on a key reads no value): a reader that gets the values in that order then
        finds those pages in memory. Returns a function that stops the threads and
        waits for them; ``close`` stops those still running.

        Why: the chunks of a file are keyed by digest, so each lookup of a cold store
        reads a leaf page of its own from somewhere in data.mdb, one 4 KiB read at a
        time in the reader's thread (the map has no readahead). A cold full copy-up of
        256 MiB (3,720 chunks) spent 86% of its waits there, with the chunks themselves
        read ahead; several threads keep several of those reads in flight."""
        stop = threading.Event()
        started: list[threading.Thread] = []

        def done() -> None:
            stop.set()
            for t in started:
                t.join()

        if self._warm_closed:
            return done
        dbi = self.db(db)

        def run(part: Sequence[bytes]) -> None:
            try:
                # Not ``read()``: a warm thread never remaps the store (MapResizedError
                # after another process grew it: it stops), and ``_set_mapsize`` stops
                # the warm threads before it remaps (a thread in a lookup would read
                # unmapped memory).
                self._gate.enter()  # one started while a remap waits, waits for it
                try:
                    txn = self.env.begin(write=False)
                    try:
                        cur = txn.cursor(db=dbi)
                        for key in part:
                            if stop.is_set():
                                return
                            cur.set_key(key)
                    finally:
                        txn.abort()
                finally:
                    self._gate.leave()
            except Exception:  # noqa: BLE001, S110 - an optimisation only (readers full...)
                pass

        with self._warm_lock:
            self._warmers = [w for w in self._warmers if w[1].is_alive()]
            room = WARM_THREADS_MAX - len(self._warmers)
            if self._warm_closed or room <= 0:
                return done  # enough lookups going on: this reader does its own
            n = min(threads, room)
            for i in range(n):
                t = threading.Thread(target=run, args=(keys[i::n],), daemon=True,
                                     name="layerstore warm keys")
                try:
                    t.start()
                except RuntimeError:  # no more threads here (a pids limit)
                    break
                started.append(t)
                self._warmers.append((stop, t))
        return done

    def _stop_warmers(self) -> None:
        """Stop the ``warm_keys`` threads and wait for them (each is at most one page
        read from stopping)."""
        with self._warm_lock:
            warmers, self._warmers = self._warmers, []
        for stop, _ in warmers:
            stop.set()
        for _, t in warmers:
            t.join()

    def start_writeback(self) -> None:
        """Start writing the data file's dirty pages to disk, without waiting
        (sync_file_range(SYNC_FILE_RANGE_WRITE)). Commits do not fsync (``sync=False``);
        an import calls this after each batch so that the disk works while it goes on,
        and the ``sync()`` at the end of the command waits only for the rest."""
        try:
            fd = os.open(self.path / "data.mdb", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            _c().sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        except (OSError, AttributeError):
            pass  # an optimisation only
        finally:
            os.close(fd)

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        """Make every commit durable, then close."""
        self._map_ranges = []  # never madvise an address range that is not ours any more
        self._view = None
        try:
            self._read_ahead.close()
            self._warm_closed = True
            self._stop_warmers()
        finally:
            self._close_env()

    def _close_env(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error:
            pass
        self.env.close()

    def file_size(self) -> int:
        try:
            return os.stat(self.path / "data.mdb").st_size
        except OSError:
            return 0
