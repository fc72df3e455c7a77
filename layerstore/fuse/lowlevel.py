"""The FUSE adapter on the low-level (inode-based) API, written to pyfuse3's interface.

It runs on ``wire.py`` (the FUSE protocol spoken on /dev/fuse; the default) or on
pyfuse3 (``LAYERSTORE_FUSE=pyfuse3``; see ``binding.py``), imported here as
``pyfuse3`` either way; ``daemon.serve_fuse`` runs it for ``layerstore mount``
(writable and read-only) and ``layerstore-overlay``. It translates only: the
semantics live in ``OverlayFS`` (path-based), and this module keeps the table that
turns the kernel's inode numbers into paths. What follows about pyfuse3's limits and
its one trio thread is about pyfuse3; ``wire.py`` says what it does instead.

- **Inodes.** The kernel's node id of an object is the overlay's ``st_ino`` (stable
  across copy-up and remount, shared by hard links; pyfuse3 reports the node id as
  ``st_ino``, so they must be the same number), except the root, which FUSE numbers 1.
  So the kernel has one inode per file, whatever the number of its names: a change
  through one name is seen through the others without any invalidation.
- **The table** (``_Inode``): each node id known to the kernel with its links
  ``(parent node id, name)`` and its lookup count. A path is built from the links
  upwards when a request needs one, so renaming a directory changes one link and
  nothing below it. ``forget`` drops a node once the kernel forgets it and no handle
  of ours is open on it. An unlinked file that is still open keeps its node (without
  links); its attributes come from the open handle (``OverlayFS.fgetattr``).
- **Paths and renames.** A request makes its path from the table and the overlay call
  runs without the session's lock; a RENAME updates the table after its own overlay
  call. So every overlay call gets the number of the node it means (``ino=``) or of
  the directory its entry is in (``parent_ino=``), checked under the overlay's lock
  before anything changes (``OtherFileError``, an ENOENT), and is made again with a
  fresh path once the renames have updated the table (``_on_node``, ``_in_dir``). An
  O_TRUNC open of a file whose name was just renamed over thus never truncates the
  file renamed there; a request on a node whose only name was replaced gets ENOENT
  (kernel overlayfs would act on the unlinked file: the overlay cannot reach it).
- **Caching.** Entries and attributes are cached by the kernel for a day (everything
  changes through this mount, and the kernel updates or drops what it caches on our
  own replies); negative entries too (a lookup that finds nothing answers node id 0
  with a timeout). Open files keep their page cache across opens (``keep_cache``):
  the kernel's inode is the only way to the data. On ``wire.py`` an open file whose
  data is a plain upper file is passed through to the kernel instead
  (``OverlayFS.backing_fd``, ``wire._Passthrough``); its writes never reach the
  daemon, so a listing read in pieces looks up again the attributes of the entries
  open for writing, or written, since it was made (``_written_since``). Listings are
  readdirplus (pyfuse3
  always asks for it), so a walk needs no LOOKUP per entry.
- **Listings** are read once per open directory handle and served from that copy; if
  the directory changed through the mount in between, a continued listing is read
  again and goes on after the last name it reported (listings are sorted), so it never
  hands the kernel an entry that is gone.
- **What pyfuse3 (3.5) does not let us do.** ``opendir`` can only return a handle, not
  ``cache_readdir``/``keep_cache``, and with ``no_opendir`` (ENOSYS from opendir)
  ``readdir`` would get handle 0 and no inode number: so every listing still costs
  OPENDIR + READDIRPLUS (two: the second finds the end) + RELEASEDIR round trips.
  The kernel's writeback cache (``enable_writeback_cache``) works, but measured no
  clear gain (random 4 KiB writes 1.3-1.6x, small-file creates 0.8x: each close then
  writes the times back) and written data would sit in the kernel until close or
  fsync (a ``commit`` of a running container or a killed daemon would not see it); it
  is off unless ``LAYERSTORE_FUSE_WRITEBACK=1``.
- **Blocking.** pyfuse3 runs every request on one trio thread. Calls that may take
  long run in a worker thread (``trio.to_thread``), so other requests go on meanwhile:
  an open for writing (it may copy a whole file up), setattr, rename, link and xattr
  changes (they may copy up), fsync. Every other overlay call runs inline when the
  overlay's lock is free and in a worker thread when it is not (a copy-up holds it for
  as long as it copies; ``_call``). Reads and writes of open files run inline: a thread
  hop per request cost more than it saved (sequential reads of a 256 MiB lower file,
  fresh mount: 450/330 MB/s page cache warm/cold through threads, 760-920/540-600 MB/s
  inline, 560-630/430-440 MB/s on mfusepy). The overlay is thread-safe; the table is
  touched on the trio thread only.
- Errors are mapped in one place, ``_errors``: an ``OSError`` passes with its errno,
  anything else is logged with its traceback and becomes EIO.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import trio

from .binding import TRANSPORT

if TRANSPORT == "wire":
    from . import wire as pyfuse3  # the protocol on /dev/fuse directly, pyfuse3's names
else:
    import pyfuse3

from ..errors import NoEntryError, NoXattrError
from ..overlay.fs import FULL, KEEP_AFTER, OverlayFS
from ..overlay.lower import MergedLowers, Send, node_stat
from ..store.records import SYMLINK
from . import clear_setid, errno_of, may_keep_setid

log = logging.getLogger("layerstore.fuse")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

ROOT = pyfuse3.ROOT_INODE
#: how long the kernel may cache entries, attributes and negative lookups (seconds)
TIMEOUT = 86400.0
#: nodes whose attribute names getxattr keeps (all are dropped at this many)
XATTR_NAMES_KEPT = 65536
#: the names of a node that has no xattrs (most have none: one set for all of them)
_NO_NAMES: frozenset[bytes] = frozenset()
#: in place of a node's attribute names: a file this mount just created, whose names
#: were not listed (an inherited ACL or a security label may be there), but which has
#: no file capability: nothing sets one but a setxattr, a change
_NEW_FILE: frozenset[bytes] = frozenset([b"(new file)"])
_CAPABILITY = b"security.capability"
#: renameat2 flags
RENAME_NOREPLACE = 1
#: the kernel's writeback cache on the writable mount (``LAYERSTORE_FUSE_WRITEBACK=0|1``)
WRITEBACK = os.environ.get("LAYERSTORE_FUSE_WRITEBACK", "0") == "1"
#: node ids whose last open for writing is remembered (``LowLevelOperations._write_mark``)
KEEP_WRITTEN = 4096
#: what an overlay call on a path a rename moved fails with (``_Base._retrying``)
_MOVED = (errno.ENOENT, errno.ENOTDIR)
#: a request on a node whose name a rename moved looks for it again this many times, and
#: waits for the running renames at most this long each time (``_on_node``, seconds)
NODE_TRIES = 8
RENAME_WAIT = 30.0


def _errors(fn: F) -> F:
    """The one place where exceptions become errno values for the kernel."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(errno_of(fn.__name__, exc)) from None

    return wrapper  # type: ignore[return-value]


