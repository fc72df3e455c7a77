"""Host directories as lowers (the fuse-overlayfs-compatible mode, ``layerstore-overlay``).

``DirLayers`` implements the small protocol ``MergedLowers`` uses (see ``lower.py``) over
directories in kernel-overlayfs lower format, top first:

- a 0/0 character device is a whiteout;
- a directory with ``trusted.overlay.opaque=y`` is opaque; like fuse-overlayfs we also
  accept ``user.overlay.opaque=y`` and ``user.fuseoverlayfs.opaque=y``, and the OCI
  names fuse-overlayfs accepts: ``.wh.NAME`` whites out NAME (also an entry NAME beside
  it in the same directory, as fuse-overlayfs does; in an OCI layer tar that entry would
  stay) and ``.wh..wh..opq`` makes its directory opaque. Names starting with ``.wh.`` are never shown (fuse-overlayfs hides them too;
  kernel overlayfs shows them).
- overlayfs' own xattrs (``trusted.overlay.*`` but a container's escaped
  ``trusted.overlay.overlay.*``, ``user.overlay.*``, ``user.fuseoverlayfs.*``) are not part
  of an entry; everything else is.
- Not understood (as fuse-overlayfs 1.10): ``trusted.overlay.redirect``/``metacopy`` in a
  lower, and the kernel's xattr whiteouts. Sockets are not shown.

``ChainedLayers`` stacks several of these sources (``DirLayers`` and ``StoreLayers``) into
one, for a mixed ``lowerdir=``.

Confinement: a lower's root is opened once (the path the user gave may be a symlink);
below it, every path is walked one component at a time from directory fds with
``O_NOFOLLOW|O_DIRECTORY``, leaves are read with ``lstat``/``readlink``/``l*xattr`` relative
to their directory fd, and files are opened with ``O_NOFOLLOW`` and checked to be regular
files. Nothing follows a symlink out of a lower directory.

Inode numbers: a directory lower is named by the absolute real path of its root
(``identity``), so a file's inode number is derived from (that path, its path in the lower)
and a hard-link group's from (that path, ``st_ino``): the same on every mount of the same
directories, different for different directories. Moving a lower directory changes them.

Lowers are assumed not to change while mounted (as for kernel overlayfs): entries are
cached for the life of the view.

Imports neither fusepy nor anything above ``store``.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OverlayError
from ..store.filecache import FILL_FROM
from ..store.records import BLK, CHR, DIR, FIFO, OPAQUE, REG, SYMLINK, WHITEOUT, Entry, join_vpath
from .upper import OVERLAY_XATTR_PREFIX, lstat_at, open_dir_at, split_parts, xattrs_at

#: a whiteout named the OCI way, and the OCI opaque marker
WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
#: xattrs that mark an opaque directory (value ``y``): the kernel's, the kernel's with
#: ``userxattr``, and fuse-overlayfs' own
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
#: xattrs that belong to an overlay implementation, not to the file (never shown or copied)
PRIVATE_PREFIXES = (OVERLAY_XATTR_PREFIX, b"user.overlay.", b"user.fuseoverlayfs.")
#: a container's own ``trusted.overlay.X``, stored escaped (shown by OverlayFS unescaped)
ESCAPED_PREFIX = OVERLAY_XATTR_PREFIX + b"overlay."
#: open lower files kept for reads
OPEN_FILES = 64

_TYPES = {stat.S_IFREG: REG, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK, stat.S_IFCHR: CHR,
          stat.S_IFBLK: BLK, stat.S_IFIFO: FIFO}


def _private(name: bytes) -> bool:
    return name.startswith(PRIVATE_PREFIXES) and not name.startswith(ESCAPED_PREFIX)


class DirLayers:
    """Host directories in overlayfs lower format, top first (see the module docstring)."""

    def __init__(self, paths: Sequence[Path | str]):
        self.paths = [Path(os.path.realpath(p)) for p in paths]
        self._roots: list[int] = []
        try:
            for p in self.paths:
                self._roots.append(os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, bytes], Entry | None] = {}
        self._nlinks: dict[tuple[int, int], int] = {}  #: (layer, st_ino) -> st_nlink
        self._groups: dict[int, dict[int, list[bytes]]] = {}
        self._files: OrderedDict[tuple[int, bytes], int] = OrderedDict()

    def close(self) -> None:
        for fd in [*self._roots, *getattr(self, "_files", {}).values()]:
            os.close(fd)
        self._roots = []
        if hasattr(self, "_files"):
            self._files.clear()

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self, layer: int) -> bytes:
        return b"dir:" + os.fsencode(self.paths[layer])

    # --- walking ------------------------------------------------------------------------

    def _dir_fd(self, layer: int, vpath: bytes) -> int | None:
        """A new fd of the directory at ``vpath`` in one lower, None if there is no
        directory there (missing, not a directory, or a symlink)."""
        fd = os.dup(self._roots[layer])
        try:
            for name in split_parts(vpath):
                nfd = open_dir_at(fd, name)
                os.close(fd)
                fd = nfd
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        return fd

    def _entry(self, layer: int, dir_fd: int, name: bytes, st: os.stat_result,
               root: bool = False) -> Entry | None:
        """The entry of ``name`` in ``dir_fd`` (already lstat'ed); None for a socket."""
        kind = _TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            return None
        if kind == CHR and st.st_rdev == 0:
            return Entry(WHITEOUT, mode=0)
        xattrs = xattrs_at(dir_fd, name)
        flags = 0
        if kind == DIR and not root:
            if any(xattrs.get(k) == b"y" for k in OPAQUE_XATTRS):
                flags = OPAQUE
            else:
                sub = open_dir_at(dir_fd, name)
                try:
                    if lstat_at(sub, WH_OPAQUE) is not None:
                        flags = OPAQUE
                finally:
                    os.close(sub)
        e = Entry(kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                  mtime_ns=st.st_mtime_ns, size=st.st_size if kind == REG else 0,
                  xattrs={k: v for k, v in xattrs.items() if not _private(k)}, flags=flags)
        if kind == SYMLINK:
            e.target = os.readlink(name, dir_fd=dir_fd)
        elif kind in (CHR, BLK):
            e.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != DIR and st.st_nlink > 1:
            e.link_group = st.st_ino
            with self._lock:
                self._nlinks[(layer, st.st_ino)] = st.st_nlink
        return e

    # --- the protocol of MergedLowers ---------------------------------------------------

    def lookup(self, layer: int, vpath: bytes) -> Entry | None:
        key = (layer, vpath)
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        parts = split_parts(vpath)
        e: Entry | None = None
        if not parts:
            e = self._entry(layer, self._roots[layer], b".", os.fstat(self._roots[layer]),
                            root=True)
        elif not parts[-1].startswith(WH_PREFIX):
            fd = self._dir_fd(layer, b"/" + b"/".join(parts[:-1]))
            if fd is not None:
                try:
                    if len(parts[-1]) <= 255 - len(WH_PREFIX) and \
                            lstat_at(fd, WH_PREFIX + parts[-1]) is not None:
                        e = Entry(WHITEOUT, mode=0)
                    else:
                        st = lstat_at(fd, parts[-1])
                        if st is not None:
                            e = self._entry(layer, fd, parts[-1], st)
                finally:
                    os.close(fd)
        with self._lock:
            self._entries[key] = e
        return e

    def list(self, layer: int, vpath: bytes) -> list[tuple[bytes, Entry]]:
        """The children of one directory in one lower, sorted by name; ``.wh.NAME`` as a
        whiteout NAME, ``.wh.`` names themselves never."""
        fd = self._dir_fd(layer, vpath)
        if fd is None:
            return []
        out: dict[bytes, Entry] = {}
        whiteouts = []
        try:
            for n in os.listdir(fd):
                name = os.fsencode(n)
                if name.startswith(WH_PREFIX):
                    if name != WH_OPAQUE and len(name) > len(WH_PREFIX):
                        whiteouts.append(name[len(WH_PREFIX):])
                    continue
                st = lstat_at(fd, name)
                e = self._entry(layer, fd, name, st) if st is not None else None
                if e is not None:
                    out[name] = e
        finally:
            os.close(fd)
        for name in whiteouts:
            out[name] = Entry(WHITEOUT, mode=0)
        with self._lock:
            for name, e in out.items():
                self._entries.setdefault((layer, join_vpath(vpath, name)), e)
        return sorted(out.items())

    def group_size(self, layer: int, group: int) -> int:
        """The link count of the lower inode ``group`` (its ``st_nlink``, as kernel
        overlayfs reports it; links outside the lower count too)."""
        with self._lock:
            return self._nlinks.get((layer, group), 1)

    def group_paths(self, layer: int, group: int) -> list[bytes]:
        """The paths of one lower that are hard links of inode ``group`` (the lower is
        walked once, the first time)."""
        with self._lock:
            groups = self._groups.get(layer)
        if groups is None:
            groups = {}
            stack = [b"/"]
            while stack:
                d = stack.pop()
                fd = self._dir_fd(layer, d)
                if fd is None:
                    continue
                try:
                    for n in os.listdir(fd):
                        name = os.fsencode(n)
                        st = lstat_at(fd, name)
                        if st is None or name.startswith(WH_PREFIX):
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            stack.append(join_vpath(d, name))
                        elif st.st_nlink > 1:
                            groups.setdefault(st.st_ino, []).append(join_vpath(d, name))
                finally:
                    os.close(fd)
            with self._lock:
                self._groups[layer] = groups
        return sorted(groups.get(group, ()))

    def _open(self, layer: int, vpath: bytes) -> int:
        """A new fd of the regular file at ``vpath`` (from a small cache of open files)."""
        key = (layer, vpath)
        with self._lock:
            fd = self._files.get(key)
            if fd is not None:
                self._files.move_to_end(key)
                return os.dup(fd)
        parent, _, name = vpath.rpartition(b"/")
        dfd = self._dir_fd(layer, parent or b"/")
        if dfd is None:
            raise OverlayError(errno.EIO, vpath)  # the lower changed under us
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            raise OverlayError(errno.EIO, vpath) from exc
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OverlayError(errno.EIO, vpath)
        with self._lock:
            self._files[key] = fd
            while len(self._files) > OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            return os.dup(fd)

    def backing(self, layer: int, vpath: bytes, entry: Entry) -> int | None:
        """For FUSE passthrough: a read-only fd of the lower file itself (the caller's),
        for files of at least ``FILL_FROM`` bytes, as for the store's layers."""
        if entry.size < FILL_FROM:
            return None
        try:
            return self._open(layer, vpath)
        except OverlayError:
            return None

    def read(self, layer: int, vpath: bytes, entry: Entry, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        fd = self._open(layer, vpath)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)


class ChainedLayers:
    """Several layer sources (``DirLayers``, ``StoreLayers``) as one stack, top first:
    layer ``i`` of the chain is a layer of one of them."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self._index = [(s, i) for s in self.sources for i in range(len(s))]

    def __len__(self) -> int:
        return len(self._index)

    def identity(self, layer: int) -> bytes:
        s, i = self._index[layer]
        return s.identity(i)  # type: ignore[no-any-return]

    def lookup(self, layer: int, vpath: bytes) -> Entry | None:
        s, i = self._index[layer]
        return s.lookup(i, vpath)  # type: ignore[no-any-return]

    def list(self, layer: int, vpath: bytes) -> list[tuple[bytes, Entry]]:
        s, i = self._index[layer]
        return s.list(i, vpath)  # type: ignore[no-any-return]

    def group_size(self, layer: int, group: int) -> int:
        s, i = self._index[layer]
        return s.group_size(i, group)  # type: ignore[no-any-return]

    def group_paths(self, layer: int, group: int) -> list[bytes]:
        s, i = self._index[layer]
        paths = getattr(s, "group_paths", None)
        return paths(i, group) if paths is not None else []

    def backing(self, layer: int, vpath: bytes, entry: Entry) -> int | None:
        s, i = self._index[layer]
        backing = getattr(s, "backing", None)
        return backing(i, vpath, entry) if backing is not None else None

    def keep(self, layer: int, vpath: bytes, entry: Entry) -> None:
        s, i = self._index[layer]
        keep = getattr(s, "keep", None)
        if keep is not None:
            keep(i, vpath, entry)

    def close(self) -> bool:
        done = True
        for s in self.sources:
            close = getattr(s, "close", None)
            if close is not None and close() is False:
                done = False
        return done

    def read(self, layer: int, vpath: bytes, entry: Entry, offset: int, size: int) -> bytes:
        s, i = self._index[layer]
        return s.read(i, vpath, entry, offset, size)  # type: ignore[no-any-return]
