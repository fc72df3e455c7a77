"""The FUSE adapter: fusepy callbacks translated to the overlay, and nothing else.

- Paths: fusepy decodes paths with the ``encoding`` given to ``FUSE``; we pass
  ``latin-1``, which maps every byte to one code point, so ``path.encode("latin-1")``
  gives back the exact bytes (names that are not UTF-8 keep working).
- Errors are mapped in one place, ``_errors``, by the rule both adapters share
  (``layerstore.fuse.errno_of``): an ``OSError`` passes with its errno (a missing path
  is not logged); anything else is logged with its traceback and becomes EIO, never
  fusepy's default EINVAL.
- Semantics live in ``layerstore.overlay``; this module only converts types.

Threading: the view is thread-safe (one short LMDB read transaction per call, caches
under locks), so the daemon may run multithreaded.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..overlay.fs import OverlayFS
from ..overlay.lower import MergedLowers, node_stat
from ..store.records import SYMLINK
from . import clear_setid, errno_of, may_keep_setid
from .binding import FUSE_MAJOR, fusepy, invalidate_path, remember_attrs

F = TypeVar("F", bound=Callable[..., Any])

ENCODING = "latin-1"



def _errors(fn: F) -> F:
    """The one place where exceptions become errno values for the kernel."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise fusepy.FuseOSError(errno_of(fn.__name__, exc)) from None

    return wrapper  # type: ignore[return-value]


def _b(path: str) -> bytes:
    return path.encode(ENCODING)


def _s(name: bytes) -> str:
    return name.decode(ENCODING)




#: libfuse3's ``FUSE_CAP_*`` bits of ``fuse_conn_info.want`` that ``init_with_config`` sets
CAP_READDIRPLUS_AUTO = 1 << 14
CAP_CACHE_SYMLINKS = 1 << 23
CAP_POSIX_ACL = 1 << 19
#: largest write request (libfuse3 takes it at init, libfuse2 as ``-o max_write``)
MAX_WRITE = 1 << 20
#: largest read request (``-o max_read``)
MAX_READ = 1 << 20


class _Base(fusepy.Operations):  # type: ignore[misc]
    """What both mounts share: ns times, readiness at init, cached listings.

    ``cache_readdir``: the kernel may keep directory listings (libfuse3). The read-only
    view never changes; in the writable one every change goes through the mount, and
    the kernel drops a cached listing when an entry is made, removed or renamed."""

    use_ns = True
    cache_readdir = True
    on_ready: Callable[[], None] | None = None

    def init(self, path: str) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None and FUSE_MAJOR == 3:
            conn.max_write = MAX_WRITE
            conn.max_read = MAX_READ  # must equal -o max_read (libfuse checks)
            # Every listing piece with attributes: with libfuse's default (adaptive
            # readdirplus) the kernel asks READDIRPLUS for a directory's first 4 KiB
            # only, and every entry after the first ~25 of a big directory cost a LOOKUP
            # when a walk stats it (a first tar of the suite's tree: 1,755 of them).
            conn.want &= ~CAP_READDIRPLUS_AUTO
            # Symlink targets cached by the kernel: a symlink's target never changes
            # (a new one is a new inode), so readlink reaches the daemon once per link.
            if conn.capable & CAP_CACHE_SYMLINKS:
                conn.want |= CAP_CACHE_SYMLINKS
            # POSIX ACLs checked and cached by the kernel, as kernel overlayfs does:
            # without this flag FUSE keeps ACLs as plain xattrs, never checks them (a file
            # an ACL lets a user read stayed EACCES for that user) and asks the daemon
            # for them on every `ls -l` of every file
            if conn.capable & CAP_POSIX_ACL:
                conn.want |= CAP_POSIX_ACL
        self.init("/")

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str | None, fh: int) -> int:
        return 0

    def changes(self) -> int:
        """A value that differs after anything that may change what the mount shows
        (the binding's listings check it: see ``binding.FUSE.readdir_fuse_3``); the
        read-only view never changes."""
        return 0


