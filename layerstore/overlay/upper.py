"""The upper directory on the host, in kernel-overlayfs format, reached only through
directory file descriptors.

- A whiteout is a 0/0 character device; an opaque directory carries
  ``trusted.overlay.opaque=y`` (constants below, the kernel's own names).
- The upper is controlled by the container, so no function here follows a symlink:
  every path is walked one component at a time from a directory fd with
  ``O_NOFOLLOW|O_DIRECTORY``, leaves are touched with ``*at`` calls (``dir_fd=``,
  ``follow_symlinks=False``) or through an ``O_PATH|O_NOFOLLOW`` fd, and names are
  checked by ``check_name`` before use. A symlink where a directory is expected fails
  with ELOOP or ENOTDIR; nothing is ever written outside the upper or work directory.
- ``renameat2`` (``RENAME_NOREPLACE``/``EXCHANGE``/``WHITEOUT``) comes from libc through
  ctypes, since ``os`` does not expose it.

Imports nothing from layerstore but ``errors``. Stateless: thread-safety is the caller's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import OverlayError

#: xattr that marks an upper directory as hiding all lower content at its path
OPAQUE_XATTR = b"trusted.overlay.opaque"
#: prefix of the xattrs overlayfs keeps for itself (hidden from listxattr, refused to users)
OVERLAY_XATTR_PREFIX = b"trusted.overlay."
#: a regular file whose data is still in the lowers (metadata-only copy-up); its size is
#: the upper file's (sparse), its content that of the lower file at the same path, or at
#: ``REDIRECT_XATTR`` when that is set. Empty value: the kernel's format without verity.
METACOPY_XATTR = b"trusted.overlay.metacopy"
#: where the lowers have the data of a renamed metacopy file: an absolute path, or a name
#: in the same directory (the kernel writes that form for a rename within one directory)
REDIRECT_XATTR = b"trusted.overlay.redirect"
#: ours: the inode number (8 bytes, big-endian) the object had in the lowers, so that
#: st_ino stays the same across copy-up. Under ``trusted.overlay.`` so that neither the
#: container nor kernel overlayfs shows it, and the container cannot forge it.
ORIGIN_XATTR = b"trusted.overlay.layerstore.origin"
#: a container's own ``trusted.overlay.X`` is stored escaped as ``trusted.overlay.overlay.X``
#: and shown unescaped; overlayfs' real ``trusted.overlay.*`` xattrs are hidden. This is
#: what kernel overlayfs does since Linux 6.7 (checked in tests/test_overlay_fs.py), so a
#: container can neither see nor forge an opaque mark, a metacopy or a redirect.
ESCAPED_XATTR_PREFIX = OVERLAY_XATTR_PREFIX + b"overlay."

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2_fn = getattr(_libc, "renameat2", None)


def check_name(name: bytes) -> bytes:
    """A single path component, or EINVAL: never empty, ``.``, ``..``, or with ``/``/NUL."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OverlayError(errno.EINVAL, name)
    if len(name) > 255:
        raise OverlayError(errno.ENAMETOOLONG, name)
    return name


def split_parts(vpath: bytes) -> list[bytes]:
    """Components of an absolute vpath (``b"/"`` -> ``[]``), each checked."""
    if vpath == b"/":
        return []
    if type(vpath) is bytes and vpath[:1] == b"/":  # a normalized path: checked at once
        parts = vpath[1:].split(b"/")
        if (b"" not in parts and b"." not in parts and b".." not in parts
                and b"\0" not in vpath and max(map(len, parts)) <= 255):
            return parts
    if not isinstance(vpath, bytes) or not vpath.startswith(b"/"):
        raise OverlayError(errno.EINVAL, vpath)
    return [check_name(p) for p in vpath.split(b"/") if p]


def renameat2(src_fd: int, src: bytes, dst_fd: int, dst: bytes, flags: int = 0) -> None:
    """``renameat2(2)``; without it in libc, plain rename for flags 0 and ENOSYS otherwise."""
    if _renameat2_fn is None:
        if flags:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    if _renameat2_fn(src_fd, src, dst_fd, dst, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst)


