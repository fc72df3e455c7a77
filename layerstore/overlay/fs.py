"""The writable overlay: merged lowers (``lower.py``) under an upper directory in
kernel-overlayfs format (``upper.py``), with POSIX semantics as kernel overlayfs gives
them. Every method takes a vpath (``bytes``, absolute, ``b"/etc/passwd"``) and raises
``OSError`` with a real errno: ``OverlayError``/``NoEntryError`` for what this module
decides, the ``os`` call's own error for what the upper filesystem decides.

Lookup of a path walks it one component at a time, as overlayfs does: an upper whiteout
ends it (ENOENT), an upper non-directory hides everything below, an upper directory
merges with the lower directory at the same path unless it is opaque.

Copy-up: before the first data write or metadata change of a lower object, it is
written to a temporary name in ``work`` and renamed into place, so a copy-up is visible
whole or not at all. Missing parent directories are copied up first (metadata only).
Three modes (``copy_up``):

- ``FULL``: data and metadata (owner, mode, xattrs, mtime in ns) before the first write
  or metadata change; ``open`` with ``O_TRUNC`` and ``truncate(0)`` copy no data.
- ``META``: chmod, chown, utimens, xattr changes, rename and link copy the metadata only,
  in the kernel's ``metacopy`` format: a sparse upper file of the right size with
  ``trusted.overlay.metacopy``, plus ``trusted.overlay.redirect`` (absolute) once it has
  been renamed or linked, so kernel overlayfs mounted with ``metacopy=on`` reads the same
  upper. The first write puts the data into that same upper inode and then drops the
  mark: a crash midway still reads the old data from the lowers. Uppers written in
  either mode are read in both.
- ``LAZY``: as ``META``, and the first write to a lower file of ``LAZY_MIN`` or more
  copies only the blocks it touches (``lazy.py``); ``materialize`` fills the rest.

Copied-up objects carry their lower inode number (``ORIGIN_XATTR``), so
``st_ino`` is the same before and after a copy-up and across remounts. Copying up one
name of a lower hard link links every other name the view shows of it, so the links stay
one inode (kernel overlayfs needs ``index=on`` for that). An fd opened for reading
before a copy-up reads the upper copy afterwards, as with kernel overlayfs.

Renaming a lower or merged directory copies the whole merged subtree up (every merged
subdirectory becomes opaque, whiteouts inside it are dropped; files are copied in the
mount's mode, metacopy ones with an absolute redirect), then renames the now
self-contained upper directory: no EXDEV, and no directory ``redirect`` (kernel
overlayfs with ``redirect_dir=on`` copies up only the directory and records a redirect
instead).

Confinement: see ``upper.py``; the upper is only touched through fds from ``upper_fd``
and ``*at`` calls that do not follow symlinks. A symlink that the container put where
a directory is expected is a symlink in the view, so walking through it gives ENOTDIR.

Threading: one re-entrant lock (``_lock``) serialises every namespace and metadata
operation and every lookup (so a lookup never sees a half-done rename of ours). Data
I/O on open handles (``read``/``write``) runs outside it: ``os.pread``/``os.pwrite`` on
the handle's own fd, or a lower read, which is thread-safe.

Imports neither fusepy nor anything above ``store``.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ..errors import (
    LayerstoreError,
    NoEntryError,
    NotEmptyError,
    NoXattrError,
    OtherFileError,
    OverlayError,
)
from ..store.records import BLK, CHR, DIR, FIFO, REG, SYMLINK, join_vpath
from .lazy import LAZY_MIN, LAZY_XATTR, LazyFile
from .lower import IFMT, MergedLowers, Node, Send, joined, node_stat
from .upper import (
    DIR_FLAGS,
    METACOPY_XATTR,
    OPAQUE_XATTR,
    ORIGIN_XATTR,
    REDIRECT_XATTR,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    escape_xattr,
    is_opaque_fd,
    is_private_xattr,
    is_whiteout,
    lstat_at,
    make_whiteout,
    metacopy_source,
    open_dir_at,
    path_fd,
    proc_path,
    remove_tree_at,
    renameat2,
    split_parts,
    stat_dict,
    visible_xattr,
    xattrs_at,
)

F = TypeVar("F", bound=Callable[..., Any])

#: prefix of our temporary names in the work directory (removed at start-up)
TMP_PREFIX = b"#layerstore-"
#: bytes copied per read/write during a copy-up
COPY_BLOCK = 1 << 20
#: a handle that read this much of a big lower file through the daemon asks, when it is
#: released, for a copy in the store's file cache (``MergedLowers.keep``): not an open
#: that only looked (``file``, a stat), nor a reader while it reads
KEEP_AFTER = 1 << 20

#: copy-up modes: the data with the metadata, or the metadata alone (the data stays in
#: the lowers until the first write)
FULL, META, LAZY = "full", "meta", "lazy"
#: upper directory fds a mount keeps for its walks (``OverlayFS._dirs``), at most
DIRS_KEPT = 256
COPY_UP_MODES = (FULL, META, LAZY)
#: ``OverlayFS._dirs``: the origin of a directory not read yet
_UNREAD = object()


def _changes(fn: F) -> F:
    """Count a call that may change what the view shows (``OverlayFS.changes``), after it
    has run: whoever read the count before reading the view knows, by reading it again,
    whether what it read may have changed since."""

    @functools.wraps(fn)
    def wrapper(self: OverlayFS, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._changed()

    return wrapper  # type: ignore[return-value]


def _locked(fn: F) -> F:
    """Run under the overlay lock; store failures become EIO (``NoEntryError`` stays)."""

    @functools.wraps(fn)
    def wrapper(self: OverlayFS, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            try:
                return fn(self, *args, **kwargs)
            except OSError:
                raise
            except (LayerstoreError, lmdb.Error) as exc:
                raise OverlayError(errno.EIO) from exc

    return wrapper  # type: ignore[return-value]




@dataclass
class Found:
    """What the merged view has at a path (never a whiteout)."""

    vpath: bytes
    ust: os.stat_result | None  #: the upper entry, if any
    lower: Node | None  #: the lower node shown or merged here (None under an upper non-dir or opaque dir)
    opaque: bool  #: the upper directory is opaque
    lower_below: bool  #: a lower entry exists here that an upper whiteout must hide
    data: Node | None = None  #: an upper metacopy file: the lower file that has its data
    origin: int | None = None  #: an upper non-directory copied up: its lower inode number
    lazy: LazyFile | None = None  #: an upper file copied up lazily (``lazy.py``), not whole yet
    #: an upper non-directory: the names of all its xattrs when it was looked up (the
    #: overlay's lock is held from then on, so a getxattr of another name is ENODATA)
    xattr_names: list[bytes] | None = None

    @property
    def is_dir(self) -> bool:
        if self.ust is not None:
            return stat.S_ISDIR(self.ust.st_mode)
        assert self.lower is not None
        return self.lower.entry.type == DIR

    @property
    def type_mode(self) -> int:
        if self.ust is not None:
            return stat.S_IFMT(self.ust.st_mode)
        assert self.lower is not None
        return IFMT[self.lower.entry.type]


@dataclass
class _Handle:
    vpath: bytes
    fd: int = -1  #: an upper fd, or -1
    node: Node | None = None  #: a lower file read in place (also the data of a metacopy file)
    ino: int | None = None  #: the inode number to report (the lower one after a copy-up)
    lazy: LazyFile | None = None  #: ``fd`` is a lazily copied-up file: read and write through it
    backing: int = -1  #: a read-only fd of a plain file holding ``node``'s data (passthrough)
    read: int = 0  #: bytes of ``node``'s data read through the handle (``release``)
    regular: bool = False  #: ``fd`` was made a regular file by ``create`` (``backing_fd``)


def _origin_of(target: int | str) -> int | None:
    """The lower inode number an upper object copied up from the lowers records
    (``target``: an fd, or a ``/proc`` path that is not followed)."""
    try:
        value = (os.getxattr(target, ORIGIN_XATTR) if isinstance(target, int)
                 else os.getxattr(target, ORIGIN_XATTR, follow_symlinks=False))
    except OSError:
        return None
    return int.from_bytes(value, "big") if len(value) == 8 else None


def _visible(stored: Iterable[bytes]) -> list[bytes]:
    """Stored xattr names as ``listxattr`` gives them (the overlay's own hidden)."""
    return [v for v in map(visible_xattr, stored) if v is not None]


def _no_xattr(vpath: bytes, stored: Iterable[bytes]) -> NoXattrError:
    """ENODATA for a getxattr, with the names the entry has as ``listxattr`` gives them."""
    return NoXattrError(vpath, _visible(stored))


def _known_names(f: Found) -> list[bytes] | None:
    """The xattr names of ``f`` as ``listxattr`` gives them, if its lookup read them: a
    lower entry's are in its record, an upper non-directory's were listed by
    ``_upper_leaf``; an upper directory's were not (None)."""
    if f.ust is None:
        assert f.lower is not None
        return _visible(f.lower.entry.xattrs)
    if f.xattr_names is not None:
        return _visible(f.xattr_names)
    return None


def _split(vpath: bytes) -> tuple[bytes, bytes]:
    """(parent vpath, name); the root is (b"/", b".") so ``*at`` calls reach it."""
    parts = split_parts(vpath)
    if not parts:
        return b"/", b"."
    return b"/" + b"/".join(parts[:-1]), parts[-1]


class OverlayFS:
    """A container's filesystem: ``lowers`` under the writable ``upper`` (see module doc)."""

    def __init__(self, lowers: MergedLowers, upper: Path, work: Path, copy_up: str = FULL):
        if copy_up not in COPY_UP_MODES:
            raise ValueError(f"copy-up mode {copy_up!r}: one of {', '.join(COPY_UP_MODES)}")
        self.lowers = lowers
        #: big lower files read through the daemon get a copy in the store's file cache
        #: (set by an adapter that can pass such a copy through to the kernel)
        self.keep_lower_copies = False
        self.copy_up_mode = copy_up
        root_lower = self.lowers.resolve(b"/")  # (before any fd is opened: it may fail)
        self.upper_fd = os.open(upper, DIR_FLAGS)
        try:
            self.work_fd = os.open(work, DIR_FLAGS)
        except BaseException:
            os.close(self.upper_fd)
            raise
        if os.fstat(self.upper_fd).st_dev != os.fstat(self.work_fd).st_dev:
            os.close(self.upper_fd)
            os.close(self.work_fd)
            raise OverlayError(errno.EXDEV, os.fsencode(work))
        self._lock = threading.RLock()
        #: changes to the view: a new value after each call that may change it (``_changes``)
        self._tickets = itertools.count(1)
        self.changes = 0
        self._handles: dict[int, _Handle] = {}
        #: (st_dev, st_ino) of an upper file copied up lazily -> its state, shared by
        #: every handle and name of it
        self._lazy: dict[tuple[int, int], LazyFile] = {}
        self._fh = itertools.count(1)
        self._tmp = itertools.count()
        #: upper directories met on walks below the root, by vpath: (fd, its stat then,
        #: the lower directory it merges with, opaque, a lower entry below). A walk takes
        #: the parents of the path it looks up from here instead of opening and reading
        #: each again (five syscalls a level). Only the calls that can change which upper
        #: directory a path names, or whether it is opaque, empty it (``_forget_dirs``):
        #: rmdir, the rename of a directory, and each step of a tree's copy-up that
        #: makes a directory self-contained; a new upper directory is only ever made
        #: where none was.
        #: (The last field: the lower inode number a copied-up directory records, or
        #: ``_UNREAD``.)
        self._dirs: dict[bytes, tuple[int, os.stat_result, Node | None, bool, bool,
                                      int | None | object]] = {}
        #: the parent ``Found`` of the last entry ``_find`` walked to (``_check_parent``)
        self._parent_seen: Found | None = None
        #: where each walk starts (never changed: the lowers and the root's type stay)
        self._root = Found(b"/", os.fstat(self.upper_fd), root_lower, False, False)
        for name in os.listdir(self.work_fd):  # copy-ups a crash left half done
            if os.fsencode(name).startswith(TMP_PREFIX):
                remove_tree_at(self.work_fd, os.fsencode(name))

    def _changed(self) -> None:
        """After a call that may have changed the view: ``changes`` takes a new value (a
        new ticket, not ``+= 1``: two threads may race, but no later value can equal one
        read before, since ``next`` of a count is atomic under the GIL)."""
        self.changes = next(self._tickets)

    def _forget_dirs(self) -> None:
        """Drop the walk cache (after a directory is renamed, removed or made
        self-contained). Requires ``_lock``."""
        dirs, self._dirs = self._dirs, {}
        for entry in dirs.values():
            os.close(entry[0])

    def close(self) -> None:
        self._forget_dirs()
        for h in self._handles.values():
            if h.fd >= 0:
                os.close(h.fd)
        self._handles.clear()
        for fd in (getattr(self, "upper_fd", -1), getattr(self, "work_fd", -1)):
            if fd >= 0:
                os.close(fd)
        self.upper_fd = self.work_fd = -1

    # --- lookup --------------------------------------------------------------------------

    def _find(self, vpath: bytes) -> Found | None:
        """The merged entry at ``vpath``, None if there is none; ENOTDIR if a parent is
        not a directory. Requires ``_lock``."""
        parts = split_parts(vpath)
        cur = self._root
        if not parts:
            return Found(b"/", os.fstat(self.upper_fd), cur.lower, False, False)
        #: the upper directory of ``cur`` (-1: none): the root, or one in ``_dirs``
        fd = self.upper_fd
        last = len(parts) - 1
        for i, name in enumerate(parts):
            if not cur.is_dir:
                raise OverlayError(errno.ENOTDIR, vpath)
            if i == last:
                self._parent_seen = cur  # for _check_parent
            path = join_vpath(cur.vpath, name)
            if fd >= 0:
                hit = self._dirs.get(path)
                if hit is not None:
                    fd, ust, lower, opaque, below, _ = hit
                    if i == last:  # the directory itself: its attributes now
                        return Found(path, os.fstat(fd), lower, opaque, below,
                                     origin=self._cached_origin(path, hit))
                    cur = Found(path, ust, lower, opaque, below)
                    continue
            ust = lstat_at(fd, name) if fd >= 0 else None
            if ust is not None and is_whiteout(ust):
                return None
            if ust is not None and not stat.S_ISDIR(ust.st_mode):
                if i != last:
                    raise OverlayError(errno.ENOTDIR, vpath)
                return self._upper_leaf(path, ust, fd, name, cur)
            merges = cur.lower is not None and cur.lower.entry.type == DIR and not cur.opaque
            raw = self.lowers.resolve(path) if merges else None
            lower = raw if (ust is None or stat.S_ISDIR(ust.st_mode)) else None
            opaque = False
            newfd = -1
            origin = None
            if ust is not None and stat.S_ISDIR(ust.st_mode):
                newfd = open_dir_at(fd, name)
                try:
                    opaque = is_opaque_fd(newfd)
                    if opaque or (lower is not None and lower.entry.type != DIR):
                        lower = None
                    if lower is None and i == last:  # only the leaf's is shown:
                        origin = _origin_of(newfd)  # a copied-up dir keeps its lower ino
                except BaseException:
                    os.close(newfd)
                    raise
            fd = newfd
            if newfd >= 0:
                if len(self._dirs) >= DIRS_KEPT:
                    self._forget_dirs()
                self._dirs[path] = (newfd, ust, lower, opaque, raw is not None,
                                    origin if i == last else _UNREAD)
            if ust is None and lower is None:
                return None
            cur = Found(path, ust, lower, opaque, raw is not None, origin=origin)
        return cur

    def _upper_leaf(self, path: bytes, ust: os.stat_result, pfd: int, name: bytes,
                    parent: Found) -> Found:
        """The Found of an upper non-directory: its origin inode and, for a metacopy
        file, the lower node that has its data."""
        merges = parent.lower is not None and parent.lower.entry.type == DIR and not parent.opaque
        below = merges and self.lowers.resolve(path) is not None
        names: list[bytes] = []
        priv = xattrs_at(pfd, name, is_private_xattr, names)
        origin = priv.get(ORIGIN_XATTR)
        f = Found(path, ust, None, False, below,
                  origin=int.from_bytes(origin, "big") if origin and len(origin) == 8 else None,
                  xattr_names=names)
        if LAZY_XATTR in priv and stat.S_ISREG(ust.st_mode):  # before a metacopy mark
            f.lazy = self._lazy_state(ust, priv[LAZY_XATTR], path)  # a crash left behind
        elif METACOPY_XATTR in priv and stat.S_ISREG(ust.st_mode):
            f.data = self._metacopy_data(path, priv.get(REDIRECT_XATTR))
        return f

    def _lazy_state(self, ust: os.stat_result, value: bytes, path: bytes) -> LazyFile:
        """The state of the lazily copied-up upper file ``ust`` (marked ``value``): the
        one its handles share, else read from the mark."""
        key = (ust.st_dev, ust.st_ino)
        state = self._lazy.get(key)
        if state is not None and not state.done:
            return state
        try:
            state = LazyFile.load(value, self.lowers, ust.st_size)
        except ValueError as exc:
            raise OverlayError(errno.EIO, path) from exc
        self._lazy[key] = state
        return state

    def _lazy_ok(self, node: Node) -> bool:
        """Copy-up of ``node``'s data for a write: lazily (not the whole file)?"""
        return self.copy_up_mode == LAZY and node.entry.size >= LAZY_MIN

    def _metacopy_data(self, path: bytes, redirect: bytes | None) -> Node:
        """The lower file with the data of the metacopy file at ``path`` (EIO if the
        lowers do not have it: the upper does not belong to these lowers)."""
        node = self.lowers.resolve(metacopy_source(path, redirect))
        if node is None or node.entry.type != REG:
            raise OverlayError(errno.EIO, path)
        return node

    def _lookup(self, vpath: bytes, ino: int | None = None) -> Found:
        """The entry at ``vpath``; with ``ino``, only if it is that object (its ``st_ino``,
        else ``OtherFileError``): the FUSE adapter makes a node's path from its table
        before the call, and a rename or unlink may change what the path names in
        between. Checked here, under the lock, before the caller changes anything."""
        f = self._find(vpath)
        if f is None:
            raise NoEntryError(vpath)
        if ino is not None and self._ino(f) != ino:
            raise OtherFileError(vpath)
        return f

    @staticmethod
    def _ino(f: Found) -> int:
        """``_stat(f)["st_ino"]``, without the rest."""
        if f.ust is None:
            assert f.lower is not None
            return f.lower.ino
        if f.lower is not None and stat.S_ISDIR(f.ust.st_mode):
            return f.lower.ino
        return f.ust.st_ino if f.origin is None else f.origin

    def _lookup_dir(self, vpath: bytes, ino: int | None = None) -> Found:
        f = self._lookup(vpath, ino)
        if not f.is_dir:
            raise OverlayError(errno.ENOTDIR, vpath)
        return f

    def _check_parent(self, vpath: bytes, ino: int | None, walked: bool = False) -> None:
        """``OtherFileError`` unless the directory holding the entry at ``vpath`` (a
        normalized path, as the FUSE adapter makes them) is object ``ino`` (any if
        None): the adapter made ``vpath`` from that directory's path (``_lookup``).
        ``walked``: a ``_find`` of ``vpath`` just found the entry, passing the directory
        (a lower or merged one is then known by its lower node). Otherwise from the
        walk cache when it has the directory, without a syscall; else a walk."""
        if ino is None:
            return
        parent = vpath.rpartition(b"/")[0] or b"/"
        seen = self._parent_seen if walked else None
        if seen is not None and seen.vpath == parent and seen.lower is not None:
            if seen.lower.ino != ino:
                raise OtherFileError(parent)
            return
        hit = self._dirs.get(parent)
        if hit is None:
            self._lookup(parent, ino)
            return
        _, ust, lower, opaque, below, _ = hit
        if self._ino(Found(parent, ust, lower, opaque, below,
                           origin=self._cached_origin(parent, hit))) != ino:
            raise OtherFileError(parent)

    def _cached_origin(self, path: bytes, hit: tuple[Any, ...]) -> int | None:
        """The origin of the upper directory at ``path`` that the walk cache holds
        (``hit``, its entry), read at its first need: None when it merges with a lower
        one (that gives its number) or has none."""
        fd, ust, lower, opaque, below, origin = hit
        if lower is not None:
            return None
        if origin is _UNREAD:
            origin = _origin_of(fd)
            self._dirs[path] = (fd, ust, lower, opaque, below, origin)
        return origin  # type: ignore[no-any-return]

    @contextmanager
    def _dirfd(self, vpath: bytes, copy_up: bool = True) -> Iterator[int]:
        """An fd of the upper directory at ``vpath``, copying up missing directories
        (metadata only) when ``copy_up``. The merged view must have a directory there.
        Requires ``_lock``."""
        hit = self._dirs.get(vpath)
        fd = os.dup(self.upper_fd if hit is None else hit[0])
        try:
            cur = b"/"
            for name in split_parts(vpath) if hit is None else ():
                cur = join_vpath(cur, name)
                try:
                    nfd = open_dir_at(fd, name)
                except FileNotFoundError:
                    node = self.lowers.resolve(cur) if copy_up else None
                    if node is None or node.entry.type != DIR:
                        raise NoEntryError(cur) from None
                    self._copy_up_at(fd, name, node, META)
                    nfd = open_dir_at(fd, name)
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def _tmp_name(self) -> bytes:
        return TMP_PREFIX + b"%d-%d" % (os.getpid(), next(self._tmp))

    # --- copy-up -------------------------------------------------------------------------

    @staticmethod
    def _apply_meta(node: Node, fd: int | None = None, dir_fd: int = -1,
                    name: bytes = b"") -> None:
        """Owner, xattrs, mode and times of a lower entry onto a new entry in the work
        directory: through its ``fd`` (a regular file or a directory), or else by
        ``name`` in ``dir_fd``, not following it (ours, not the container's: path calls
        through it are safe)."""
        e = node.entry
        target: int | bytes = name if fd is None else fd
        xtarget: int | str = fd if fd is not None else proc_path(dir_fd) + "/" + os.fsdecode(name)
        # keyword arguments of the path form (an fd takes none)
        at: dict[str, Any] = {} if fd is not None else {"dir_fd": dir_fd}
        nofollow: dict[str, Any] = {} if fd is not None else {"follow_symlinks": False}
        os.chown(target, e.uid, e.gid, **at, **nofollow)
        for key, value in e.xattrs.items():
            if visible_xattr(key) is not None:  # escaped ones are the container's
                os.setxattr(xtarget, key, value, **nofollow)
        if e.type != SYMLINK:
            os.chmod(target, e.mode & 0o7777, **at)  # after chown, which clears setuid
        os.utime(target, ns=(e.mtime_ns, e.mtime_ns), **at, **nofollow)
        os.setxattr(xtarget, ORIGIN_XATTR, node.ino.to_bytes(8, "big"), **nofollow)

    def _copy_up_at(self, parent_fd: int, name: bytes, node: Node, how: str = FULL,
                    change: Callable[[int], None] | None = None) -> None:
        """Copy a lower entry to ``name`` in the upper directory ``parent_fd``: built in
        the work directory, then renamed into place (never replacing anything). ``how``
        for a regular file: FULL copies the data, META records where it is (a sparse file
        of the right size with ``METACOPY_XATTR``), anything else leaves it empty.
        ``change(fd)``, for a regular file or a directory: a metadata change (chmod,
        chown, utimens) made on the copy before it is renamed into place, so it shows
        whole with the copy-up, and no second lookup of the new upper entry is needed."""
        e = node.entry
        tmp = self._tmp_name()
        wfd = self.work_fd
        lazy: LazyFile | None = None
        try:
            if e.type in (REG, DIR):
                if e.type == REG:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=wfd)
                else:
                    os.mkdir(tmp, 0o700, dir_fd=wfd)
                    fd = open_dir_at(wfd, tmp)
                try:
                    if e.type == REG:
                        lazy = self._copy_data(fd, node, how)
                    self._apply_meta(node, fd)
                    if change is not None:
                        change(fd)
                finally:
                    os.close(fd)
            else:
                if e.type == SYMLINK:
                    os.symlink(e.target, tmp, dir_fd=wfd)
                elif e.type in (CHR, BLK, FIFO):
                    os.mknod(tmp, IFMT[e.type] | 0o600, os.makedev(*e.rdev), dir_fd=wfd)
                else:
                    raise OverlayError(errno.EIO, node.vpath)
                self._apply_meta(node, dir_fd=wfd, name=tmp)
            renameat2(wfd, tmp, parent_fd, name, RENAME_NOREPLACE)
        except BaseException:
            remove_tree_at(wfd, tmp)
            raise
        if e.type == REG and how != META:
            self._switch_handles(node.ino, parent_fd, name, lazy)

    def _copy_data(self, fd: int, node: Node, how: str) -> LazyFile | None:
        """The data of a regular file's copy-up, into the new file ``fd`` (see
        ``_copy_up_at``); the lazy state in LAZY mode."""
        if how == FULL:
            self.lowers.copy_to(node, fd, COPY_BLOCK)
        elif how == META:
            os.ftruncate(fd, node.entry.size)
            os.setxattr(fd, METACOPY_XATTR, b"")
        elif how == LAZY:
            os.ftruncate(fd, node.entry.size)
            lazy = LazyFile.new(node)
            os.setxattr(fd, LAZY_XATTR, lazy.encode())
            ust = os.fstat(fd)
            self._lazy[(ust.st_dev, ust.st_ino)] = lazy
            return lazy
        return None

    def _copy_up(self, f: Found, how: str = FULL,
                 change: Callable[[int], None] | None = None) -> os.stat_result | None:
        """Make ``f`` an upper entry (no-op if it is one; see ``_copy_up_at`` for
        ``how`` and ``change``). The other names a lower hard link has in the view are
        linked to the new upper file, so the links stay one inode. Returns the new
        entry's ``lstat`` (None if it was upper already, or once links were made).
        Requires ``_lock``."""
        if f.ust is not None:
            return None
        assert f.lower is not None
        parent, name = _split(f.vpath)
        with self._dirfd(parent) as pfd:
            self._copy_up_at(pfd, name, f.lower, how, change)
            ust: os.stat_result | None = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        for other in self.lowers.links(f.lower):
            of = self._find(other)
            if of is not None and of.ust is None and of.lower is not None \
                    and of.lower.ino == f.lower.ino:
                self._link_upper(f.vpath, other)
                ust = None
        return ust

    def _copy_up_data(self, f: Found) -> None:
        """Give an upper metacopy file its data (no-op for any other file). The data is
        written into the upper file itself, so its hard links stay links, and the
        metacopy mark is removed last: until then the file still reads from the lowers,
        so a crash midway shows the old content. Requires ``_lock``."""
        if f.data is None:
            return
        with self._leaf(f.vpath) as (pfd, name):
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                self.lowers.copy_to(f.data, fd, COPY_BLOCK)
                self._drop_metacopy(fd)
            finally:
                os.close(fd)
            self._switch_handles(f.data.ino if f.origin is None else f.origin, pfd, name)
        f.data = None

    def _make_lazy(self, f: Found) -> None:
        """Turn an upper metacopy file into a lazily copied-up one (no data copied): the
        lazy mark first, then the metacopy mark goes (a crash between leaves both, and
        the lazy one wins). Requires ``_lock``."""
        assert f.data is not None
        with self._leaf(f.vpath) as (pfd, name):
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                ust = os.fstat(fd)
                lazy = LazyFile.new(f.data, ust.st_size)
                os.setxattr(fd, LAZY_XATTR, lazy.encode())
                self._lazy[(ust.st_dev, ust.st_ino)] = lazy
                self._drop_metacopy(fd)
            finally:
                os.close(fd)
            self._switch_handles(f.data.ino if f.origin is None else f.origin, pfd, name, lazy)
        f.data, f.lazy = None, lazy

    def _data_for_write(self, f: Found) -> None:
        """Before a write to the upper file ``f``: a metacopy file gets its data, or
        becomes a lazy one in LAZY mode. Requires ``_lock``."""
        if f.data is not None:
            if self._lazy_ok(f.data):
                self._make_lazy(f)
            else:
                self._copy_up_data(f)

    @staticmethod
    def _drop_metacopy(fd: int) -> None:
        for key in (METACOPY_XATTR, REDIRECT_XATTR):
            try:
                os.removexattr(fd, key)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise

    def _switch_handles(self, ino: int, pfd: int, name: bytes,
                        lazy: LazyFile | None = None) -> None:
        """Open handles reading a lower file (``ino``) read the upper copy from now on,
        as kernel overlayfs switches an fd opened before a copy-up (through ``lazy``
        when it was copied up lazily)."""
        for h in self._handles.values():
            if h.fd < 0 and h.node is not None and h.node.ino == ino:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                h.ino = ino
                h.lazy = lazy  # before fd: backing_fd reads them without the lock
                h.fd = fd

    def _meta_copy_up(self, f: Found) -> None:
        """Copy-up before a metadata change: metadata only in META and LAZY modes."""
        self._copy_up(f, FULL if self.copy_up_mode == FULL else META)

    def _change(self, f: Found, change: Callable[[int], None]) -> dict[str, int] | None:
        """Make a metadata change to a lower-only regular file or directory as part of
        its copy-up (one step, through the new inode's fd); return its attributes
        afterwards (what ``getattr`` gives). None if ``f`` is not such an entry: the
        caller copies up and changes the upper entry itself."""
        if f.ust is not None or f.lower is None or f.lower.entry.type not in (REG, DIR):
            return None
        how = FULL if self.copy_up_mode == FULL else META
        ust = self._copy_up(f, how, change)
        if ust is None:  # other names were linked to it: look again
            return self._stat(self._lookup(f.vpath))
        lower = f.lower
        if lower.entry.type == DIR:
            return self._stat(Found(f.vpath, ust, lower, False, True))
        return self._stat(Found(f.vpath, ust, None, False, True,
                                data=lower if how == META else None, origin=lower.ino))

    def _set_redirect(self, vpath: bytes, data: Node) -> None:
        """Record in the upper metacopy file at ``vpath`` where its data is in the lowers,
        in the kernel's absolute form, which every name of the inode can use (the kernel
        does the same before a rename or a link of a metacopy file)."""
        with self._leaf(vpath) as (pfd, name), path_fd(pfd, name) as fd:
            os.setxattr(proc_path(fd), REDIRECT_XATTR, data.vpath)

    def _copy_up_tree(self, vpath: bytes) -> None:
        """Copy a lower or merged directory and everything below it up, then make it
        self-contained: opaque, with no whiteouts. The merged view is the same at every
        step. Files are copied up in the mount's copy-up mode; metacopy files get an
        absolute redirect, so their data is found wherever the tree goes. Requires
        ``_lock``."""
        f = self._lookup(vpath)
        self._copy_up(f, how=META)
        for name in self._names(f):
            child = join_vpath(vpath, name)
            cf = self._lookup(child)
            if cf.is_dir:
                if cf.lower is not None:
                    self._copy_up_tree(child)
                continue
            if cf.ust is None:
                self._meta_copy_up(cf)
                cf = self._lookup(child)
            if cf.data is not None:
                self._set_redirect(child, cf.data)
        with self._dirfd(vpath, copy_up=False) as fd:
            if f.lower is not None and _origin_of(fd) is None:
                # an upper directory that kernel overlayfs (or a hand) made over the
                # lower one has no origin of ours: without one, made opaque, it would
                # show its upper inode number, and the mount's node for it be lost
                os.setxattr(fd, ORIGIN_XATTR, f.lower.ino.to_bytes(8, "big"))
            if not is_opaque_fd(fd):
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            for n in os.listdir(fd):
                st = lstat_at(fd, os.fsencode(n))
                if st is not None and is_whiteout(st):
                    os.unlink(n, dir_fd=fd)
        # The walk cache knew this directory as merged, not opaque: a later copy-up in
        # this rename (the other names of a lower hard link) must not walk through that.
        self._forget_dirs()

    def _link_upper(self, src: bytes, dst: bytes) -> None:
        sp, sn = _split(src)
        dp, dn = _split(dst)
        with self._dirfd(sp, copy_up=False) as sfd, self._dirfd(dp) as dfd:
            os.link(sn, dn, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    # --- helpers for namespace changes ------------------------------------------------

    def _names(self, f: Found) -> list[bytes]:
        """The visible names in a directory, sorted. Requires ``_lock``."""
        names: set[bytes] = set()
        hidden: set[bytes] = set()
        if f.ust is not None:
            with self._dirfd(f.vpath, copy_up=False) as fd:
                for n in os.listdir(fd):
                    name = os.fsencode(n)
                    st = lstat_at(fd, name)
                    if st is None:
                        continue
                    (hidden if is_whiteout(st) else names).add(name)
        if f.lower is not None:
            for name, _ in self.lowers.listdir(f.vpath):
                if name not in hidden:
                    names.add(name)
        return sorted(names)

    def _move_away(self, dir_fd: int, name: bytes, whiteout: bool) -> None:
        """Take an upper entry out of the view (to the work directory, then deleted),
        leaving a whiteout in its place when ``whiteout`` (atomically if the upper
        filesystem supports RENAME_WHITEOUT)."""
        tmp = self._tmp_name()
        if whiteout:
            try:
                renameat2(dir_fd, name, self.work_fd, tmp, RENAME_WHITEOUT)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                os.rename(name, tmp, src_dir_fd=dir_fd, dst_dir_fd=self.work_fd)
                make_whiteout(dir_fd, name)
        else:
            os.rename(name, tmp, src_dir_fd=dir_fd, dst_dir_fd=self.work_fd)
        remove_tree_at(self.work_fd, tmp)

    def _remove(self, f: Found) -> None:
        """Remove a non-directory or a directory empty in the view. Requires ``_lock``."""
        parent, name = _split(f.vpath)
        with self._dirfd(parent) as pfd:
            if f.ust is None:
                make_whiteout(pfd, name)
            elif stat.S_ISDIR(f.ust.st_mode) or f.lower_below:
                self._move_away(pfd, name, f.lower_below)  # a directory may hold whiteouts
            else:
                os.unlink(name, dir_fd=pfd)

    def _make(self, vpath: bytes, make: Callable[[int, bytes], int | None],
              is_dir: bool = False, uid: int | None = None, gid: int | None = None,
              mode: int | None = None, new_inode: bool = True,
              parent_ino: int | None = None) -> os.stat_result | None:
        """Create a new entry with ``make(dir_fd, name)``: directly in the upper, or, over a
        whiteout, in the work directory and then swapped in. A new directory is opaque
        when made over a whiteout or in a directory that merges with a lower one, as the
        kernel makes it. A new inode gets its owner (``uid``/``gid``; the directory's group
        in a setgid directory) and then ``mode`` again, since a chown clears setuid and
        setgid; ``new_inode=False`` (a hard link) leaves the inode alone. ``make`` may
        return an fd of the new regular file (which stays the caller's): its owner and
        mode are then set through it, mode always, and its attributes are returned when
        it was made in place (else None). ``parent_ino``: what the parent directory must
        be (``_lookup``). Requires ``_lock``."""
        parent, name = _split(vpath)
        if name == b".":
            raise OverlayError(errno.EEXIST, vpath)
        pf = self._lookup_dir(parent, parent_ino)
        merged_parent = pf.lower is not None  # None under an opaque upper directory too
        # the name in the lowers (looked up before any copy-up of the parent); in the
        # upper it is looked at below, where a whiteout may hide the lower one
        below = self.lowers.resolve(vpath) if merged_parent else None
        if pf.ust is None and below is not None:  # before the parent is copied up
            raise OverlayError(errno.EEXIST, vpath)
        # the parent's fd: the walk cache's (the ``_lookup_dir`` above put an upper
        # directory there; nothing below walks, so nothing closes it), else a copy-up
        hit = self._dirs.get(parent)
        cached = self.upper_fd if parent == b"/" else -1 if hit is None else hit[0]
        with self._dirfd(parent) if cached < 0 else nullcontext(cached) as pfd:
            pst = pf.ust if pf.ust is not None else os.fstat(pfd)  # (ust: just read)
            setgid = new_inode and bool(pst.st_mode & stat.S_ISGID)
            if setgid:  # BSD group semantics, as the kernel gives them in a setgid dir
                gid = pst.st_gid
            if not new_inode:
                uid = gid = mode = None
            st = None
            if below is None:
                # no lower entry to hide: made at once; only a name that is there
                # (EEXIST) is looked at, since it may be a whiteout
                try:
                    made = make(pfd, name)
                except FileExistsError:
                    st = lstat_at(pfd, name)
                    if st is None or not is_whiteout(st):
                        raise OverlayError(errno.EEXIST, vpath) from None
            else:
                st = lstat_at(pfd, name)
                if st is None or not is_whiteout(st):
                    raise OverlayError(errno.EEXIST, vpath)
            if st is None:
                made_st = self._own(pfd, name, uid, gid, setgid and is_dir, mode, made)
                if is_dir and merged_parent:  # as the kernel: no lower lookups below it
                    os.setxattr(proc_path(pfd) + "/" + os.fsdecode(name), OPAQUE_XATTR, b"y",
                                follow_symlinks=False)
                return made_st
            tmp = self._tmp_name()
            wfd = self.work_fd
            try:
                self._own(wfd, tmp, uid, gid, setgid and is_dir, mode, make(wfd, tmp))
                if is_dir:
                    os.setxattr(proc_path(wfd) + "/" + os.fsdecode(tmp), OPAQUE_XATTR, b"y")
                    renameat2(wfd, tmp, pfd, name, RENAME_EXCHANGE)  # the whiteout goes to work
                else:
                    os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=pfd)
            finally:
                remove_tree_at(wfd, tmp)
            return None

    @staticmethod
    def _own(dfd: int, name: bytes, uid: int | None, gid: int | None, setgid_dir: bool,
             mode: int | None, fd: int | None = None) -> os.stat_result | None:
        """Give a new entry its owner, then its mode again (the chown cleared setuid and
        setgid); a directory made in a setgid directory is setgid. ``fd``: of the new
        regular file, to do it through: only the owner and mode that differ from what
        it was made with (most creates need neither call); its attributes then."""
        if fd is not None:
            st = os.fstat(fd)
            chown = (uid is not None and st.st_uid != uid) or (gid is not None and st.st_gid != gid)
            if chown:
                os.chown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if mode is not None and (chown or stat.S_IMODE(st.st_mode) != mode & 0o7777):
                os.chmod(fd, mode & 0o7777)
                return os.fstat(fd)
            return os.fstat(fd) if chown else st
        if uid is not None or gid is not None:
            os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid,
                     dir_fd=dfd, follow_symlinks=False)
            if mode is not None:
                with path_fd(dfd, name) as fd:
                    if not stat.S_ISLNK(os.fstat(fd).st_mode):
                        os.chmod(proc_path(fd), mode & 0o7777)
        if setgid_dir:
            fd = open_dir_at(dfd, name)
            try:
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_ISGID)
            finally:
                os.close(fd)
        return None

    @contextmanager
    def _leaf(self, vpath: bytes) -> Iterator[tuple[int, bytes]]:
        """(upper parent fd, name) of an entry that is already in the upper."""
        parent, name = _split(vpath)
        with self._dirfd(parent, copy_up=False) as pfd:
            yield pfd, name

    # --- attributes and reading ---------------------------------------------------------

    def _stat(self, f: Found) -> dict[str, int]:
        if f.ust is None:
            assert f.lower is not None
            return node_stat(f.lower)
        if stat.S_ISDIR(f.ust.st_mode) and f.lower is not None:
            # a merged directory keeps the lower inode number, and its link count is
            # unknown without listing every layer: 1, as overlayfs reports it
            return stat_dict(f.ust, ino=f.lower.ino, nlink=1)
        st = stat_dict(f.ust, ino=f.origin)
        if f.data is not None:  # a metacopy file's blocks are those of its data
            st["st_blocks"] = node_stat(f.data)["st_blocks"]
        elif f.lazy is not None and not f.lazy.done:
            st["st_blocks"] = max(st["st_blocks"], node_stat(f.lazy.node)["st_blocks"])
        return st

    @_locked
    def exists(self, vpath: bytes) -> bool:
        return self._find(vpath) is not None

    @_locked
    def getattr(self, vpath: bytes, ino: int | None = None) -> dict[str, int]:
        return self._stat(self._lookup(vpath, ino))

    @_locked
    def lookup_names(self, vpath: bytes, parent_ino: int | None = None
                     ) -> tuple[dict[str, int], list[bytes] | None] | None:
        """``getattr``, and the entry's xattr names as ``listxattr`` gives them if the
        lookup had them at hand (``_known_names``; else None); None where there is no
        entry (no exception: the lookup of a new name begins each create).
        ``parent_ino``: the object the directory holding the entry must be
        (``_check_parent``), as in the calls below that make, remove or rename an entry."""
        f = self._find(vpath)
        if f is None:
            return None
        self._check_parent(vpath, parent_ino, walked=True)
        return self._stat(f), _known_names(f)

    @_locked
    def readdir(self, vpath: bytes, names: dict[bytes, list[bytes]] | None = None,
                ino: int | None = None) -> list[tuple[bytes, dict[str, int]]]:
        """The visible entries of a directory with their attributes (what ``getattr``
        gives), sorted by name, never whiteouts: one pass over the upper directory and
        the merged lowers' listing, not one lookup per entry. ``names``, if given, gets
        the xattr names of the entries the listing had them for (``getattr``). ``ino``:
        the object the directory must be (``_lookup``)."""
        f = self._lookup_dir(vpath, ino)
        found: dict[bytes, Found] = {}
        hidden: set[bytes] = set()
        merges = f.lower is not None and f.lower.entry.type == DIR and not f.opaque
        if f.ust is not None:
            with self._dirfd(vpath, copy_up=False) as fd:
                base = proc_path(fd) + "/"
                for n in os.listdir(fd):
                    name = os.fsencode(n)
                    ust = lstat_at(fd, name)
                    if ust is None:
                        continue
                    if is_whiteout(ust):
                        hidden.add(name)
                        continue
                    path = join_vpath(vpath, name)
                    if not stat.S_ISDIR(ust.st_mode):
                        found[name] = self._upper_leaf(path, ust, fd, name, f)
                        continue
                    raw = self.lowers.resolve(path) if merges else None
                    try:
                        opaque = os.getxattr(base + n, OPAQUE_XATTR, follow_symlinks=False) == b"y"
                    except OSError:
                        opaque = False
                    lower = raw if raw is not None and raw.entry.type == DIR and not opaque else None
                    origin = _origin_of(base + n) if lower is None else None
                    found[name] = Found(path, ust, lower, opaque, raw is not None, origin=origin)
        out: dict[bytes, dict[str, int]] = {name: self._stat(c) for name, c in found.items()}
        if names is not None:
            for name, c in found.items():
                known = _known_names(c)
                if known is not None:
                    names[name] = known
        if merges:
            for name, node in self.lowers.listdir(vpath):
                if name not in hidden and name not in out:
                    out[name] = node_stat(node)
                    if names is not None:
                        names[name] = _visible(node.entry.xattrs)
        return sorted(out.items())

    @_locked
    def readlink(self, vpath: bytes, ino: int | None = None) -> bytes:
        f = self._lookup(vpath, ino)
        if f.type_mode != stat.S_IFLNK:
            raise OverlayError(errno.EINVAL, vpath)
        if f.ust is None:
            assert f.lower is not None
            return f.lower.entry.target
        with self._leaf(vpath) as (pfd, name):
            return os.readlink(name, dir_fd=pfd)

    @_locked
    def statfs(self, vpath: bytes = b"/") -> dict[str, int]:
        s = os.fstatvfs(self.upper_fd)
        return {k: getattr(s, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                            "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

    # --- open files ---------------------------------------------------------------------

    def _add_handle(self, h: _Handle) -> int:
        fh = next(self._fh)
        self._handles[fh] = h
        return fh

    def open(self, vpath: bytes, flags: int, ino: int | None = None) -> int:
        """A handle for ``read``/``write``; writing or O_TRUNC copies a lower file up
        (O_TRUNC without its data). Only an open for writing counts as a change. With
        ``ino``, only if ``vpath`` names that object (``_lookup``), as in the calls below
        that take it."""
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        try:
            return self._open(vpath, flags, writing, ino)
        finally:
            if writing:
                self._changed()

    @_locked
    def _open(self, vpath: bytes, flags: int, writing: bool, ino: int | None) -> int:
        f = self._lookup(vpath, ino)
        if f.is_dir:
            if writing:
                raise OverlayError(errno.EISDIR, vpath)
            return self._add_handle(_Handle(vpath))
        if f.type_mode == stat.S_IFLNK:
            raise OverlayError(errno.ELOOP, vpath)
        if not writing and (f.ust is None or f.data is not None):
            node = f.lower if f.ust is None else f.data
            return self._add_handle(_Handle(vpath, node=node, ino=f.origin))
        trunc = bool(flags & os.O_TRUNC) and f.type_mode == stat.S_IFREG
        if f.ust is None:
            assert f.lower is not None
            how = "empty" if trunc else LAZY if self._lazy_ok(f.lower) else FULL
            ust = self._copy_up(f, how=how)
            if ust is not None and how != LAZY:
                # what a lookup would find now (``_upper_leaf``): a plain upper file over
                # the lower one, whose inode it names as its origin (``_apply_meta``); a
                # first small copy-up of a fresh mount spent ~0.15 ms looking it up again
                f = Found(vpath, ust, None, False, True, origin=f.lower.ino)
            else:
                f = self._lookup(vpath)
        elif not trunc and writing:
            self._data_for_write(f)
        keep = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if f.type_mode != stat.S_IFREG:
            keep |= os.O_NONBLOCK  # never block the daemon on a FIFO
        with self._leaf(vpath) as (pfd, name):
            fd = os.open(name, keep | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                if f.data is not None:  # truncated: the data in the lowers is not needed any more
                    self._drop_metacopy(fd)
                    self._switch_handles(f.data.ino if f.origin is None else f.origin, pfd, name)
                if f.lazy is not None and trunc:
                    f.lazy.truncate(fd, 0)  # drops the mark
            except BaseException:
                os.close(fd)
                raise
        lazy = f.lazy if f.lazy is not None and not f.lazy.done else None
        return self._add_handle(_Handle(vpath, fd=fd, ino=f.origin, lazy=lazy))

    def create(self, vpath: bytes, mode: int, flags: int = os.O_RDWR,
               uid: int | None = None, gid: int | None = None,
               parent_ino: int | None = None) -> int:
        """Create a new regular file (EEXIST if the path exists: O_EXCL) and open it."""
        return self.create_stat(vpath, mode, flags, uid, gid, parent_ino)[0]

    @_locked
    def create_stat(self, vpath: bytes, mode: int, flags: int = os.O_RDWR,
                    uid: int | None = None, gid: int | None = None,
                    parent_ino: int | None = None) -> tuple[int, dict[str, int], int]:
        """``create``: the handle, the new file's attributes (``fgetattr``'s), and the
        value ``changes`` took with it: taken under the lock, so a change to the new
        file (which waits for the lock) gives a later one."""
        fds: list[int] = []

        def make(dfd: int, name: bytes) -> int:
            acc = flags & os.O_ACCMODE
            fd = os.open(name, acc | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                         | (flags & os.O_APPEND), mode & 0o7777, dir_fd=dfd)
            fds.append(fd)
            return fd  # _make sets the mode through it (the daemon's umask is not the caller's)

        try:
            st = self._make(vpath, make, uid=uid, gid=gid, mode=mode, parent_ino=parent_ino)
            if st is None:  # made in the work directory, then renamed (its ctime moved)
                st = os.fstat(fds[0])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            self._changed()  # (as ``_changes``, but before the lock is released)
        return self._add_handle(_Handle(vpath, fd=fds[0], regular=True)), stat_dict(st), \
            self.changes

    def backing_fd(self, fh: int) -> int | None:
        """For FUSE passthrough: an fd (not to be closed) of a plain file that holds all
        of handle ``fh``'s data, or None (a lazy copy-up not yet done, a FIFO or device,
        a small lower file, a big one whose copy the store's file cache does not have
        yet). The kernel then reads (and writes, if the open may) that file itself: it
        opens it anew for each open, with that open's flags.

        - A plain upper file: the handle's own fd.
        - A lower file read in place (also the data of a metacopy file): a read-only copy
          of its whole content (``MergedLowers.backing``), kept with the handle.
          ``lower_data`` tells the adapter these apart: such a file must never be
          shared with an open that may write."""
        h = self._handles.get(fh)
        if h is None:
            return None
        fd, lazy = h.fd, h.lazy  # _switch_handles sets lazy before fd
        if fd < 0:
            if h.node is None:
                return None
            if h.backing < 0:
                b = self.lowers.backing(h.node)
                if b is None:
                    return None
                h.backing = b
            return h.backing
        if lazy is not None and not lazy.done:
            return None
        return fd if h.regular or stat.S_ISREG(os.fstat(fd).st_mode) else None

    def lower_data(self, fh: int) -> bool:
        """Whether handle ``fh`` reads a lower file's data in place (``backing_fd``)."""
        h = self._handles.get(fh)
        return h is not None and h.fd < 0 and h.node is not None

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise OverlayError(errno.EBADF)
        return h

    def read(self, fh: int, size: int, offset: int) -> bytes:
        got: list[bytes] = []
        self.read_into(fh, size, offset, lambda p: got.append(joined(p)))
        return got[0]

    def read_into(self, fh: int, size: int, offset: int, send: Send) -> None:
        """``read``, with the content handed to ``send`` once (``lower.Send``: pieces
        that may be views into the store's map, valid during the call only)."""
        h = self._handle(fh)
        if h.lazy is not None and not h.lazy.done:
            send([self._lazy_read(h, size, offset)])
            return
        if h.fd >= 0:
            send([os.pread(h.fd, size, offset)])
            return
        if h.node is None:
            raise OverlayError(errno.EISDIR, h.vpath)
        h.read += size
        try:
            self.lowers.read_into(h.node, offset, size, send)
        except (LayerstoreError, lmdb.Error) as exc:
            raise OverlayError(errno.EIO, h.vpath) from exc

    @_changes
    def write(self, fh: int, data: bytes, offset: int) -> int:
        h = self._handle(fh)
        if h.fd < 0:
            raise OverlayError(errno.EBADF, h.vpath)
        if h.lazy is not None and not h.lazy.done:
            return self._lazy_write(h, data, offset)
        return os.pwrite(h.fd, data, offset)

    @_locked
    def _lazy_read(self, h: _Handle, size: int, offset: int) -> bytes:
        assert h.lazy is not None
        return h.lazy.read(self.lowers, h.fd, offset, size)

    @_locked
    def _lazy_write(self, h: _Handle, data: bytes, offset: int) -> int:
        assert h.lazy is not None
        return h.lazy.write(self.lowers, h.fd, data, offset)

    @_changes
    def ftruncate(self, fh: int, length: int) -> None:
        h = self._handle(fh)
        if h.fd < 0:
            raise OverlayError(errno.EBADF, h.vpath)
        if h.lazy is not None and not h.lazy.done:
            self._lazy_truncate(h.lazy, h.fd, length)
        else:
            os.ftruncate(h.fd, length)

    @_locked
    def _lazy_truncate(self, lazy: LazyFile, fd: int, length: int) -> None:
        os.ftruncate(fd, length)  # then the mark: LazyFile.load clamps it after a crash between
        lazy.truncate(fd, length)

    def handle_xattrs(self, fh: int) -> list[bytes]:
        """The xattr names of an open upper file as ``listxattr`` gives them (a new
        file's: the upper's own, such as an inherited ACL)."""
        h = self._handle(fh)
        if h.fd < 0:
            raise OverlayError(errno.EBADF, h.vpath)
        return _visible(map(os.fsencode, os.listxattr(h.fd)))

    def fgetattr(self, fh: int) -> dict[str, int]:
        """Attributes through an open handle (works after the path is unlinked)."""
        h = self._handle(fh)
        if h.fd >= 0:
            return stat_dict(os.fstat(h.fd), ino=h.ino)
        if h.node is not None:
            ino = h.node.ino if h.ino is None else h.ino
            try:
                st = self.getattr(h.vpath)
            except OSError:
                st = None
            return st if st is not None and st["st_ino"] == ino else node_stat(h.node)
        return self.getattr(h.vpath)

    def fsync(self, fh: int, datasync: bool = False) -> None:
        h = self._handle(fh)
        if h.fd >= 0:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    @_changes
    def fchmod(self, fh: int, mode: int) -> None:
        """chmod through an open upper file (it may have no name any more): how the
        mount clears setuid/setgid for a write (EBADF for a handle on a lower file)."""
        h = self._handle(fh)
        if h.fd < 0:
            raise OverlayError(errno.EBADF, h.vpath)
        os.fchmod(h.fd, mode & 0o7777)

    @_locked
    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            if h.fd >= 0:
                os.close(h.fd)
            elif h.node is not None and h.read >= KEEP_AFTER and self.keep_lower_copies:
                self.lowers.keep(h.node)  # read through the daemon: a copy for next time
            if h.backing >= 0:
                os.close(h.backing)

    @_changes
    @_locked
    def truncate(self, vpath: bytes, length: int, ino: int | None = None) -> None:
        f = self._lookup(vpath, ino)
        if f.is_dir:
            raise OverlayError(errno.EISDIR, vpath)
        if f.type_mode != stat.S_IFREG:
            raise OverlayError(errno.EINVAL, vpath)
        if f.ust is None:
            assert f.lower is not None
            self._copy_up(f, how="empty" if length == 0 else LAZY if self._lazy_ok(f.lower)
                          else FULL)
            f = self._lookup(vpath)
        elif length > 0:
            self._data_for_write(f)
        with self._leaf(vpath) as (pfd, name):
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                if f.lazy is not None and not f.lazy.done:
                    self._lazy_truncate(f.lazy, fd, length)
                else:
                    os.ftruncate(fd, length)
                if f.data is not None:  # truncated to 0 before: the mark goes after
                    self._drop_metacopy(fd)
                    self._switch_handles(f.data.ino if f.origin is None else f.origin, pfd, name)
            finally:
                os.close(fd)

    @_changes
    @_locked
    def materialize(self) -> int:
        """Give every upper file whose data is still (in part) in the lowers its whole
        data: lazily copied-up files (``lazy.py``) and metacopy files. The upper is then
        one that kernel overlayfs reads without ``metacopy=on``. Returns how many files
        were filled."""
        count = 0
        todo = [b"/"]
        while todo:
            d = todo.pop()
            with self._dirfd(d, copy_up=False) as fd:
                names = sorted(os.fsencode(n) for n in os.listdir(fd))
                kinds = {n: lstat_at(fd, n) for n in names}
            for name, ust in kinds.items():
                if ust is None:
                    continue
                vpath = join_vpath(d, name)
                if stat.S_ISDIR(ust.st_mode):
                    todo.append(vpath)
                    continue
                if not stat.S_ISREG(ust.st_mode):
                    continue
                f = self._find(vpath)
                if f is None:
                    continue
                if f.data is not None:
                    self._copy_up_data(f)
                    count += 1
                elif f.lazy is not None and not f.lazy.done:
                    with self._leaf(vpath) as (pfd, leaf):
                        wfd = os.open(leaf, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                        try:
                            f.lazy.materialize(self.lowers, wfd)
                        finally:
                            os.close(wfd)
                    count += 1
        return count

    # --- namespace ----------------------------------------------------------------------

    @_changes
    @_locked
    def mkdir(self, vpath: bytes, mode: int, uid: int | None = None, gid: int | None = None,
              parent_ino: int | None = None) -> dict[str, int]:
        """Make a directory; its attributes (what ``getattr`` gives), as the calls below
        that make an entry give theirs."""
        def make(dfd: int, name: bytes) -> None:
            os.mkdir(name, 0o700, dir_fd=dfd)
            fd = open_dir_at(dfd, name)
            try:
                os.fchmod(fd, mode & 0o7777)
            finally:
                os.close(fd)

        self._make(vpath, make, is_dir=True, uid=uid, gid=gid, mode=mode, parent_ino=parent_ino)
        return self._stat(self._lookup(vpath))

    @_changes
    @_locked
    def mknod(self, vpath: bytes, mode: int, rdev: int = 0, uid: int | None = None,
              gid: int | None = None, parent_ino: int | None = None) -> dict[str, int]:
        def make(dfd: int, name: bytes) -> None:
            os.mknod(name, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=dfd)
            with path_fd(dfd, name) as fd:
                if not stat.S_ISLNK(os.fstat(fd).st_mode):
                    os.chmod(proc_path(fd), mode & 0o7777)

        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                                     stat.S_IFSOCK, 0):
            raise OverlayError(errno.EINVAL, vpath)
        if stat.S_ISCHR(mode) and rdev == 0:  # a whiteout's form: EPERM, as the kernel
            raise OverlayError(errno.EPERM, vpath)
        self._make(vpath, make, uid=uid, gid=gid, mode=mode, parent_ino=parent_ino)
        return self._stat(self._lookup(vpath))

    @_changes
    @_locked
    def symlink(self, target: bytes, vpath: bytes, uid: int | None = None,
                gid: int | None = None, parent_ino: int | None = None) -> dict[str, int]:
        """Make ``vpath`` a symlink to ``target`` (argument order of ``os.symlink``)."""
        self._make(vpath, lambda dfd, name: os.symlink(target, name, dir_fd=dfd), uid=uid,
                   gid=gid, parent_ino=parent_ino)
        return self._stat(self._lookup(vpath))

    @_changes
    @_locked
    def link(self, old: bytes, new: bytes, ino: int | None = None,
             parent_ino: int | None = None) -> dict[str, int]:
        """Hard link: a lower file is copied up first, then linked in the upper. ``ino``:
        what ``old`` must name; ``parent_ino``: what the directory of ``new`` must be."""
        self._check_parent(new, parent_ino)
        fo = self._lookup(old, ino)
        if fo.is_dir:
            raise OverlayError(errno.EPERM, old)
        self._meta_copy_up(fo)
        fo = self._lookup(old)
        if fo.data is not None:
            self._set_redirect(old, fo.data)
        op, on = _split(old)
        with self._dirfd(op, copy_up=False) as ofd:
            self._make(new, lambda dfd, name: os.link(on, name, src_dir_fd=ofd, dst_dir_fd=dfd,
                                                      follow_symlinks=False), new_inode=False)
        return self._stat(self._lookup(new))

    @_changes
    @_locked
    def unlink(self, vpath: bytes, parent_ino: int | None = None) -> None:
        f = self._lookup(vpath)
        self._check_parent(vpath, parent_ino, walked=True)
        if f.is_dir:
            raise OverlayError(errno.EISDIR, vpath)
        self._remove(f)

    @_changes
    @_locked
    def rmdir(self, vpath: bytes, parent_ino: int | None = None) -> None:
        f = self._lookup(vpath)
        self._check_parent(vpath, parent_ino, walked=True)
        if not f.is_dir:
            raise OverlayError(errno.ENOTDIR, vpath)
        if vpath.strip(b"/") == b"":
            raise OverlayError(errno.EBUSY, vpath)
        if self._names(f):
            raise NotEmptyError(vpath)
        try:
            self._remove(f)
        finally:
            self._forget_dirs()  # a whiteout or nothing where the directory was

    @_changes
    @_locked
    def rename(self, old: bytes, new: bytes, old_parent_ino: int | None = None,
               new_parent_ino: int | None = None, noreplace: bool = False) -> bool:
        """rename(2) with POSIX overwrite rules (``noreplace``: EEXIST if ``new``
        exists, ``RENAME_NOREPLACE``); lower and merged directories are copied up whole
        first (see the module docstring), so there is no EXDEV. The parents must be
        objects ``old_parent_ino`` and ``new_parent_ino`` (``_check_parent``). False if
        nothing moved: ``old`` and ``new`` name one file (or are one path)."""
        if not split_parts(old) or not split_parts(new):
            raise OverlayError(errno.EBUSY, old)
        fo = self._lookup(old)
        self._check_parent(old, old_parent_ino, walked=True)
        if not fo.is_dir:
            # a non-directory moves no directory (over a directory it is EISDIR): the
            # walk cache stays (dpkg renames every file it installs)
            self._rename(fo, old, new, new_parent_ino, noreplace)
        else:
            try:
                self._rename(fo, old, new, new_parent_ino, noreplace)
            finally:
                self._forget_dirs()
        return self._find(old) is None

    def _rename(self, fo: Found, old: bytes, new: bytes, new_parent_ino: int | None,
                noreplace: bool) -> None:
        new_parent, new_name = _split(new)
        pn = self._lookup_dir(new_parent, new_parent_ino)
        fn = self._find(new)
        if noreplace and fn is not None:
            raise OverlayError(errno.EEXIST, new)
        old = b"/" + b"/".join(split_parts(old))
        new = b"/" + b"/".join(split_parts(new))
        if old == new:
            return
        if new.startswith(old + b"/"):
            raise OverlayError(errno.EINVAL, new)
        if fn is not None:
            if fo.is_dir and not fn.is_dir:
                raise OverlayError(errno.ENOTDIR, new)
            if not fo.is_dir and fn.is_dir:
                raise OverlayError(errno.EISDIR, new)
            if fn.is_dir and self._names(fn):
                raise NotEmptyError(new)
            if (fo.ust is not None and fn.ust is not None and not fo.is_dir
                    and (fo.ust.st_dev, fo.ust.st_ino) == (fn.ust.st_dev, fn.ust.st_ino)):
                return  # two links of one file: rename(2) does nothing
        if fo.is_dir and fo.lower is not None:
            self._copy_up_tree(old)
        else:
            self._meta_copy_up(fo)
        fo = self._lookup(old)
        if fo.data is not None:
            self._set_redirect(old, fo.data)
        old_parent, old_name = _split(old)
        with self._dirfd(old_parent) as ofd, self._dirfd(new_parent) as nfd:
            tst = lstat_at(nfd, new_name)
            if tst is not None and stat.S_ISDIR(tst.st_mode):
                assert fn is not None
                self._move_away(nfd, new_name, fn.lower_below)  # empty in the view
                tst = lstat_at(nfd, new_name)
            ost = lstat_at(ofd, old_name)
            if ost is None:
                raise NoEntryError(old)
            if stat.S_ISDIR(ost.st_mode) and pn.lower is not None:
                # moved into a directory that merges with a lower one: hide whatever the
                # lowers have (or will have) at the new path, as the kernel does
                dfd = open_dir_at(ofd, old_name)
                try:
                    if not is_opaque_fd(dfd):
                        os.setxattr(dfd, OPAQUE_XATTR, b"y")
                finally:
                    os.close(dfd)
            if stat.S_ISDIR(ost.st_mode) and tst is not None:
                # a directory cannot replace the whiteout: swap them, and the whiteout
                # lands at the old path, where it is either needed or removed
                renameat2(ofd, old_name, nfd, new_name, RENAME_EXCHANGE)
                if not fo.lower_below:
                    os.unlink(old_name, dir_fd=ofd)
            elif fo.lower_below:
                try:
                    renameat2(ofd, old_name, nfd, new_name, RENAME_WHITEOUT)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    os.rename(old_name, new_name, src_dir_fd=ofd, dst_dir_fd=nfd)
                    make_whiteout(ofd, old_name)
            else:
                os.rename(old_name, new_name, src_dir_fd=ofd, dst_dir_fd=nfd)

    # --- metadata -----------------------------------------------------------------------

    @_changes
    @_locked
    def chmod(self, vpath: bytes, mode: int, ino: int | None = None) -> dict[str, int] | None:
        """chmod; the attributes afterwards when the change was a copy-up (else None)."""
        f = self._lookup(vpath, ino)
        st = self._change(f, lambda fd: os.chmod(fd, mode & 0o7777))
        if st is not None:
            return st
        self._meta_copy_up(f)
        with self._leaf(vpath) as (pfd, name), path_fd(pfd, name) as fd:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OverlayError(errno.EOPNOTSUPP, vpath)
            os.chmod(proc_path(fd), mode & 0o7777)
        return None

    @_changes
    @_locked
    def chown(self, vpath: bytes, uid: int, gid: int,
              ino: int | None = None) -> dict[str, int] | None:
        """chown; the attributes afterwards when the change was a copy-up (else None)."""
        f = self._lookup(vpath, ino)
        st = self._change(f, lambda fd: os.chown(fd, uid, gid))
        if st is not None:
            return st
        self._meta_copy_up(f)
        with self._leaf(vpath) as (pfd, name):
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        return None

    @_changes
    @_locked
    def utimens(self, vpath: bytes, times: tuple[int, int] | None = None,
                ino: int | None = None) -> dict[str, int] | None:
        """Set (atime_ns, mtime_ns); None sets both to now. The attributes afterwards
        when the change was a copy-up (else None)."""
        f = self._lookup(vpath, ino)
        st = self._change(f, lambda fd: os.utime(fd) if times is None else os.utime(fd, ns=times))
        if st is not None:
            return st
        self._meta_copy_up(f)
        with self._leaf(vpath) as (pfd, name):
            if times is None:
                os.utime(name, dir_fd=pfd, follow_symlinks=False)
            else:
                os.utime(name, ns=times, dir_fd=pfd, follow_symlinks=False)
        return None

    @staticmethod
    def _xname(name: bytes | str, vpath: bytes) -> bytes:
        """The stored name of an xattr named through the overlay."""
        return escape_xattr(os.fsencode(name))

    @_locked
    def getxattr(self, vpath: bytes, name: bytes | str, ino: int | None = None) -> bytes:
        key = self._xname(name, vpath)
        f = self._lookup(vpath, ino)
        if f.ust is None:
            assert f.lower is not None
            value = f.lower.entry.xattrs.get(key)
            if value is None:
                raise _no_xattr(vpath, f.lower.entry.xattrs)
            return value
        if f.xattr_names is not None and key not in f.xattr_names:
            # what the lookup listed: no second walk for the names a file has not got
            # (the kernel asks security.capability before a new file's first write,
            # ls -l asks security.selinux and system.posix_acl_access of each file)
            raise _no_xattr(vpath, f.xattr_names)
        with self._leaf(vpath) as (pfd, leaf), path_fd(pfd, leaf) as fd:
            return os.getxattr(proc_path(fd), key)

    @_locked
    def listxattr(self, vpath: bytes, ino: int | None = None) -> list[bytes]:
        f = self._lookup(vpath, ino)
        if f.ust is None:
            assert f.lower is not None
            names = list(f.lower.entry.xattrs)
        elif f.xattr_names is not None:
            names = f.xattr_names
        else:
            with self._leaf(vpath) as (pfd, leaf), path_fd(pfd, leaf) as fd:
                names = [os.fsencode(n) for n in os.listxattr(proc_path(fd))]
        return _visible(names)

    @_changes
    @_locked
    def setxattr(self, vpath: bytes, name: bytes | str, value: bytes, flags: int = 0,
                 ino: int | None = None) -> None:
        key = self._xname(name, vpath)
        f = self._lookup(vpath, ino)
        self._meta_copy_up(f)
        with self._leaf(vpath) as (pfd, leaf), path_fd(pfd, leaf) as fd:
            os.setxattr(proc_path(fd), key, value, flags)

    @_changes
    @_locked
    def removexattr(self, vpath: bytes, name: bytes | str, ino: int | None = None) -> None:
        key = self._xname(name, vpath)
        f = self._lookup(vpath, ino)
        if f.ust is None:
            assert f.lower is not None
            if key not in f.lower.entry.xattrs:
                raise OverlayError(errno.ENODATA, vpath)
        self._meta_copy_up(f)
        with self._leaf(vpath) as (pfd, leaf), path_fd(pfd, leaf) as fd:
            os.removexattr(proc_path(fd), key)
