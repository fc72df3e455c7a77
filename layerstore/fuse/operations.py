"""The FUSE adapter: fusepy callbacks translated to the overlay, and nothing else.

- Paths: fusepy decodes paths with the ``encoding`` given to ``FUSE``; we pass
  ``latin-1``, which maps every byte to one code point, so ``path.encode("latin-1")``
  gives back the exact bytes (names that are not UTF-8 keep working).
- Errors are mapped in one place, ``_errors``: an ``OSError`` passes with its errno
  (a missing path is logged without a traceback); anything else is logged with its
  traceback and becomes EIO, never fusepy's default EINVAL.
- Semantics live in ``layerstore.overlay``; this module only converts types.

Threading: the view is thread-safe (one short LMDB read transaction per call, caches
under locks), so the daemon may run multithreaded.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import fuse as fusepy  # fusepy's module, not this package

from ..overlay.lower import MergedLowers, Node
from ..store.records import BLK, CHR, DIR, FIFO, REG, SYMLINK

log = logging.getLogger("layerstore.fuse")
F = TypeVar("F", bound=Callable[..., Any])

ENCODING = "latin-1"

_IFMT = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHR: stat.S_IFCHR,
         BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


def _errors(fn: F) -> F:
    """The one place where exceptions become errno values for the kernel."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise fusepy.FuseOSError(errno.ENOENT) from None
            if exc.errno and exc.errno > 0:
                log.debug("%s: %s", fn.__name__, exc)
                raise fusepy.FuseOSError(exc.errno) from None
            log.error("%s: OSError without errno", fn.__name__, exc_info=True)
            raise fusepy.FuseOSError(errno.EIO) from exc
        except Exception as exc:
            log.error("%s failed", fn.__name__, exc_info=True)
            raise fusepy.FuseOSError(errno.EIO) from exc

    return wrapper  # type: ignore[return-value]


def _b(path: str) -> bytes:
    return path.encode(ENCODING)


def _s(name: bytes) -> str:
    return name.decode(ENCODING)


def stat_of(node: Node) -> dict[str, int]:
    e = node.entry
    mtime = e.mtime_ns
    st = {
        "st_ino": node.ino,
        "st_mode": _IFMT[e.type] | (e.mode & 0o7777),
        "st_nlink": 1,
        "st_uid": e.uid,
        "st_gid": e.gid,
        "st_size": e.size if e.type == REG else (len(e.target) if e.type == SYMLINK else 0),
        "st_atime": mtime,
        "st_mtime": mtime,
        "st_ctime": mtime,
        "st_blocks": (e.size + 511) // 512 if e.type == REG else 0,
    }
    if e.type in (CHR, BLK):
        st["st_rdev"] = os.makedev(*e.rdev)
    return st


class ReadOnlyOperations(fusepy.Operations):  # type: ignore[misc]
    """The image of a container, read-only (``layerstore mount --read-only``)."""

    use_ns = True

    def __init__(self, view: MergedLowers, on_ready: Callable[[], None] | None = None):
        self.view = view
        self.on_ready = on_ready

    def init(self, path: str) -> None:
        if self.on_ready is not None:
            self.on_ready()

    @_errors
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return stat_of(self.view.lookup(_b(path)))

    @_errors
    def readdir(self, path: str, fh: int) -> list[Any]:
        vpath = _b(path)
        node = self.view.lookup(vpath)
        out: list[Any] = [(".", stat_of(node), 0), ("..", None, 0)]
        for name, child in self.view.listdir(vpath):
            out.append((_s(name), stat_of(child), 0))
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