def escape_xattr(name: bytes) -> bytes:
    """The stored name of an xattr the container names ``name``."""
    if name.startswith(OVERLAY_XATTR_PREFIX):
        return ESCAPED_XATTR_PREFIX + name[len(OVERLAY_XATTR_PREFIX):]
    return name


def visible_xattr(name: bytes) -> bytes | None:
    """The name a stored xattr shows through the overlay, None for overlayfs' own."""
    if name.startswith(ESCAPED_XATTR_PREFIX):
        return OVERLAY_XATTR_PREFIX + name[len(ESCAPED_XATTR_PREFIX):]
    if name.startswith(OVERLAY_XATTR_PREFIX):
        return None
    return name


def xattrs_at(dir_fd: int, name: bytes, keep: Callable[[bytes], bool] | None = None,
              names_seen: list[bytes] | None = None) -> dict[bytes, bytes]:
    """The xattrs of ``name`` in ``dir_fd`` (those whose name ``keep`` accepts), without
    following it: one listxattr, then a getxattr per name kept. None where the
    filesystem has no xattrs. ``names_seen`` gets every name listed, in order."""
    path = os.fsencode(proc_path(dir_fd)) + b"/" + name
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
            return {}
        raise
    if names_seen is not None:
        names_seen.extend(map(os.fsencode, names))
    out = {}
    for n in names:
        key = os.fsencode(n)
        if keep is None or keep(key):
            try:
                out[key] = os.getxattr(path, key, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
    return out


def is_private_xattr(key: bytes) -> bool:
    """overlayfs' own (``trusted.overlay.*``), not a container's escaped one."""
    return key.startswith(OVERLAY_XATTR_PREFIX) and not key.startswith(ESCAPED_XATTR_PREFIX)


def metacopy_source(vpath: bytes, redirect: bytes | None) -> bytes:
    """The lower path with the data of the metacopy file at ``vpath``: its redirect
    (absolute, or a name in the same directory), else ``vpath`` itself."""
    if not redirect:
        return vpath
    if redirect.startswith(b"/"):
        return redirect
    return vpath.rsplit(b"/", 1)[0] + b"/" + redirect


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat of ``name`` in a directory fd, None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_dir_at(dir_fd: int, name: bytes) -> int:
    """A directory fd for ``name`` in ``dir_fd``, never through a symlink (ELOOP/ENOTDIR)."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


@contextmanager
def path_fd(dir_fd: int, name: bytes) -> Iterator[int]:
    """An ``O_PATH|O_NOFOLLOW`` fd of ``name`` (the inode itself, even a symlink)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def proc_path(fd: int) -> str:
    """The ``/proc/self/fd`` path of an fd: path-based calls on it act on that inode
    (used for chmod and xattrs, which have no ``AT_SYMLINK_NOFOLLOW``/fd form for
    ``O_PATH`` fds). Callers refuse symlinks before using it."""
    return f"/proc/self/fd/{fd}"


def is_opaque_fd(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return False
        raise


def make_whiteout(dir_fd: int, name: bytes) -> None:
    """A whiteout: character device 0/0, mode 0 (as the kernel makes them)."""
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)


def remove_tree_at(dir_fd: int, name: bytes) -> None:
    """Remove ``name`` in ``dir_fd`` and, if it is a directory, all below it, without
    following symlinks."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = open_dir_at(dir_fd, name)
    try:
        for child in os.listdir(fd):
            remove_tree_at(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def stat_dict(st: os.stat_result, ino: int | None = None, nlink: int | None = None) -> dict[str, int]:
    """``os.stat_result`` in the dict form of ``lower.node_stat`` (ns times)."""
    out = {
        "st_ino": st.st_ino if ino is None else ino,
        "st_mode": st.st_mode,
        "st_nlink": st.st_nlink if nlink is None else nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_size": st.st_size,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
        "st_blocks": st.st_blocks,
    }
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        out["st_rdev"] = st.st_rdev
    return out