class ReadOnlyOperations(_Base):
    """The image of a container, read-only (``layerstore mount --read-only``)."""

    def __init__(self, view: MergedLowers, on_ready: Callable[[], None] | None = None):
        self.view = view
        self.on_ready = on_ready

    @_errors
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return node_stat(self.view.lookup(_b(path)))

    @_errors
    def readdir(self, path: str, fh: int) -> list[Any]:
        vpath = _b(path)
        node = self.view.lookup(vpath)
        out: list[Any] = [(".", node_stat(node), 0), ("..", None, 0)]
        for name, child in self.view.listdir(vpath):
            out.append((_s(name), node_stat(child), 0))
        return out

    @_errors
    def readlink(self, path: str) -> str:
        node = self.view.lookup(_b(path))
        if node.entry.type != SYMLINK:
            raise OSError(errno.EINVAL, "not a symlink")
        return _s(node.entry.target)

    @_errors
    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only")
        self.view.lookup(_b(path))
        return 0

    @_errors
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.view.read(self.view.lookup(_b(path)), offset, size)

    @_errors
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        node = self.view.lookup(_b(path))
        value = node.entry.xattrs.get(_b(name))
        if value is None:
            raise OSError(errno.ENODATA, "no such attribute")
        return value

    @_errors
    def listxattr(self, path: str) -> list[str]:
        return [_s(k) for k in self.view.lookup(_b(path)).entry.xattrs]

    @_errors
    def access(self, path: str, amode: int) -> None:
        self.view.lookup(_b(path))
        if amode & os.W_OK:
            raise OSError(errno.EROFS, "read-only")

    @_errors
    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0,
                "f_bavail": 0, "f_files": 0, "f_ffree": 0, "f_namemax": 255}


#: ``utimensat`` special nanosecond values (fusepy gives ``tv_sec * 10**9 + tv_nsec``
#: with ``tv_sec == 0`` for them when ``flag_utime_omit_ok`` is set)
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
#: renameat2 flags
RENAME_NOREPLACE = 1
#: libfuse's names for open files that were unlinked (``hide_file`` in fuse.c)
HIDDEN_PREFIX = ".fuse_hidden"