#: wire.py runs each request in the thread that read it, holding its lock; there, an
#: overlay call that may take long runs with the lock released (``wire.unlocked``)
_unlocked: Callable[..., Any] | None = getattr(pyfuse3, "unlocked", None)
#: the transport can hand a plain upper file to the kernel (``wire._Passthrough``), and
#: a read-only copy of a lower file's data (``lower_data``)
_PASSTHROUGH = "lower_data" in getattr(pyfuse3.FileInfo, "__slots__", ())


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    if _unlocked is not None:
        return _unlocked(fn, *args)
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


def _join(parent: bytes, name: bytes) -> bytes:
    return b"/" + name if parent == b"/" else parent + b"/" + name


class _Inode:
    __slots__ = ("ino", "is_dir", "links", "lookups", "fhs")

    def __init__(self, ino: int, is_dir: bool):
        self.ino = ino
        self.is_dir = is_dir
        self.links: dict[tuple[int, bytes], None] = {}  #: (parent, name), in order seen
        self.lookups = 0
        self.fhs: set[int] = set()  #: overlay handles open on it


class _Table:
    """Node ids and their links (see the module docstring). Trio thread only."""

    def __init__(self, root_st_ino: int):
        self.root_st_ino = root_st_ino
        self.nodes: dict[int, _Inode] = {ROOT: _Inode(ROOT, True)}
        self.child: dict[tuple[int, bytes], int] = {}

    def nodeid(self, st_ino: int) -> int:
        return ROOT if st_ino == self.root_st_ino else st_ino

    def path(self, ino: int) -> bytes:
        """A current path of node ``ino`` (ENOENT if it has none)."""
        parts: list[bytes] = []
        cur = ino
        seen = 0
        while cur != ROOT:
            node = self.nodes.get(cur)
            link = None
            if node is not None:
                for lk in node.links:
                    if lk[0] in self.nodes:
                        link = lk
                        break
            if link is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            parts.append(link[1])
            cur = link[0]
            seen += 1
            if seen > 4096:  # a loop: the table is wrong
                log.error("inode table: loop at node %d", ino)
                raise pyfuse3.FUSEError(errno.EIO)
        return b"/" + b"/".join(reversed(parts))

    def link(self, ino: int, parent: int, name: bytes, is_dir: bool) -> _Inode:
        key = (parent, name)
        old = self.child.get(key)
        if old is not None and old != ino:
            self.unlink(parent, name)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = _Inode(ino, is_dir)
        elif node.is_dir != is_dir:  # the number now names another kind of object
            for lk in list(node.links):
                self.child.pop(lk, None)
            node.links.clear()
            node.is_dir = is_dir
        if is_dir and key not in node.links:  # a directory has one name
            for lk in list(node.links):
                self.child.pop(lk, None)
            node.links.clear()
        node.links[key] = None
        self.child[key] = ino
        return node

    def unlink(self, parent: int, name: bytes) -> int | None:
        """Forget the name; returns the node id it named, if known."""
        ino = self.child.pop((parent, name), None)
        if ino is not None:
            node = self.nodes.get(ino)
            if node is not None:
                node.links.pop((parent, name), None)
                self._maybe_drop(node)
        return ino

    def _maybe_drop(self, node: _Inode) -> None:
        if node.ino != ROOT and node.lookups <= 0 and not node.fhs:
            for lk in node.links:
                if self.child.get(lk) == node.ino:
                    del self.child[lk]
            self.nodes.pop(node.ino, None)

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.lookups -= n
            self._maybe_drop(node)

    def close_fh(self, ino: int, fh: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.fhs.discard(fh)
            self._maybe_drop(node)


class _Base(pyfuse3.Operations):  # type: ignore[misc]
    """What both mounts share: the table, entries, listings, readiness at init."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, root_st: dict[str, int], on_ready: Callable[[], None] | None):
        super().__init__()
        self.table = _Table(root_st["st_ino"])
        self.on_ready = on_ready
        #: open directory handle -> (node id, listing, generation of the listing)
        self._dirs: dict[int, tuple[int, list[tuple[bytes, dict[str, int]]] | None,
                                  tuple[int, int, int]]] = {}
        #: directory node id -> count of changes of its entries through this mount
        self._gen: dict[int, int] = {}
        self._next_dh = 1
        self._fh_ino: dict[int, int] = {}  #: open file handle -> node id
        #: renames through the mount so far: a lookup that found nothing while one ran
        #: (its path was made before) looks again rather than cache "no such entry"
        self._renames = 0
        self._renaming = 0  #: renames running now

    def init(self) -> None:
        if self.on_ready is not None:
            self.on_ready()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    # --- to be provided -------------------------------------------------------------------
    def _getattr_path(self, path: bytes, parent_ino: int | None = None) -> dict[str, int]:
        """The attributes at ``path``; ``parent_ino``: the node its directory must be
        (``OverlayFS.lookup_names``)."""
        raise NotImplementedError

    def _lookup_path(self, path: bytes, parent_ino: int | None = None) -> dict[str, int] | None:
        """``_getattr_path``, or None where there is no entry."""
        try:
            return self._getattr_path(path, parent_ino)
        except FileNotFoundError:
            return None

    def _fgetattr(self, fh: int) -> dict[str, int]:
        raise NotImplementedError

    def _listdir(self, path: bytes, ino: int | None = None) -> list[tuple[bytes, dict[str, int]]]:
        """The entries of the directory at ``path``, node ``ino`` (``OverlayFS.readdir``)."""
        raise NotImplementedError

    # --- helpers ---------------------------------------------------------------------------
    def _entry(self, st: dict[str, int]) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.table.nodeid(st["st_ino"])
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode = st["st_mode"]
        e.st_nlink = st["st_nlink"]
        e.st_uid = st["st_uid"]
        e.st_gid = st["st_gid"]
        e.st_rdev = st.get("st_rdev", 0)
        e.st_size = st["st_size"]
        e.st_blksize = 4096
        e.st_blocks = st["st_blocks"]
        e.st_atime_ns = st["st_atime"]
        e.st_mtime_ns = st["st_mtime"]
        e.st_ctime_ns = st["st_ctime"]
        return e

    def _negative(self, timeout: float = TIMEOUT) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0  # "no such entry", cached for entry_timeout
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        return e

    def _found(self, parent: int, name: bytes, st: dict[str, int]) -> pyfuse3.EntryAttributes:
        """A lookup result the kernel will count: link it and count it."""
        ino = self.table.nodeid(st["st_ino"])
        if ino != ROOT:
            node = self.table.link(ino, parent, name, stat.S_ISDIR(st["st_mode"]))
            node.lookups += 1
        return self._entry(st)

    def _child_path(self, parent: int, name: bytes) -> bytes:
        return _join(self.table.path(parent), name)

    # A request makes the path of its node (or of its node's entry ``name``) from the
    # table, and the overlay call runs with the session's lock released. A RENAME makes
    # its overlay call before it updates the table: a path made meanwhile can name
    # another object than the node (the file renamed over its name; an O_TRUNC open
    # would truncate that one, as a review found) or nothing. So each call is given the
    # node's number, which the overlay checks under its lock before it changes
    # anything (``OtherFileError``, an ENOENT), and when a rename moved names meanwhile
    # the path is made again once the renames have updated the table.
    async def _retrying(self, attempt: Callable[[], Awaitable[Any]], tried: int = 0) -> Any:
        """``await attempt()`` (which makes its paths), again while it finds no entry
        (ENOENT, or ENOTDIR: a path through what is now a file or a symlink) and a
        rename ran meanwhile; ENOENT after ``NODE_TRIES`` in all (``tried``: how many
        the caller made already, each of them moved)."""
        for _ in range(tried, NODE_TRIES):
            if tried:
                await self._renames_done()
            tried = 1
            renames = self._renames
            try:
                return await attempt()
            except OSError as exc:
                if not self._moved(exc, renames):
                    raise  # no rename moved a name meanwhile: that is the answer
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _moved(self, exc: OSError, renames: int) -> bool:
        """Whether ``exc``, from a call whose path was made when ``self._renames`` was
        ``renames``, may come from a rename that moved a name since (running or done)."""
        return exc.errno in _MOVED and self._renamed_since(renames)

    def _renamed_since(self, renames: int) -> bool:
        """Whether a rename runs, or ran since ``self._renames`` was ``renames``."""
        return self._renaming > 0 or renames != self._renames

    async def _renames_done(self) -> None:
        """Wait, with the session's lock released, until no rename is running (each has
        updated the table), or ``RENAME_WAIT`` seconds."""
        deadline = time.monotonic() + RENAME_WAIT
        while self._renaming and time.monotonic() < deadline:
            await _thread(time.sleep, 0.001)

    async def _on_node(self, inode: int, fn: Callable[..., Any], *args: Any,
                       slow: bool = False) -> Any:
        """``fn(path, *args, ino=inode)`` with node ``inode``'s path, in a worker thread
        if ``slow`` (it may copy data): on the object itself, at its other name or its
        new name, or ENOENT if it has none now."""
        if inode == ROOT:  # never renamed, never replaced
            call = functools.partial(fn, b"/", *args)
            return await (_thread(call) if slow else self._call(call))

        async def attempt() -> Any:
            call = functools.partial(fn, self.table.path(inode), *args, ino=inode)
            return await (_thread(call) if slow else self._call(call))

        if slow:
            return await self._retrying(attempt)
        renames = self._renames
        try:  # the first attempt inline (no loop: most requests)
            return await self._call(fn, self.table.path(inode), *args, ino=inode)
        except OSError as exc:
            if not self._moved(exc, renames):
                raise
        return await self._retrying(attempt, tried=1)

    async def _in_dir(self, parent: int, name: bytes, fn: Callable[..., Any],
                      *args: Any, **kwargs: Any) -> Any:
        """``fn(path, *args, parent_ino=parent, **kwargs)`` with the path of entry
        ``name`` of directory node ``parent`` (``_on_node``)."""
        pino = None if parent == ROOT else parent
        renames = self._renames
        try:  # the first attempt inline (see _on_node)
            return await self._call(fn, self._child_path(parent, name), *args,
                                    parent_ino=pino, **kwargs)
        except OSError as exc:
            if not self._moved(exc, renames):
                raise

        async def attempt() -> Any:
            return await self._call(fn, self._child_path(parent, name), *args,
                                    parent_ino=pino, **kwargs)

        return await self._retrying(attempt, tried=1)

    async def _stat_of(self, ino: int) -> dict[str, int]:
        """Attributes of node ``ino``: through one of its names, else an open handle."""
        if ino == ROOT:
            return await self._call(self._getattr_path, b"/")  # type: ignore[no-any-return]
        node = self.table.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        for lk in list(node.links):
            if lk[0] not in self.table.nodes:
                continue
            renames = self._renames
            parent = lk[0]
            try:  # in the directory the link means (_in_dir, its first attempt inline)
                st = await self._call(self._getattr_path, _join(self.table.path(parent), lk[1]),
                                      None if parent == ROOT else parent)
            except OSError as exc:
                st = None
                if self._moved(exc, renames):
                    try:
                        st = await self._in_dir(parent, lk[1], self._getattr_path)
                    except (OSError, pyfuse3.FUSEError):
                        pass
            except pyfuse3.FUSEError:
                st = None
            if st is not None and self.table.nodeid(st["st_ino"]) == ino:
                return st
            # the name is another object's now: forget it (not when it was not found:
            # a directory above may be being renamed, and the link is relative; nor
            # while a rename ran, which updates the table itself)
            if st is not None and self.table.child.get(lk) == ino and not self._renaming \
                    and renames == self._renames:
                self.table.unlink(*lk)
        for fh in list(node.fhs):
            return await self._call(self._fgetattr, fh)  # type: ignore[no-any-return]
        raise pyfuse3.FUSEError(errno.ENOENT)

    # --- lookups and attributes -------------------------------------------------------------
    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        renames = self._renames
        try:
            st = await self._in_dir(parent_inode, name, self._lookup_path)
            if st is None and self._renamed_since(renames):
                # the path may have been made before a rename moved the name: made
                # again, as for an ENOENT (``_in_dir``)
                st = await self._in_dir(parent_inode, name, self._getattr_path)
        except FileNotFoundError:
            st = None
        if st is None:
            return self._negative()  # (renames all along: ENOENT, not cached)
        return self._found(parent_inode, name, st)

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.table.forget(ino, n)

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._stat_of(inode))

    # --- directories ------------------------------------------------------------------------
    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.table.path(inode)  # ENOENT if it has no name any more
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = (inode, None, (0, 0, 0))
        return dh

    def _changed(self, *dirs: int) -> None:
        """Entries of these directories were made, removed or renamed."""
        for d in dirs:
            self._gen[d] = self._gen.get(d, 0) + 1

    def _changes(self) -> int:
        """A value that differs after anything that may change what the mount shows
        (``OverlayFS.changes``); the read-only view never changes."""
        return 0

    def _write_epoch(self) -> int:
        """A count moved by every open for writing and its release (see
        ``LowLevelOperations``); the read-only view has none."""
        return 0

    def _written_since(self, epoch: int) -> Callable[[int], bool] | None:
        """Whether an object (by ``st_ino``) may have been written, unseen by the
        daemon, since ``_write_epoch()`` gave ``epoch``; None if none can have been
        (asked once per piece of a listing, not per entry)."""
        return None

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        ino, entries, gen = self._dirs[fh]
        now = (self._gen.get(ino, 0), self._changes(), self._write_epoch())
        fresh = True
        listed = gen[2]  #: when the entries were looked up
        if entries is None or start_id == 0 or gen[0] != now[0]:
            # a listing continued after the directory changed goes on from the name it
            # had reached in a fresh one (sorted by name), so it never reports an entry
            # that is gone (readdirplus would make the kernel cache it)
            last = entries[start_id - 1][0] if entries and 2 < start_id <= len(entries) else None
            entries = await self._listing(ino)
            listed = now[2]
            if fh in self._dirs:  # (released meanwhile: keep nothing)
                self._dirs[fh] = (ino, entries, now)
            if last is not None:
                start_id = 2 + bisect.bisect_right([n for n, _ in entries[2:]], last)
        elif gen[1] != now[1]:
            # something else changed (a file written, say): the names hold, but the
            # attributes this piece sends are looked up again, or the kernel would keep
            # old ones (re-listing would make a big directory quadratic under writes)
            fresh = False
        base = None
        renames = self._renames
        written = self._written_since(listed) if fresh else None
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            # looked up again: all of this piece when something changed, else the
            # entries written through passthrough since the listing (size, times)
            if i >= 2 and (not fresh or (written is not None and written(st["st_ino"]))):
                pino = None if ino == ROOT else ino  # (the directory it means)
                try:
                    if base is None:
                        base = self.table.path(ino).rstrip(b"/") + b"/"
                    st = await self._call(self._getattr_path, base + name, pino)
                except pyfuse3.FUSEError:
                    break  # the directory has no name now: send what there is
                except OSError:
                    if not self._renaming and renames == self._renames:
                        continue  # gone since the listing
                    # a directory above was renamed meanwhile (the path was made
                    # before): look again under the directory's path now
                    await self._renames_done()
                    renames = self._renames
                    try:
                        base = self.table.path(ino).rstrip(b"/") + b"/"
                        st = await self._call(self._getattr_path, base + name, pino)
                    except pyfuse3.FUSEError:
                        break
                    except OSError:
                        continue
            if not pyfuse3.readdir_reply(token, name, self._entry(st), i + 1):
                break
            if i < 2:  # "." and "..": not counted
                continue
            # readdirplus: the kernel counts a lookup of every entry it took
            cino = self.table.nodeid(st["st_ino"])
            if cino != ROOT:
                self.table.link(cino, ino, name, stat.S_ISDIR(st["st_mode"])).lookups += 1

    async def _listing(self, ino: int) -> list[tuple[bytes, dict[str, int]]]:
        """``.``, ``..`` (the directory's own attributes with its parent's number: the
        kernel takes nothing but the number from those two) and the entries."""
        own = await self._stat_of(ino)
        parent = ROOT
        if ino != ROOT:
            node = self.table.nodes.get(ino)
            if node is not None and node.links:
                parent = next(iter(node.links))[0]
        up = dict(own, st_ino=self.table.root_st_ino if parent == ROOT else parent)
        return [(b".", own), (b"..", up), *await self._on_node(ino, self._listdir)]

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- for wire.py's listings, which outlive a reader (wire._Lister) -----------------------
    def listing_stale(self, fh: int) -> bool:
        """Whether entries were made, removed or renamed in the directory since the
        listing of handle ``fh`` was made (a continued readdir then lists it again)."""
        state = self._dirs.get(fh)
        return state is not None and state[1] is not None and \
            state[2][0] != self._gen.get(state[0], 0)

    def listing_fork(self, fh: int) -> int:
        """A new handle holding the listing of ``fh`` as it is: a reader continued on it
        goes on after the name it had reached, in a fresh listing, and ``fh`` stays as
        it was for others."""
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = self._dirs[fh]
        return dh

    def listing_size(self, fh: int) -> int:
        state = self._dirs.get(fh)
        return len(state[1] or ()) if state is not None else 0

    # no flush(): pyfuse3's answers ENOSYS, and the kernel then stops sending FLUSH
    # (one round trip less per close); fsyncdir likewise


class LowLevelOperations(_Base):
    """A container, writable (``layerstore mount``, ``layerstore-overlay``).

    With the writeback cache the kernel keeps written pages and sends them later (at
    the latest on close or fsync), may read a page back through a handle opened for
    writing only, and places appended data itself: so files are opened read-write and
    without ``O_APPEND`` in the overlay."""

    enable_writeback_cache = WRITEBACK
    #: POSIX ACLs checked and cached by the kernel (FUSE_CAP_POSIX_ACL), as on kernel
    #: overlayfs and the high-level adapter (``operations._Base.init_with_config``)
    enable_acl = True

    def __init__(self, fs: OverlayFS, on_ready: Callable[[], None] | None = None):
        self.fs = fs
        #: node id -> (``fs.changes`` when listed, its attribute names): see getxattr
        self._xattr_names: dict[int, tuple[int, frozenset[bytes]]] = {}
        #: the overlay's re-entrant lock (see ``_call``)
        self._lock: Any = getattr(fs, "_lock", None)
        #: handles open for writing (-> node id), node ids with such handles (-> how
        #: many), and when each node's last one was opened or released (``_write_mark``)
        self._writing: dict[int, int] = {}
        self._wopen: dict[int, int] = {}
        self._wseen: dict[int, int] = {}
        self._wepoch = self._wfloor = 0
        super().__init__(fs.getattr(b"/"), on_ready)

    def keep_lower_copies(self, on: bool) -> None:
        """Whether big lower files read through the daemon get a copy in the store's
        file cache: the transport says so at INIT (and when the kernel refuses to pass
        such a copy through): only while the kernel can pass it through."""
        self.fs.keep_lower_copies = on

    def _changes(self) -> int:
        return self.fs.changes

    # With passthrough the kernel writes open files without telling us (``fs.changes``
    # does not move): a listing made before or while a file was open for writing looks
    # that file's attributes up again before it hands them to the kernel.
    def _write_epoch(self) -> int:
        return self._wepoch

    def _written_since(self, epoch: int) -> Callable[[int], bool] | None:
        if epoch < self._wfloor:
            return lambda st_ino: True  # forgotten: all of them
        if not self._wopen and self._wepoch <= epoch:
            return None  # nothing opened for writing since, nothing open for writing
        nodeid, wopen, wseen = self.table.nodeid, self._wopen, self._wseen

        def written(st_ino: int) -> bool:
            nid = nodeid(st_ino)
            return nid in wopen or wseen.get(nid, -1) > epoch

        return written

    def _write_mark(self, ino: int, n: int) -> None:
        """A handle of node ``ino`` opened (n=1) or released (n=-1) for writing."""
        self._wepoch += 1
        left = self._wopen.get(ino, 0) + n
        if left > 0:
            self._wopen[ino] = left
        else:
            self._wopen.pop(ino, None)
        if len(self._wseen) >= KEEP_WRITTEN:  # forget them all: older listings look again
            self._wseen.clear()
            self._wfloor = self._wepoch
        self._wseen[ino] = self._wepoch

    def warm_names(self) -> list[bytes]:
        """A few names in the root, for the transport's warm-up (``wire._Session``)."""
        return [name for name, _ in self.fs.readdir(b"/")[:4]]

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` here if the overlay's lock is free (it stays held by this thread
        for the call), else in a worker thread: a copy-up in another thread holds the
        lock for as long as it copies, and the trio thread must not wait for it."""
        if _unlocked is not None:
            return _unlocked(fn, *args, **kwargs)
        lock = self._lock
        if lock is not None and lock.acquire(blocking=False):
            try:
                return fn(*args, **kwargs)
            finally:
                lock.release()
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    def _getattr_path(self, path: bytes, parent_ino: int | None = None) -> dict[str, int]:
        st = self._lookup_path(path, parent_ino)
        if st is None:
            raise NoEntryError(path)
        return st

    def _lookup_path(self, path: bytes, parent_ino: int | None = None) -> dict[str, int] | None:
        # the entry's xattr names, when the overlay's lookup had them, are kept for
        # getxattr: `ls -l` asks for security.selinux of every file (and so does a
        # chown, for security.capability), and a miss then needs no walk
        changes = self.fs.changes
        got = self.fs.lookup_names(path, parent_ino)
        if got is None:
            return None
        st, names = got
        if names is not None:
            self._keep_xattr_names(self.table.nodeid(st["st_ino"]), changes, names)
        return st

    def _fgetattr(self, fh: int) -> dict[str, int]:
        return self.fs.fgetattr(fh)

    def _listdir(self, path: bytes, ino: int | None = None) -> list[tuple[bytes, dict[str, int]]]:
        changes = self.fs.changes
        names: dict[bytes, list[bytes]] = {}
        entries = self.fs.readdir(path, names, ino)
        keep, nodeid = self._keep_xattr_names, self.table.nodeid
        for name, st in entries:  # as in _getattr_path
            known = names.get(name)
            if known is not None:
                keep(nodeid(st["st_ino"]), changes, known)
        return entries

    # --- attributes -------------------------------------------------------------------------
    @_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        # a thread when it may copy data; metadata only (copy-up modes meta and lazy copy
        # no data for it) here, as a thread hop costs more than the change (chmod of a
        # lower file through the mount, wire.py, 5 runs: 1.7 ms with the hop, 1.05 ms
        # without)
        slow = bool(fields.update_size) or self.fs.copy_up_mode == FULL
        try:
            st = await self._on_node(inode, self._setattr, attr, fields, fh, slow=slow)
        except (OSError, pyfuse3.FUSEError) as exc:
            # no name (unlinked, still open; or a rename replaced its only name
            # meanwhile, after an ftruncate maybe): through the handle, if any
            if fh is None or inode == ROOT or self._named(inode) or not (
                    isinstance(exc, pyfuse3.FUSEError) or exc.errno in _MOVED):
                raise
            st = await self._call(self._setattr, None, attr, fields, fh)
        return self._entry(st if st is not None else await self._stat_of(inode))

    def _named(self, inode: int) -> bool:
        try:
            self.table.path(inode)
        except pyfuse3.FUSEError:
            return False
        return True

    def _setattr(self, path: bytes | None, attr: Any, fields: Any, fh: int | None,
                 ino: int | None = None) -> dict[str, int] | None:
        """The changes, in libfuse's order: mode, owner, size, times. Returns the
        attributes afterwards when the one change made reports them (a copy-up: see
        ``OverlayFS.chmod``), else None. A file without a name (unlinked, still open)
        can only be truncated through its handle; the times the kernel writes back for
        it are dropped."""
        if path is None:
            if fields.update_mode or fields.update_uid or fields.update_gid or (
                    fields.update_size and fh is None):
                raise OSError(errno.ENOENT, "no name")
            if fields.update_size:
                self.fs.ftruncate(fh, attr.st_size)  # type: ignore[arg-type]
            return None
        changes = sum((fields.update_mode, fields.update_uid or fields.update_gid,
                       fields.update_size, fields.update_atime or fields.update_mtime))
        st = None
        if fields.update_mode:
            st = self.fs.chmod(path, attr.st_mode, ino=ino)
        if fields.update_uid or fields.update_gid:
            st = self.fs.chown(path, attr.st_uid if fields.update_uid else -1,
                               attr.st_gid if fields.update_gid else -1, ino=ino)
        if fields.update_size:
            if fh is not None:
                self.fs.ftruncate(fh, attr.st_size)
            else:
                self.fs.truncate(path, attr.st_size, ino=ino)
        if fields.update_atime or fields.update_mtime:
            assert path is not None
            if fields.update_atime and fields.update_mtime:
                times = (attr.st_atime_ns, attr.st_mtime_ns)
            else:
                cur = self.fs.getattr(path, ino=ino)
                times = (attr.st_atime_ns if fields.update_atime else cur["st_atime"],
                         attr.st_mtime_ns if fields.update_mtime else cur["st_mtime"])
            st = self.fs.utimens(path, times, ino=ino)
        return st if changes == 1 else None

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self._on_node(inode, self.fs.readlink)  # type: ignore[no-any-return]

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        await self._stat_of(inode)  # permissions: the kernel checks (default_permissions)
        return True

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = await self._call(self.fs.statfs, b"/")
        out = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(out, k, s[k])
        return out

    # --- xattrs -------------------------------------------------------------------------------
    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # `ls -l` asks for security.selinux of every file, and the kernel caches no
        # answer to it: a node's attribute names, listed at its first miss, answer
        # the misses that follow while nothing changed through the mount
        changes = self.fs.changes
        known = self._xattr_names.get(inode)
        if known is not None and known[0] != changes or known is not None and \
                known[1] is _NEW_FILE and name != _CAPABILITY:
            known = None
        if known is not None and name not in known[1]:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return await self._on_node(inode, self.fs.getxattr, name)  # type: ignore[no-any-return]
        except OSError as exc:
            if exc.errno != errno.ENODATA or known is not None:
                raise
            if isinstance(exc, NoXattrError):
                names = exc.names  # what the overlay's lookup listed
            else:
                try:
                    names = await self._on_node(inode, self.fs.listxattr)
                except (OSError, pyfuse3.FUSEError):
                    raise exc from None  # the miss is the answer
            self._keep_xattr_names(inode, changes, names)
            raise

    def _keep_xattr_names(self, inode: int, changes: int, names: Iterable[bytes]) -> None:
        """Node ``inode`` had attributes ``names`` when the overlay's count of changes
        was ``changes`` (taken before they were read)."""
        if len(self._xattr_names) >= XATTR_NAMES_KEPT:
            self._xattr_names.clear()
        self._xattr_names[inode] = (changes, names if names is _NEW_FILE
                                    else frozenset(names) if names else _NO_NAMES)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self._on_node(inode, self.fs.listxattr)  # type: ignore[no-any-return]

    @_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any,
                       flags: int = 0) -> None:
        # flags (XATTR_CREATE/XATTR_REPLACE): from wire.py; pyfuse3 does not pass them
        await self._on_node(inode, self.fs.setxattr, name, value, flags, slow=True)

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self._on_node(inode, self.fs.removexattr, name, slow=True)

    # --- namespace ----------------------------------------------------------------------------
    async def _make(self, parent_inode: int, name: bytes,
                    make: Callable[..., dict[str, int]]) -> pyfuse3.EntryAttributes:
        """A new entry ``name`` made by ``make(path, parent_ino=...)``, which gives its
        attributes."""
        st = await self._in_dir(parent_inode, name, make)
        self._changed(parent_inode)
        return self._found(parent_inode, name, st)

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, lambda path, **pino: self.fs.mknod(
            path, mode, rdev, uid=ctx.uid, gid=ctx.gid, **pino))

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, lambda path, **pino: self.fs.mkdir(
            path, mode, uid=ctx.uid, gid=ctx.gid, **pino))

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, lambda path, **pino: self.fs.symlink(
            target, path, uid=ctx.uid, gid=ctx.gid, **pino))

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        pino = None if new_parent_inode == ROOT else new_parent_inode

        async def attempt() -> dict[str, int]:
            return await _thread(functools.partial(  # type: ignore[no-any-return]
                self.fs.link, self.table.path(inode),
                self._child_path(new_parent_inode, new_name),
                ino=None if inode == ROOT else inode, parent_ino=pino))

        st = await self._retrying(attempt)
        self._changed(new_parent_inode)
        return self._found(new_parent_inode, new_name, st)

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._in_dir(parent_inode, name, self.fs.unlink)
        self._changed(parent_inode)
        self.table.unlink(parent_inode, name)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._in_dir(parent_inode, name, self.fs.rmdir)
        self._changed(parent_inode)
        self.table.unlink(parent_inode, name)

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "rename flag not supported")
        pinos = {"old_parent_ino": None if parent_inode_old == ROOT else parent_inode_old,
                 "new_parent_ino": None if parent_inode_new == ROOT else parent_inode_new}

        def run(old: bytes, new: bytes) -> bool:
            # False: nothing moved (two names of one file: rename(2) does nothing)
            return bool(self.fs.rename(old, new, noreplace=bool(flags & RENAME_NOREPLACE),
                                       **pinos))

        # lookups and listings that find nothing while a rename runs (their path was
        # made from the table before it changes) look again rather than believe it;
        # so does a rename whose own paths another rename moved (``_retrying``: it
        # counts as running only while it may change something)
        for tries in range(1, NODE_TRIES + 1):
            renames = self._renames
            self._renames += 1
            self._renaming += 1
            try:
                if not await _thread(run, self._child_path(parent_inode_old, name_old),
                                     self._child_path(parent_inode_new, name_new)):
                    return
                self._changed(parent_inode_old, parent_inode_new)
                t = self.table
                t.unlink(parent_inode_new, name_new)  # what the new name named before
                moved = t.child.pop((parent_inode_old, name_old), None)
                node = t.nodes.get(moved) if moved is not None else None
                if node is not None:
                    node.links.pop((parent_inode_old, name_old), None)
                    t.link(node.ino, parent_inode_new, name_new, node.is_dir)
                return
            except OSError as exc:
                if exc.errno not in _MOVED or tries == NODE_TRIES or (
                        self._renaming == 1 and self._renames == renames + 1):
                    raise  # no other rename moved a name meanwhile: that is the answer
            finally:
                self._renaming -= 1
                self._renames += 1
            await self._renames_done()

    # --- open files ---------------------------------------------------------------------------
    def _opened(self, inode: int, fh: int, writing: bool) -> pyfuse3.FileInfo:
        node = self.table.nodes.get(inode)
        if node is not None:
            node.fhs.add(fh)
        self._fh_ino[fh] = inode
        if not _PASSTHROUGH:
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if writing:
            self._writing[fh] = inode
            self._write_mark(inode, 1)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True,
                                backing=functools.partial(self.fs.backing_fd, fh),
                                lower_data=self.fs.lower_data(fh))

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.enable_writeback_cache and (flags & os.O_ACCMODE) != os.O_RDONLY:
            flags = (flags & ~(os.O_ACCMODE | os.O_APPEND)) | os.O_RDWR
        # for writing or O_TRUNC in a worker thread: it may copy a file up
        slow = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        fh = await self._on_node(inode, self.fs.open, flags, slow=slow)
        if flags & os.O_TRUNC and _unlocked is None:
            # pyfuse3: clear setuid/setgid as a truncate by a caller without CAP_FSETID
            # does (wire.py is told by the kernel: FUSE_OPEN_KILL_SUIDGID)
            clear_setid(self.fs, fh, lambda: may_keep_setid(ctx.pid, ctx.uid))
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writing:
            self._learn_xattr_names(inode, fh)
        return self._opened(inode, fh, writing)

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, st, changes = await self._in_dir(parent_inode, name, self.fs.create_stat, mode,
                                             os.O_RDWR, uid=ctx.uid, gid=ctx.gid)
        self._changed(parent_inode)
        entry = self._found(parent_inode, name, st)
        # the kernel asks for its security.capability before the first write (one
        # flistxattr less per create: what a getxattr of another name needs is listed then)
        self._keep_xattr_names(entry.st_ino, changes, _NEW_FILE)
        return self._opened(entry.st_ino, fh, True), entry

    def _learn_xattr_names(self, inode: int, fh: int) -> None:
        """Keep the attribute names of the upper file open as ``fh``, node ``inode``'s
        (``_on_node`` had the overlay check that it opened that object; a create made
        it), for getxattr: the kernel asks for security.capability before the first
        write to an inode (a new file, a file just copied up), and that is then
        answered without a walk to it."""
        changes = self.fs.changes
        try:
            names = self.fs.handle_xattrs(fh)
        except OSError:
            return
        self._keep_xattr_names(inode, changes, names)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(fh, size, off)

    @_errors
    async def read_into(self, fh: int, off: int, size: int, send: Send) -> None:
        self.fs.read_into(fh, size, off, send)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.fs.write(fh, buf, off)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await _thread(self.fs.fsync, fh, datasync)

    @_errors
    async def release(self, fh: int) -> None:
        ino = self._fh_ino.pop(fh, None)
        if fh in self._writing:
            self._write_mark(self._writing.pop(fh), -1)
        try:
            await self._call(self.fs.release, fh)
        finally:
            if ino is not None:
                self.table.close_fh(ino, fh)


class ReadOnlyLowLevelOperations(_Base):
    """The image of a container, read-only (``layerstore mount --read-only``)."""

    def __init__(self, view: MergedLowers, on_ready: Callable[[], None] | None = None):
        self.view = view
        self._files: dict[int, Any] = {}
        self._backing_fds: dict[int, int] = {}  #: handle -> its backing file (passthrough)
        self._read: dict[int, int] = {}  #: handle -> bytes read through the daemon
        self._keep = False  #: keep copies of big lower files (``keep_lower_copies``)
        self._next_fh = 1
        super().__init__(node_stat(view.lookup(b"/")), on_ready)

    def _getattr_path(self, path: bytes, parent_ino: int | None = None) -> dict[str, int]:
        return node_stat(self.view.lookup(path))  # (nothing is ever renamed here)

    def _fgetattr(self, fh: int) -> dict[str, int]:
        return node_stat(self._files[fh])

    def _listdir(self, path: bytes, ino: int | None = None) -> list[tuple[bytes, dict[str, int]]]:
        return [(name, node_stat(child)) for name, child in self.view.listdir(path)]

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.view.lookup(self.table.path(inode))
        if node.entry.type != SYMLINK:
            raise OSError(errno.EINVAL, "not a symlink")
        return node.entry.target  # type: ignore[no-any-return]

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only")
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = self.view.lookup(self.table.path(inode))
        self._fh_ino[fh] = inode
        node = self.table.nodes.get(inode)
        if node is not None:
            node.fhs.add(fh)
        if not _PASSTHROUGH:
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, lower_data=True,
                                backing=functools.partial(self._backing, fh))

    def keep_lower_copies(self, on: bool) -> None:
        """As ``LowLevelOperations.keep_lower_copies``."""
        self._keep = on

    def _backing(self, fh: int) -> int | None:
        """For passthrough: a read-only copy of the file's data (``MergedLowers.backing``),
        kept open until the handle's release."""
        fd = self._backing_fds.get(fh)
        if fd is None:
            fd = self.view.backing(self._files[fh])
            if fd is not None:
                self._backing_fds[fh] = fd
        return fd

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.view.read(self._files[fh], off, size)

    @_errors
    async def read_into(self, fh: int, off: int, size: int, send: Send) -> None:
        self._read[fh] = self._read.get(fh, 0) + size
        self.view.read_into(self._files[fh], off, size, send)

    @_errors
    async def release(self, fh: int) -> None:
        node = self._files.pop(fh, None)
        fd = self._backing_fds.pop(fh, None)
        if fd is not None:
            os.close(fd)
        if self._read.pop(fh, 0) >= KEEP_AFTER and node is not None and self._keep:
            self.view.keep(node)  # read through the daemon: a copy for next time
        ino = self._fh_ino.pop(fh, None)
        if ino is not None:
            self.table.close_fh(ino, fh)

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        value = self.view.lookup(self.table.path(inode)).entry.xattrs.get(name)
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value  # type: ignore[no-any-return]

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return list(self.view.lookup(self.table.path(inode)).entry.xattrs)

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        await self._stat_of(inode)
        if mode & os.W_OK:
            raise OSError(errno.EROFS, "read-only")
        return True

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_namemax = 255
        return out


#: high-level libfuse options that the low-level API has no use for (they are the
#: adapter's business here) or that libfuse3 refuses
_HIGH_LEVEL_ONLY = {"foreground", "use_ino", "kernel_cache", "auto_cache", "attr_timeout",
                    "entry_timeout", "negative_timeout", "big_writes", "nonempty", "max_write",
                    "hard_remove", "nothreads"}


def mount_options(options: dict[str, Any]) -> set[str]:
    """libfuse options from the adapter's option dict (``key=True`` -> ``key``)."""
    out = set()
    for key, value in options.items():
        if key in _HIGH_LEVEL_ONLY or value is False or value is None:
            continue
        out.add(key if value is True else f"{key}={value}")
    return out


def serve(ops: _Base, mp: str, options: dict[str, Any], debug: bool = False) -> None:
    """Mount ``ops`` at ``mp`` and serve until unmounted (or SIGTERM/SIGINT/SIGHUP,
    which unmount)."""
    opts = mount_options(options)
    if debug:
        opts.add("debug")
    try:
        pyfuse3.init(ops, mp, opts)
    except RuntimeError:
        raise RuntimeError(f"fuse_session_new/mount failed with options {sorted(opts)}") from None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    unmount = True
    try:
        trio.run(main)
        # still mounted after a signal; not after an unmount. Never ask by stat(mp):
        # the request would come to this process, which no longer answers it
        unmount = _in_mount_table(mp)
    finally:
        pyfuse3.close(unmount=unmount)


def _in_mount_table(mp: str) -> bool:
    target = os.path.abspath(mp).encode().replace(b" ", b"\\040")
    try:
        with open("/proc/self/mounts", "rb") as f:
            return any(len(p) > 1 and p[1] == target for p in (line.split() for line in f))
    except OSError:
        return True


__all__ = ["LowLevelOperations", "ReadOnlyLowLevelOperations", "mount_options", "serve"]