class Operations(_Base):
    """A container, writable: every callback converts its arguments and calls the
    ``OverlayFS`` method of the same meaning (``layerstore mount``).

    - Unlinking an open file: libfuse2's high-level API (without ``hard_remove``) renames
      it to ``DIR/.fuse_hidden*`` and unlinks that name on the last release; with
      ``hard_remove`` it forgets the path and ``fstat`` then fails with ENOENT (the kernel
      sends GETATTR without the fh). So ``rename`` to a hidden name is translated to an
      overlay ``unlink``, and the hidden name is served from the open handles (``fgetattr``)
      until libfuse unlinks it: nothing reaches the upper, ``fstat`` keeps working. This
      needs the current path of each open handle (``_paths``, updated on rename).
    - ``flag_nullpath_ok``: fh-based callbacks never need the path.
    - ``flag_utime_omit_ok``: without it libfuse2 silently drops a utimensat that sets
      only one of the two times; with it a time to keep comes as ``UTIME_OMIT``.
    - The caller's uid/gid (``fuse_get_context``) own what create/mkdir/mknod/symlink make.
    - Hard links and the kernel's attribute cache: libfuse's high-level API gives each
      name its own kernel inode, so a change through one name of a file with several
      links would leave the others' cached attributes stale. The names seen of such
      files are kept (``_names_of``) and, after a change through one of them, the kernel
      is told to forget the others' (``invalidate_path``, libfuse3); that is what lets
      the mount cache attributes (``daemon.serve_fuse``).
    """

    flag_nullpath_ok = True
    flag_utime_omit_ok = True

    def __init__(self, fs: OverlayFS, on_ready: Callable[[], None] | None = None):
        self.fs = fs
        self.on_ready = on_ready
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {}  #: open fh -> its current path
        self._hidden: dict[str, set[int]] = {}  #: libfuse's hidden name -> open fhs
        self._names_of: dict[int, set[str]] = {}  #: st_ino of a linked file -> names seen
        self._ino_at: dict[str, int] = {}  #: a name in _names_of -> its st_ino

    def changes(self) -> int:
        return self.fs.changes

    def _note(self, path: str, st: dict[str, int]) -> dict[str, int]:
        """Remember ``path`` if it names a file with several links (see the class doc)."""
        if st.get("st_nlink", 1) > 1 and not stat.S_ISDIR(st["st_mode"]):
            with self._lock:
                ino = st["st_ino"]
                old = self._ino_at.get(path)
                if old != ino:
                    if old is not None:
                        self._names_of.get(old, set()).discard(path)
                    self._ino_at[path] = ino
                    self._names_of.setdefault(ino, set()).add(path)
        return st

    def _touched(self, path: str | None, fh: int | None = None, forget: bool = False,
                 itself: bool = False) -> None:
        """After a change through ``path`` (or ``fh``'s path): the other names of its
        inode drop their cached attributes (``itself``: ``path`` too, whose kernel inode
        the change did not go through); ``forget``: ``path`` is gone."""
        with self._lock:
            if path is None and fh is not None:
                path = self._paths.get(fh)
            ino = self._ino_at.get(path) if path is not None else None
            if ino is None:
                return
            others = [p for p in self._names_of.get(ino, ()) if p != path or itself]
            if forget:
                self._forget(path)  # type: ignore[arg-type]
        for p in others:
            invalidate_path(p, ENCODING)

    def _forget(self, path: str) -> None:
        ino = self._ino_at.pop(path, None)
        if ino is not None:
            names = self._names_of.get(ino, set())
            names.discard(path)
            if not names:
                self._names_of.pop(ino, None)

    def _opened(self, path: str, fh: int) -> int:
        with self._lock:
            self._paths[fh] = path
        return fh

    def _hidden_fh(self, path: str | None) -> int | None:
        with self._lock:
            fhs = self._hidden.get(path) if path is not None else None
            return min(fhs) if fhs else None

    @staticmethod
    def _owner() -> tuple[int, int]:
        uid, gid, _pid = fusepy.fuse_get_context()
        return uid, gid

    # --- attributes and directories -----------------------------------------------------

    @_errors
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        fh = fh or self._hidden_fh(path)
        if fh:
            return self.fs.fgetattr(fh)
        assert path is not None
        return self._note(path, self.fs.getattr(_b(path)))

    @_errors
    def readdir(self, path: str, fh: int) -> list[Any]:
        vpath = _b(path)
        out: list[Any] = [(".", self.fs.getattr(vpath), 0), ("..", None, 0)]
        prefix = path.rstrip("/") + "/"
        for name, st in self.fs.readdir(vpath):
            out.append((_s(name), self._note(prefix + _s(name), st), 0))
        return out

    @_errors
    def readlink(self, path: str) -> str:
        return _s(self.fs.readlink(_b(path)))

    @_errors
    def access(self, path: str, amode: int) -> None:
        # permissions are checked by the kernel (default_permissions); this only
        # answers whether the path exists
        self.fs.getattr(_b(path))

    @_errors
    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs(_b(path))

    # --- open files ---------------------------------------------------------------------

    @_errors
    def open(self, path: str, flags: int) -> int:
        fh = self._opened(path, self.fs.open(_b(path), flags))
        if flags & os.O_TRUNC:  # libfuse3 truncates in open (atomic_o_trunc)
            # and leaves setuid/setgid to the daemon then, as a truncate by a caller
            # without CAP_FSETID would clear them
            uid, _gid, pid = fusepy.fuse_get_context()
            clear_setid(self.fs, fh, lambda: may_keep_setid(pid, uid))
            self._touched(path)
        return fh

    @_errors
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        uid, gid = self._owner()
        return self._opened(path, self.fs.create(_b(path), mode, os.O_RDWR, uid=uid, gid=gid))

    @_errors
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.fs.read(fh, size, offset)

    @_errors
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        n = self.fs.write(fh, data, offset)
        if self._names_of:
            self._touched(path, fh)
        return n

    @_errors
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if fh:
            self.fs.ftruncate(fh, length)
        else:
            assert path is not None
            self.fs.truncate(_b(path), length)
        self._touched(path, fh)

    @_errors
    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        self.fs.fsync(fh, bool(datasync))

    @_errors
    def release(self, path: str | None, fh: int) -> None:
        with self._lock:
            self._paths.pop(fh, None)
            for name, fhs in list(self._hidden.items()):
                fhs.discard(fh)
                if not fhs:  # libfuse unlinks the name next (or cannot: parent gone)
                    del self._hidden[name]
        self.fs.release(fh)

    # --- namespace ----------------------------------------------------------------------

    @_errors
    def mkdir(self, path: str, mode: int) -> None:
        uid, gid = self._owner()
        self.fs.mkdir(_b(path), mode, uid=uid, gid=gid)

    @_errors
    def mknod(self, path: str, mode: int, dev: int) -> None:
        uid, gid = self._owner()
        self.fs.mknod(_b(path), mode, dev, uid=uid, gid=gid)

    @_errors
    def symlink(self, target: str, source: str) -> None:
        # fusepy's order: ``target`` is the new link's path, ``source`` what it points to
        uid, gid = self._owner()
        self.fs.symlink(_b(source), _b(target), uid=uid, gid=gid)

    @_errors
    def link(self, target: str, source: str) -> None:
        # fusepy's order: ``target`` is the new name, ``source`` the existing file
        self.fs.link(_b(source), _b(target))
        self._note(source, self.fs.getattr(_b(source)))
        self._touched(source, itself=True)  # the link went to another kernel inode

    @_errors
    def unlink(self, path: str) -> None:
        with self._lock:
            if self._hidden.pop(path, None) is not None:
                return  # libfuse's hidden name of a file already unlinked in the overlay
        self.fs.unlink(_b(path))
        self._touched(path, forget=True)

    @_errors
    def rmdir(self, path: str) -> None:
        self.fs.rmdir(_b(path))

    @_errors
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "rename flag not supported")
        hidden = False
        with self._lock:
            if new.rpartition("/")[2].startswith(HIDDEN_PREFIX):
                fhs = {fh for fh, p in self._paths.items() if p == old}
                if fhs:  # libfuse hides an open file it is asked to unlink
                    self.fs.unlink(_b(old))
                    self._hidden[new] = fhs
                    for fh in fhs:
                        self._paths[fh] = new
                    hidden = True
            if not hidden:
                self.fs.rename(_b(old), _b(new), noreplace=bool(flags & RENAME_NOREPLACE))
                for fh, p in list(self._paths.items()):
                    if p == old or p.startswith(old + "/"):
                        self._paths[fh] = new + p[len(old):]
        if hidden:
            self._touched(old, forget=True)
            return
        self._touched(new, forget=True)  # a linked file it replaced
        with self._lock:
            for p in [p for p in self._ino_at if p == old or p.startswith(old + "/")]:
                ino = self._ino_at[p]
                self._forget(p)
                self._ino_at[new + p[len(old):]] = ino
                self._names_of.setdefault(ino, set()).add(new + p[len(old):])

    # --- metadata -----------------------------------------------------------------------

    @_errors
    def chmod(self, path: str, mode: int) -> None:
        remember_attrs(path, self.fs.chmod(_b(path), mode))
        self._touched(path)

    @_errors
    def chown(self, path: str, uid: int, gid: int) -> None:
        remember_attrs(path, self.fs.chown(_b(path), uid, gid))
        self._touched(path)

    @_errors
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        vpath = _b(path)
        if times is None or times == (UTIME_NOW, UTIME_NOW):
            remember_attrs(path, self.fs.utimens(vpath, None))
            self._touched(path)
            return
        if UTIME_OMIT in times or UTIME_NOW in times:
            st = self.fs.getattr(vpath)
            now = time.time_ns()
            old = (st["st_atime"], st["st_mtime"])
            times = tuple(old[i] if t == UTIME_OMIT else now if t == UTIME_NOW else t
                          for i, t in enumerate(times))  # type: ignore[assignment]
        remember_attrs(path, self.fs.utimens(vpath, times))
        self._touched(path)

    @_errors
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.fs.getxattr(_b(path), _b(name))

    @_errors
    def listxattr(self, path: str) -> list[str]:
        return [_s(n) for n in self.fs.listxattr(_b(path))]

    @_errors
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> None:
        self.fs.setxattr(_b(path), _b(name), value, options)
        self._touched(path)

    @_errors
    def removexattr(self, path: str, name: str) -> None:
        self.fs.removexattr(_b(path), _b(name))
        self._touched(path)
