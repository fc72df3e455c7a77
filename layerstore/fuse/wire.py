"""The FUSE protocol spoken on ``/dev/fuse`` directly, with pyfuse3's interface.

Selected with ``LAYERSTORE_FUSE=wire``. ``lowlevel.py`` (the adapter on the inode-based
API) runs on this module exactly as it runs on pyfuse3: the names it uses (``init``,
``main``, ``close``, ``terminate``, ``Operations``, ``EntryAttributes``, ``FileInfo``,
``StatvfsData``, ``FUSEError``, ``readdir_reply``, ``ROOT_INODE``) behave the same.

Why not libfuse: Debian bookworm's libfuse is 3.14, and both its APIs fix what the
kernel is told at INIT and in each reply. Spoken directly, the protocol lets the mount
ask for what kernel 5.11+ and 6.x offer and libfuse 3.14 cannot pass on:

- ``FUSE_HANDLE_KILLPRIV_V2``: the kernel then caches "this file has nothing to strip"
  (``SB_NOSEC``), and stops sending GETXATTR ``security.capability`` before every
  ``write`` (half of the requests of random 4 KiB writes). The contract it brings:
  the daemon clears setuid/setgid when the kernel says the caller lacks CAP_FSETID:
  a WRITE with ``FUSE_WRITE_KILL_SUIDGID``, a SETATTR with ``FATTR_KILL_SUIDGID``
  (truncate, chown) and an ``O_TRUNC`` open with ``FUSE_OPEN_KILL_SUIDGID``; done
  here (``h_write``, ``h_setattr``, ``h_open``, ``kill_setid``: through the open
  file, then the kernel is told to drop the mode it caches). File capabilities
  (``security.capability``) the kernel still removes itself.
- No OPENDIR/RELEASEDIR (ENOSYS to OPENDIR, ``FUSE_NO_OPENDIR_SUPPORT``): the kernel
  then opens directories itself with ``FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE``, so it
  keeps listings and a warm walk sends nothing. It drops a directory's cached listing
  whenever an entry is made, removed or renamed in it (every change goes through the
  mount). Listings are read per directory node (``_Lister``), not per open handle.
- FLUSH answers ENOSYS once (the kernel stops sending it), as pyfuse3 does.
- ``FUSE_PASSTHROUGH`` (kernel 6.9+; root, no writeback cache): an open file whose data
  is all in one plain upper file is handed to the kernel, which reads, writes and maps
  it itself (``_Passthrough``; ``LAYERSTORE_FUSE_PASSTHROUGH=0`` turns it off). A write
  by a caller without CAP_FSETID then comes here as an empty SETATTR (the kernel's
  ``file_remove_privs``): setuid/setgid are cleared as for a WRITE.
- ``FUSE_OVER_IO_URING`` (kernel 6.14+, when ``/sys/module/fuse/parameters/enable_uring``
  is on; ``LAYERSTORE_FUSE_URING=0`` declines it): requests come through one io_uring
  queue per CPU, each served by a thread pinned to its CPU (``uring.py``; unpinned for a
  while after a large READ), so a request is answered on the CPU of its caller. The
  queues are made before INIT is answered (``_make_queues``; the kernel holds every
  request back until all are registered) and registered after (``_start_queues``).
  Replies go into the request's ring entry (``_send_pieces`` looks it up in
  ``current``); FORGET, INTERRUPT and notifications still use the fd.

The protocol is ``include/uapi/linux/fuse.h`` (7.x); structures are packed with
``struct`` below, named as there. The mount is made by ``fusermount3`` (it passes the
``/dev/fuse`` fd back over a socket, ``_FUSE_COMMFD``), as libfuse does.

Threads: ``WORKERS`` threads block in ``readv`` on the fd (as libfuse's do; the kernel
hands each request to one of them) and each answers the request it read. The adapter's
methods are coroutines written for pyfuse3's single trio thread; here they run to the
end in the reading thread (``_run``) while it holds ``_Session.lock``, which stands in
for that single thread: the adapter's table is touched by one request at a time. Its
only suspension points, ``lowlevel._thread`` and ``_call`` (the overlay calls that may
take long), become ``unlocked``: the call runs in the same thread with the lock
released, as trio would run other requests meanwhile. READ and WRITE touch no table:
they run without the lock, in parallel. A READ's reply is written from the pieces the
overlay hands over (``read_into``: views into the store's map, no copy in between).
Measured against trio tasks reading the fd (non-blocking reads, a trio lock for the one
task that may wait): a GETXATTR round trip took 60 us there (17% of the daemon's samples
in the trio lock), ~50 here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import logging
import mmap
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import trio

from . import clear_setid, killed_mode, may_keep_setid, uring

log = logging.getLogger("layerstore.fuse.wire")
#: times ``_Session._warm_up`` runs each request (CPython specializes after a few runs)
WARM_UP_ROUNDS = 12

ROOT_INODE = 1
#: protocol version spoken (the kernel's, if older)
MAJOR, MINOR = 7, 33
#: largest WRITE/READ (max_pages of 4 KiB)
MAX_WRITE = 1 << 20
#: FUSE passthrough for plain upper files (``_Passthrough``; ``LAYERSTORE_FUSE_PASSTHROUGH=0``
#: turns it off)
PASSTHROUGH_WANTED = os.environ.get("LAYERSTORE_FUSE_PASSTHROUGH", "1") != "0"
#: seconds an open for writing waits for the RELEASEs of a passed-through lower copy's
#: last readers (``_Passthrough.writer``)
WRITER_WAIT = 0.2
#: tasks reading requests
WORKERS = 16
#: listings kept between READDIRPLUS requests (``_Lister``): at most this many, with at
#: most this many entries in all (each entry holds its name and attributes, ~0.5 KiB)
KEEP_LISTINGS = 256
KEEP_ENTRIES = 100_000

# --- opcodes ------------------------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = range(8, 18)
RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 18, 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT = 27, 28, 29, 30, 34, 35, 36
DESTROY, BATCH_FORGET, READDIRPLUS, RENAME2 = 38, 42, 44, 45

# --- INIT flags (flags | flags2 << 32) ------------------------------------------------------
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30  #: the reply's flags2 counts
PASSTHROUGH = 1 << 37

# --- setattr valid bits, open flags ---------------------------------------------------------
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 64, 128, 256
FATTR_CTIME, FATTR_KILL_SUIDGID = 1024, 2048
FUSE_OPEN_KILL_SUIDGID = 1
FUSE_WRITE_KILL_SUIDGID = 4
FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_NONSEEKABLE = 1, 2, 4
FOPEN_PASSTHROUGH = 1 << 7
#: ioctls on /dev/fuse: _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
DEV_IOC_BACKING_OPEN, DEV_IOC_BACKING_CLOSE = 0x4010E501, 0x4004E502
BACKING_MAP = struct.Struct("<iIQ")       # fd flags padding
#: stack depth of the mount for passthrough: backing files on a plain file system only,
#: and an overlayfs may still be stacked on the mount
PASSTHROUGH_STACK_DEPTH = 1
#: notification code of FUSE_NOTIFY_INVAL_INODE (written with unique 0)
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
FUSE_FSYNC_FDATASYNC = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")   # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")        # len error unique
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr (88); times are signed
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # fuse_entry_out (128)
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])      # fuse_attr_out (104)
OPEN_OUT = struct.Struct("<QIi")          # fh open_flags backing_id
DIRENT = struct.Struct("<QQII")           # ino off namelen type
INIT_IN = struct.Struct("<IIII")          # major minor max_readahead flags (+ flags2)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # fuse_init_out (64)
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")        # flags mode umask open_flags
MKNOD_IN = struct.Struct("<IIII")         # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")           # mode umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
READ_IN = struct.Struct("<QQIIQII")       # fh offset size flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
XATTR_IN = struct.Struct("<II")           # size, padding / flags
XATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")


class FUSEError(Exception):
    """An errno for the kernel (as ``pyfuse3.FUSEError``)."""

    def __init__(self, errno_: int):
        super().__init__(errno_)
        self.errno = errno_

    def __str__(self) -> str:
        return os.strerror(self.errno)


class EntryAttributes:
    """An entry's node id (``st_ino``), timeouts and attributes (times in ns)."""

    __slots__ = (
        "attr_timeout",
        "entry_timeout",
        "generation",
        "st_atime_ns",
        "st_blksize",
        "st_blocks",
        "st_ctime_ns",
        "st_gid",
        "st_ino",
        "st_mode",
        "st_mtime_ns",
        "st_nlink",
        "st_rdev",
        "st_size",
        "st_uid",
    )

    def __init__(self) -> None:
        # one statement, not a loop over the slots: made for every entry sent
        self.st_ino = self.generation = self.entry_timeout = self.attr_timeout = 0
        self.st_mode = self.st_nlink = self.st_uid = self.st_gid = self.st_rdev = 0
        self.st_size = self.st_blocks = 0
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = 0
        self.st_blksize = 4096

    def pack_attr(self) -> tuple[int, ...]:
        a, m, c = self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns
        return (self.st_ino, self.st_size, self.st_blocks, a // 10**9, m // 10**9, c // 10**9,
                a % 10**9, m % 10**9, c % 10**9, self.st_mode, self.st_nlink, self.st_uid,
                self.st_gid, _encode_dev(self.st_rdev), self.st_blksize, 0)

    def entry_out(self) -> bytes:
        e, a = _split_timeout(self.entry_timeout), _split_timeout(self.attr_timeout)
        return ENTRY_OUT.pack(self.st_ino, self.generation, e[0], a[0], e[1], a[1],
                              *self.pack_attr())


def _encode_dev(rdev: int) -> int:
    """A device number as the kernel's ``new_encode_dev`` (32 bits), what FUSE carries."""
    if not rdev:
        return 0
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major & 0xFFF) << 8 | (minor & ~0xFF) << 12) & 0xFFFFFFFF


def _split_timeout(t: float) -> tuple[int, int]:
    s = int(t)
    return s, int((t - s) * 1e9)


class FileInfo:
    __slots__ = ("backing", "direct_io", "fh", "keep_cache", "lower_data", "nonseekable")

    def __init__(self, fh: int = 0, direct_io: bool = False, keep_cache: bool = False,
                 nonseekable: bool = False, backing: Callable[[], int | None] | None = None,
                 lower_data: bool = False):
        self.fh, self.direct_io, self.keep_cache, self.nonseekable = (
            fh, direct_io, keep_cache, nonseekable)
        #: for passthrough (``_Passthrough``): returns an fd on the plain file that
        #: holds this handle's data (the handle's: not closed); None (or returning
        #: None): the daemon serves the I/O
        self.backing = backing
        #: the handle reads a lower file's data: ``backing`` gives a read-only copy of
        #: it, never to be shared with an open of the upper file
        self.lower_data = lower_data

    def open_out(self) -> bytes:
        flags = ((FOPEN_DIRECT_IO if self.direct_io else 0)
                 | (FOPEN_KEEP_CACHE if self.keep_cache else 0)
                 | (FOPEN_NONSEEKABLE if self.nonseekable else 0))
        return OPEN_OUT.pack(self.fh, flags, 0)


class StatvfsData:
    def __init__(self) -> None:
        self.f_bsize = self.f_frsize = 4096
        self.f_blocks = self.f_bfree = self.f_bavail = 0
        self.f_files = self.f_ffree = self.f_favail = 0
        self.f_namemax = 255


class SetattrFields:
    __slots__ = (
        "update_atime",
        "update_ctime",
        "update_gid",
        "update_mode",
        "update_mtime",
        "update_size",
        "update_uid",
    )

    def __init__(self, valid: int):
        self.update_atime = bool(valid & (FATTR_ATIME | FATTR_ATIME_NOW))
        self.update_mtime = bool(valid & (FATTR_MTIME | FATTR_MTIME_NOW))
        self.update_ctime = bool(valid & FATTR_CTIME)
        self.update_mode = bool(valid & FATTR_MODE)
        self.update_uid = bool(valid & FATTR_UID)
        self.update_gid = bool(valid & FATTR_GID)
        self.update_size = bool(valid & FATTR_SIZE)


class RequestContext:
    __slots__ = ("gid", "pid", "uid", "umask", "unique")

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0, unique: int = 0):
        self.uid, self.gid, self.pid, self.umask = uid, gid, pid, umask
        self.unique = unique  #: the request's number (a handler that replies itself)


#: a handler's result when it has sent its reply itself (``h_read``)
_SENT = object()
#: a reply is written with at most this many buffers (IOV_MAX is 1024)
MAX_PIECES = 1000


async def _enosys(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise FUSEError(errno.ENOSYS)


class Operations:
    """Defaults: every operation answers ENOSYS (the adapter overrides what it serves)."""

    enable_writeback_cache = False
    enable_acl = False
    supports_dot_lookup = True

    def init(self) -> None:
        pass

    lookup = getattr = setattr = readlink = mknod = mkdir = unlink = rmdir = _enosys
    symlink = rename = link = open = read = write = statfs = release = fsync = _enosys
    setxattr = getxattr = listxattr = removexattr = opendir = readdir = _enosys
    releasedir = access = create = forget = _enosys


class _Token:
    """The reply buffer of one READDIRPLUS (``readdir_reply`` fills it); ``lid``, the
    listing's number (``_Lister``)."""

    __slots__ = ("left", "lid", "parts")

    def __init__(self, size: int, lid: int = 0):
        self.parts: list[bytes] = []
        self.left = size
        self.lid = lid


def readdir_reply(token: _Token, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
    """Add one entry with its attributes; False (nothing added) once the reply is full."""
    namelen = len(name)
    size = ENTRY_OUT.size + DIRENT.size + ((namelen + 7) & ~7)
    if size > token.left or next_id >> INDEX_BITS:
        return False  # full (or past 2^24 entries: the listing ends there)
    token.left -= size
    token.parts.append(attr.entry_out() + DIRENT.pack(
        attr.st_ino, token.lid << INDEX_BITS | next_id, namelen,
        (attr.st_mode & 0o170000) >> 12)
        + name + b"\0" * (-namelen % 8))
    return True


# --- the session ----------------------------------------------------------------------------

#: per thread: ``no`` is true in an io_uring queue's own thread (``_no_wait``)
_waits = threading.local()
_U32 = struct.Struct("<I")


def _no_wait() -> bool:
    """Whether this thread must answer without waiting for other requests: an io_uring
    queue's own thread, through which the requests waited for would come."""
    return getattr(_waits, "no", False)


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (see the module docstring) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a FUSE operation suspended: it must use lowlevel._thread/_call")


class _Session:
    def __init__(self, ops: Any, mountpoint: str, options: set[str]):
        self.ops = ops
        #: the adapter's READ that hands pieces over (``h_read``), if it has one
        self.read_into: Callable[..., Any] | None = getattr(ops, "read_into", None)
        self.mountpoint = mountpoint
        self.fd = _fusermount(mountpoint, options)
        self.flags = 0  #: what was agreed at INIT
        self.stopped = False
        self.lister = _Lister(ops)
        self.passthrough = _Passthrough(self.fd)
        #: held while a request runs the adapter's code (see the module docstring)
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.idle = 0  #: threads waiting for a request
        self.idle_lock = threading.Lock()
        #: the connection's ``abort`` file under /sys/fs/fuse/connections, opened now:
        #: by the time it is used the number may name another mount's connection
        self.abort_fd = _abort_fd(_connection_of(mountpoint))
        #: FUSE over io_uring (``uring.py``): one queue per CPU, made at INIT
        self.queues: list[uring.Queue] = []
        #: the queue thread's request being answered: (entry, unique)
        self.current = threading.local()

    # replies
    def _send(self, unique: int, error: int, payload: bytes = b"") -> None:
        if not 0 <= error < 512:  # the kernel refuses the reply: the caller would hang
            log.error("reply to request %d: errno %d out of range, sent as EIO", unique, error)
            error, payload = errno.EIO, b""
        self._send_pieces(unique, [payload], -error)

    def _send_pieces(self, unique: int, pieces: list[bytes | memoryview], error: int = 0) -> None:
        """A reply whose payload is ``pieces``, one after the other, written as they are
        (one ``writev``; the kernel copies each)."""
        cur = getattr(self.current, "req", None)
        if cur is not None and cur[1] == unique:  # a request that came over io_uring
            cur[0].reply(unique, error, pieces)
            return
        if len(pieces) > MAX_PIECES:
            pieces = [b"".join(pieces)]
        try:
            os.writev(self.fd, [OUT_HEADER.pack(OUT_HEADER.size + sum(map(len, pieces)), error,
                                                unique), *pieces])
        except OSError as exc:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("reply to request %d failed: %s", unique, exc)
                if error == 0:  # the kernel took no reply: the caller would wait for ever
                    self._send_pieces(unique, [], -errno.EIO)

    def serve(self) -> None:
        """Answer requests until the file system is unmounted (or ``stop``)."""
        self._spawn()
        joined = 0
        while joined < len(self.threads):  # threads are added while serving
            self.threads[joined].join()
            joined += 1

    def _spawn(self) -> None:
        t = threading.Thread(target=self._worker, name=f"fuse-{len(self.threads)}",
                             daemon=True)
        self.threads.append(t)
        t.start()

    def _worker(self) -> None:
        """Read and answer requests. One thread to start with, another whenever every
        thread is busy, up to ``WORKERS`` (as libfuse does): the kernel hands a request
        to the thread that waited longest, and with many idle threads each request woke
        a different, cold one (a chmod through a fresh mount took ~0.3 ms longer)."""
        buf = bytearray(MAX_WRITE + 64 * 1024)
        view = memoryview(buf)
        while not self.stopped:
            with self.idle_lock:
                self.idle += 1
            try:
                n = os.readv(self.fd, [buf])
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # an interrupted request: gone before it was read
                if exc.errno not in (errno.ENODEV, errno.EBADF):  # ENODEV: unmounted
                    log.error("reading /dev/fuse: %s", exc)
                self.stopped = True
                return
            finally:
                with self.idle_lock:
                    self.idle -= 1
                    more = self.idle == 0 and len(self.threads) < WORKERS and not self.stopped
                    if more:
                        self._spawn()
            if n >= IN_HEADER.size:
                self._dispatch(view[:n])

    def _dispatch(self, req: memoryview) -> None:
        (_len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad) = IN_HEADER.unpack_from(req)
        body = req[IN_HEADER.size:]
        handler = _HANDLERS.get(opcode)
        if handler is None:
            if opcode not in (FORGET, BATCH_FORGET, INTERRUPT):
                self._send(unique, errno.ENOSYS)
            elif opcode != INTERRUPT:
                try:
                    with self.lock:
                        self._forget(opcode, nodeid, body)
                except Exception:  # no reply to send; the thread goes on
                    log.exception("forget failed")
            return
        ctx = RequestContext(uid, gid, pid, 0, unique)
        try:
            if opcode in _UNLOCKED:
                payload = _run(handler(self, nodeid, body, ctx))
            else:
                with self.lock:
                    payload = _run(handler(self, nodeid, body, ctx))
        except FUSEError as exc:
            self._send(unique, exc.errno)
            return
        except OSError as exc:
            self._send(unique, exc.errno if exc.errno and exc.errno > 0 else errno.EIO)
            return
        except Exception:
            log.exception("request %d (opcode %d) failed", unique, opcode)
            self._send(unique, errno.EIO)
            return
        if payload is _SENT:
            return
        if not isinstance(payload, bytes):
            payload = bytes(payload or b"")
        self._send(unique, 0, payload)
        if opcode == INIT and self.queues:
            self._start_queues()

    def inval_attrs(self, nodeid: int) -> None:
        """Tell the kernel to drop the attributes it caches for ``nodeid``
        (FUSE_NOTIFY_INVAL_INODE with a negative offset: attributes only, no page and
        no lock). Needed where the daemon changes the mode on its own and the reply
        carries no attributes: a WRITE or OPEN after which setuid was cleared."""
        body = NOTIFY_INVAL_INODE_OUT.pack(nodeid, -1, 0)
        try:
            os.writev(self.fd, [OUT_HEADER.pack(OUT_HEADER.size + len(body),
                                                NOTIFY_INVAL_INODE, 0), body])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("invalidating node %d: %s", nodeid, exc)

    def kill_setid(self, nodeid: int, fh: int,
                   may_keep: Callable[[], bool] = lambda: False) -> None:
        """Clear setuid/setgid of the open file ``fh`` for a caller the kernel says lacks
        CAP_FSETID (``clear_setid``; unless ``may_keep()``), and make the kernel forget
        the mode it has. Touches no table: needs no lock."""
        fs = getattr(self.ops, "fs", None)
        if fs is None:
            raise FUSEError(errno.EROFS)
        if clear_setid(fs, fh, may_keep):
            self.inval_attrs(nodeid)

    def _forget(self, opcode: int, nodeid: int, body: memoryview) -> None:
        """FORGET/BATCH_FORGET (no reply): straight to the adapter's table, which is
        what its ``forget`` does, without a coroutine per request (a FORGET follows
        every unlink; on libfuse's high-level API libfuse answers it in C)."""
        table = self.ops.table
        if opcode == FORGET:
            table.forget(nodeid, FORGET_IN.unpack_from(body)[0])
            forgotten = [nodeid]
        else:
            count, _ = BATCH_FORGET_IN.unpack_from(body)
            forgotten = []
            for i in range(count):
                ino, n = FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * FORGET_ONE.size)
                table.forget(ino, n)
                forgotten.append(ino)
        self.passthrough.forgotten([i for i in forgotten if i not in table.nodes])
        if self.lister.handles:
            for ino in forgotten:
                if ino not in table.nodes:
                    _run(self.lister.drop(ino))

    # --- handlers (return the reply payload) ------------------------------------------------
    async def h_init(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major != 7:
            raise FUSEError(errno.EPROTO)
        if minor >= 36 and len(body) >= INIT_IN.size + 4:
            flags |= struct.unpack_from("<I", body, INIT_IN.size)[0] << 32
        want = (ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | DO_READDIRPLUS | PARALLEL_DIROPS
                | MAX_PAGES | CACHE_SYMLINKS | NO_OPENDIR_SUPPORT | HANDLE_KILLPRIV_V2)
        if getattr(self.ops, "enable_acl", False):
            want |= POSIX_ACL
        if getattr(self.ops, "enable_writeback_cache", False):
            want |= WRITEBACK_CACHE  # LAYERSTORE_FUSE_WRITEBACK=1 (lowlevel.py)
        elif PASSTHROUGH_WANTED and os.geteuid() == 0:
            # the kernel allows it with CAP_SYS_ADMIN and without the writeback cache
            want |= INIT_EXT | PASSTHROUGH
        if flags & uring.OVER_IO_URING and uring.wanted():
            self.queues = self._make_queues()
            if self.queues:
                want |= INIT_EXT | uring.OVER_IO_URING
        self.flags = flags & want
        self.passthrough.enabled = bool(self.flags & PASSTHROUGH)
        keep = getattr(self.ops, "keep_lower_copies", None)
        if keep is not None:
            # copies of big lower files are made only while they can be passed through
            keep(self.passthrough.enabled)
            self.passthrough.lower_off = lambda: keep(False)
        self._warm_up()
        self.ops.init()
        return INIT_OUT.pack(MAJOR, min(minor, MINOR), max_readahead, self.flags & 0xFFFFFFFF,
                             16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0,
                             self.flags >> 32,
                             PASSTHROUGH_STACK_DEPTH if self.passthrough.enabled else 0)

    def _make_queues(self) -> list[uring.Queue]:
        """One io_uring queue per possible CPU (the kernel's count), made before INIT
        is answered: once the kernel is told the daemon speaks io_uring, its requests
        wait until every queue is registered, so nothing may fail after that."""
        queues: list[uring.Queue] = []
        try:
            # the kernel wants room for max_pages pages (MAX_WRITE // 4096, see h_init)
            payload = max(MAX_WRITE, MAX_WRITE // 4096 * mmap.PAGESIZE)
            for qid in range(uring.possible_cpus()):
                queues.append(uring.Queue(qid, payload))
        except (OSError, ValueError) as exc:
            log.info("FUSE over io_uring not used: %s", exc)
            for q in queues:
                q.close()
            return []
        return queues

    def _start_queues(self) -> None:
        for q in self.queues:
            t = threading.Thread(target=self._serve_queue, args=(q,),
                                 name=f"fuse-uring-{q.qid}", daemon=True)
            try:
                t.start()
            except RuntimeError:  # no more threads (a pids limit)
                self._queue_failed(q.qid)
                return
            self.threads.append(t)

    def _queue_failed(self, qid: int) -> None:
        """An io_uring queue cannot serve: the kernel would hold its CPU's requests (or,
        before all queues registered, every request) for ever. End the connection, as a
        crashed daemon would (ENOTCONN), rather than hang its callers: through fusectl,
        or, where that is not mounted, by ending the daemon."""
        log.error("io_uring queue %d stopped: aborting the mount", qid)
        self.stopped = True
        if self.abort_fd >= 0:
            _abort(self.abort_fd)
        else:
            logging.shutdown()
            os._exit(1)

    def _serve_queue(self, q: uring.Queue) -> None:
        _waits.no = True  # this thread serves the queue: what it answers must not wait

        def dispatch(entry: uring._Entry, req: bytes, unique: int) -> None:
            self.current.req = (entry, unique)
            try:
                self._dispatch(memoryview(req))
            finally:
                self.current.req = None

        try:
            try:
                ended = q.serve(self.fd, dispatch, lambda: self.stopped, self._may_wait)
            except Exception:
                log.exception("io_uring queue %d failed", q.qid)
                ended = False
            if not ended and not self.stopped:
                self._queue_failed(q.qid)
        finally:
            q.close()

    def _may_wait(self, opcode: int, req: bytes) -> bool:
        """Whether a request (as ``_dispatch`` takes it) may wait for other requests
        (``_Passthrough.writer``, ``writer_first``): an OPEN that may write or a
        truncate of a node open in passthrough on a copy of its lower data, or a
        read-only OPEN of a node a writer waits for. An io_uring queue has such a
        request answered by a helper thread, since the RELEASEs it waits for come
        through the same queue; one the queue's thread answers itself does not wait.
        (Read without the lock: at worst such a request is refused or let in at once.)"""
        if opcode == OPEN:
            flags = _U32.unpack_from(req, IN_HEADER.size)[0]
            writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        elif opcode == SETATTR:
            writing = bool(_U32.unpack_from(req, IN_HEADER.size)[0] & FATTR_SIZE)
            if not writing:
                return False
        else:
            return False
        nodeid = IN_HEADER.unpack_from(req)[3]
        p = self.passthrough
        if not writing:
            return bool(p.waiting.get(nodeid))
        node = p.nodes.get(nodeid)
        return bool(node is not None and node[2])

    def _warm_up(self) -> None:
        """Before the mount goes live (INIT is answered after this): run the requests a
        first use of a container makes (LOOKUP, GETATTR, GETXATTR of a name below the
        root) through the handlers a few times, replies dropped, each lookup forgotten
        again. A fresh daemon answered its first ten requests or so 50-90 us slower
        each than later ones (an lstat of 50 new names in a row through a fresh mount:
        721, 144, 114 ... 60, 55 us): the interpreter specializes code as it runs it.
        Best effort: anything that fails here fails again, and is answered, when used."""
        names = getattr(self.ops, "warm_names", None)
        if names is None:
            return
        ctx = RequestContext(0, 0, os.getpid())
        cap = memoryview(XATTR_IN.pack(0, 0) + b"security.capability\0")
        forget_one = memoryview(FORGET_IN.pack(1))
        try:
            found = names()
            for _ in range(WARM_UP_ROUNDS):
                _run(self.h_getattr(ROOT_INODE, memoryview(b""), ctx))
                for name in found:
                    entry = _run(self.h_lookup(ROOT_INODE, memoryview(name + b"\0"), ctx))
                    nodeid = ENTRY_OUT.unpack_from(entry)[0]
                    try:
                        _run(self.h_getattr(nodeid, memoryview(b""), ctx))
                        with contextlib.suppress(FUSEError, OSError):
                            _run(self.h_getxattr(nodeid, cap, ctx))
                    finally:
                        self._forget(FORGET, nodeid, forget_one)
        except Exception:  # a warm-up only (see above); logged with its traceback
            log.debug("warm-up failed", exc_info=True)

    async def h_destroy(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        self.stopped = True
        return b""

    async def h_lookup(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        e = await self.ops.lookup(nodeid, _name(body), ctx)
        return e.entry_out()  # type: ignore[no-any-return]

    async def h_getattr(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        e = await self.ops.getattr(nodeid, ctx)
        return _attr_out(e)

    async def h_setattr(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        (valid, _p, fh, size, _lock, atime, mtime, _ctime, atimens, mtimens, _ctimens,
         mode, _u4, uid, gid, _u5) = SETATTR_IN.unpack_from(body)
        attr = EntryAttributes()
        now = time.time_ns()
        attr.st_mode, attr.st_uid, attr.st_gid, attr.st_size = mode, uid, gid, size
        attr.st_atime_ns = now if valid & FATTR_ATIME_NOW else atime * 10**9 + atimens
        attr.st_mtime_ns = now if valid & FATTR_MTIME_NOW else mtime * 10**9 + mtimens
        fields = SetattrFields(valid)
        if valid == 0:
            # nothing to set: the kernel's ``file_remove_privs`` before a passthrough
            # write (``_Passthrough``), which never comes here as a WRITE
            await self._write_kills_setid(nodeid, ctx)
            return _attr_out(await self.ops.getattr(nodeid, ctx))
        if valid & FATTR_KILL_SUIDGID and not fields.update_mode:
            # a truncate or chown by a caller without CAP_FSETID: through the open file
            # if there is one (it may have no name), else with the other changes
            if valid & FATTR_FH:
                self.kill_setid(nodeid, fh)
            else:
                cur = (await self.ops.getattr(nodeid, ctx)).st_mode
                cleared = killed_mode(cur)
                if cleared != cur:
                    fields.update_mode, attr.st_mode = True, cleared
        with (self.passthrough.writer(nodeid) if valid & FATTR_SIZE
              else contextlib.nullcontext()):
            e = await self.ops.setattr(nodeid, attr, fields, fh if valid & FATTR_FH else None,
                                       ctx)
        return _attr_out(e)

    async def _write_kills_setid(self, nodeid: int, ctx: Any) -> None:
        """Before a passthrough write: clear setuid/setgid as a WRITE with
        ``FUSE_WRITE_KILL_SUIDGID`` does, if the caller lacks CAP_FSETID (an empty SETATTR
        also comes for a file with ``security.capability`` written by anyone). Through an
        open handle of the node: the writer has one, and the file may have no name."""
        node = self.ops.table.nodes.get(nodeid)
        for fh in list(node.fhs) if node is not None else ():
            try:
                self.kill_setid(nodeid, fh, lambda: may_keep_setid(ctx.pid, ctx.uid))
            except OSError:
                continue  # a handle without an upper fd (a lower file): another one
            return

    async def h_readlink(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        return await self.ops.readlink(nodeid, ctx)  # type: ignore[no-any-return]

    async def h_symlink(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        name, target = _names(body, 2)
        return (await self.ops.symlink(nodeid, name, target, ctx)).entry_out()  # type: ignore[no-any-return]

    async def h_mknod(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        mode, rdev, umask, _ = MKNOD_IN.unpack_from(body)
        ctx.umask = umask
        name = _name(body[MKNOD_IN.size:])
        return (await self.ops.mknod(nodeid, name, mode, rdev, ctx)).entry_out()  # type: ignore[no-any-return]

    async def h_mkdir(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        mode, umask = MKDIR_IN.unpack_from(body)
        ctx.umask = umask
        name = _name(body[MKDIR_IN.size:])
        return (await self.ops.mkdir(nodeid, name, mode, ctx)).entry_out()  # type: ignore[no-any-return]

    async def h_unlink(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        await self.ops.unlink(nodeid, _name(body), ctx)
        return b""

    async def h_rmdir(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        await self.ops.rmdir(nodeid, _name(body), ctx)
        return b""

    async def h_rename(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        (newdir,) = RENAME_IN.unpack_from(body)
        old, new = _names(body[RENAME_IN.size:], 2)
        await self.ops.rename(nodeid, old, newdir, new, 0, ctx)
        return b""

    async def h_rename2(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        newdir, flags, _ = RENAME2_IN.unpack_from(body)
        old, new = _names(body[RENAME2_IN.size:], 2)
        await self.ops.rename(nodeid, old, newdir, new, flags, ctx)
        return b""

    async def h_link(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        (old,) = LINK_IN.unpack_from(body)
        name = _name(body[LINK_IN.size:])
        return (await self.ops.link(old, nodeid, name, ctx)).entry_out()  # type: ignore[no-any-return]

    async def h_open(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        flags, open_flags = OPEN_IN.unpack_from(body)
        if (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & os.O_TRUNC:
            if self.passthrough.waiting:
                self.passthrough.writer_first(nodeid)
            return await self._open(nodeid, flags, open_flags, ctx)
        with self.passthrough.writer(nodeid):
            return await self._open(nodeid, flags, open_flags, ctx)

    async def _open(self, nodeid: int, flags: int, open_flags: int, ctx: Any) -> bytes:
        fi = await self.ops.open(nodeid, flags, ctx)
        if open_flags & FUSE_OPEN_KILL_SUIDGID and flags & os.O_TRUNC:
            # truncated by a caller without CAP_FSETID (the kernel leaves it to us)
            try:
                self.kill_setid(nodeid, fi.fh)
            except BaseException:
                await self.ops.release(fi.fh)
                raise
        return await self._open_out(nodeid, fi)

    async def _open_out(self, nodeid: int, fi: FileInfo,
                        entry: EntryAttributes | None = None) -> bytes:
        """The reply to an OPEN (or a CREATE: ``entry`` first); the handle is released
        if it cannot be made."""
        try:
            head = entry.entry_out() if entry is not None else b""
            return head + self.passthrough.open_out(nodeid, fi)
        except BaseException:
            await self.ops.release(fi.fh)
            raise

    async def h_create(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        flags, mode, umask, _open_flags = CREATE_IN.unpack_from(body)
        ctx.umask = umask
        name = _name(body[CREATE_IN.size:])
        fi, e = await self.ops.create(nodeid, name, mode, flags, ctx)
        return await self._open_out(e.st_ino, fi, e)

    async def h_read(self, nodeid: int, body: memoryview, ctx: Any) -> Any:
        fh, offset, size, *_ = READ_IN.unpack_from(body)
        into = self.read_into
        if into is None:
            return await self.ops.read(fh, offset, size)
        sent = False

        def send(pieces: list[bytes | memoryview]) -> None:
            nonlocal sent
            if not sent:
                sent = True
                self._send_pieces(ctx.unique, pieces)

        await into(fh, offset, size, send)
        if not sent:  # (a bug: the reader would wait for ever)
            raise FUSEError(errno.EIO)
        return _SENT

    async def h_write(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        fh, offset, size, write_flags, *_ = WRITE_IN.unpack_from(body)
        if write_flags & FUSE_WRITE_KILL_SUIDGID:
            # a caller without CAP_FSETID: the kernel leaves setuid/setgid to us (one
            # fstat per such write; a change only when there is one to make)
            self.kill_setid(nodeid, fh)
        data = bytes(body[WRITE_IN.size:WRITE_IN.size + size])
        n = await self.ops.write(fh, offset, data)
        return WRITE_OUT.pack(n, 0)

    async def h_statfs(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        s = await self.ops.statfs(ctx)
        return STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                               s.f_bsize, s.f_namemax, s.f_frsize, 0)

    async def h_release(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        (fh, *_rest) = RELEASE_IN.unpack_from(body)
        try:
            await self.ops.release(fh)
        finally:
            self.passthrough.released(fh)
        return b""

    async def h_fsync(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        fh, flags, _ = FSYNC_IN.unpack_from(body)
        await self.ops.fsync(fh, bool(flags & FUSE_FSYNC_FDATASYNC))
        return b""

    async def h_setxattr(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        size, flags = XATTR_IN.unpack_from(body)
        rest = body[XATTR_IN.size:]
        end = bytes(rest).index(b"\0")
        name, value = bytes(rest[:end]), bytes(rest[end + 1:end + 1 + size])
        await self.ops.setxattr(nodeid, name, value, ctx, flags)
        return b""

    async def h_getxattr(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        size, _ = XATTR_IN.unpack_from(body)
        value = await self.ops.getxattr(nodeid, _name(body[XATTR_IN.size:]), ctx)
        return _sized(value, size)

    async def h_listxattr(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        size, _ = XATTR_IN.unpack_from(body)
        names = await self.ops.listxattr(nodeid, ctx)
        return _sized(b"".join(n + b"\0" for n in names), size)

    async def h_removexattr(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        await self.ops.removexattr(nodeid, _name(body), ctx)
        return b""

    async def h_opendir(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        # the kernel then opens directories itself, keeping their listings (module doc)
        if self.flags & NO_OPENDIR_SUPPORT:
            raise FUSEError(errno.ENOSYS)
        self.ops.table.path(nodeid)  # ENOENT if gone
        return OPEN_OUT.pack(0, 0, 0)

    async def h_releasedir(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        return b""

    async def h_readdirplus(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        _fh, offset, size, *_ = READ_IN.unpack_from(body)
        return b"".join(await self.lister.read(nodeid, offset, size, ctx))

    async def h_fsyncdir(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        return b""

    async def h_access(self, nodeid: int, body: memoryview, ctx: Any) -> bytes:
        mask, _ = ACCESS_IN.unpack_from(body)
        await self.ops.access(nodeid, mask, ctx)
        return b""


#: directory offsets: the listing's number above this many bits, the entry's index
#: below; both kept under 2^31, as 32-bit programs need (their ``d_off`` is 32 bits)
INDEX_BITS = 24
LISTING_IDS = 127


class _Lister:
    """Listings for READDIRPLUS without OPENDIR. A reader that starts at offset 0 gets
    a listing of its own, whose number rides in the offsets it is handed (``INDEX_BITS``;
    the kernel passes them back as they are), so two readers of one directory never
    continue in each other's listing. A listing is kept after its end was sent: the
    kernel keeps the offsets in its own copy of the listing and hands them to every
    reader it serves from it, and when a change drops that copy, a reader in the middle
    of it comes back here with one of them. Such a reader goes on in a new listing,
    after the name it had reached (``lowlevel._Base.readdir`` bisects for it), and the
    old one is left as it was for the others. Listings are dropped when their
    directory is forgotten and, oldest first, beyond ``KEEP_LISTINGS`` listings or
    ``KEEP_ENTRIES`` entries in all, never the one being read (a reader that comes back
    for a dropped one gets a fresh one, read from the same position)."""

    def __init__(self, ops: Any):
        self.ops = ops
        self.handles: OrderedDict[tuple[int, int], int] = OrderedDict()  #: -> dir handle
        self._next_id = 0
        self._calls = 0

    def _new_id(self, nodeid: int) -> int:
        for _ in range(LISTING_IDS):
            self._next_id = self._next_id % LISTING_IDS + 1
            if (nodeid, self._next_id) not in self.handles:
                break
        return self._next_id

    async def read(self, nodeid: int, offset: int, size: int, ctx: Any) -> list[bytes]:
        lid, index = offset >> INDEX_BITS, offset & ((1 << INDEX_BITS) - 1)
        if lid == 0 or lid > LISTING_IDS:
            lid, index = self._new_id(nodeid), 0 if lid == 0 else index
        key = (nodeid, lid)
        dh = self.handles.get(key)
        if dh is None:
            dh = await self.ops.opendir(nodeid, ctx)
            self.handles[key] = dh
        elif index > 0 and self.ops.listing_stale(dh):
            # the directory changed since this listing was made: go on in a new one,
            # from the same place (the adapter bisects by the last name reached)
            lid = self._new_id(nodeid)
            key = (nodeid, lid)
            dh = self.ops.listing_fork(dh)
            self.handles[key] = dh
        else:
            self.handles.move_to_end(key)
        token = _Token(size, lid)
        try:
            await self.ops.readdir(dh, index, token)
        finally:
            await self._trim()
        return token.parts

    async def _trim(self) -> None:
        self._calls += 1
        if len(self.handles) <= KEEP_LISTINGS and self._calls % 16:
            return  # the entries are counted every 16th request only
        size = self.ops.listing_size
        total = sum(size(dh) for dh in self.handles.values())
        # the newest (the one just read) stays, whatever its size
        while len(self.handles) > 1 and (len(self.handles) > KEEP_LISTINGS
                                         or total > KEEP_ENTRIES):
            _, old = self.handles.popitem(last=False)
            total -= size(old)
            await self.ops.releasedir(old)

    async def drop(self, nodeid: int) -> None:
        for key in [k for k in self.handles if k[0] == nodeid]:
            await self.ops.releasedir(self.handles.pop(key))


class _Passthrough:
    """FUSE passthrough (kernel 6.9+, ``FUSE_PASSTHROUGH``): an open file whose data is a
    plain upper file is handed to the kernel, which then reads, writes and maps that
    file itself; no READ or WRITE comes here for it. The daemon registers the file with
    ``FUSE_DEV_IOC_BACKING_OPEN`` and names it in the OPEN/CREATE reply
    (``FOPEN_PASSTHROUGH``, ``backing_id``). Files of the lowers, metacopy files and
    files still being copied up lazily stay with the daemon.

    The kernel's rules (``fs/fuse/iomode.c``), which a reply must never break (the
    user's ``open`` would fail with EIO):

    - all open files of one inode share one registered backing file while any of them
      is open in passthrough (the kernel compares registrations, not files): so one
      registration per node, from the fd of the handle that made it. The kernel opens
      that file anew for each open, with the open's own flags and the daemon's
      credentials, so a read-only open cannot write through it;
    - an inode open in cached mode (through the page cache) cannot be opened in
      passthrough, nor the other way round: a node with cached-mode opens gets cached
      ones until they are released. The kernel drops an open's mode before it sends
      RELEASE, so what is counted here is never less than what the kernel holds.

    A node that was open in passthrough and is later opened in cached mode (only when
    passthrough could not be set up) gets no ``keep_cache`` for that open: pages the
    kernel cached before were not updated by the writes made meanwhile. Its node ids
    are forgotten here when the kernel forgets the inode (its page cache goes with it).
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.enabled = False  #: the kernel agreed at INIT
        self.lock = threading.Lock()
        #: node id -> [backing id, passthrough opens, the file is a copy of lower data]
        self.nodes: dict[int, list[Any]] = {}
        self.cached: dict[int, int] = {}       #: node id -> cached-mode opens
        self.fhs: dict[int, tuple[int, bool]] = {}  #: handle -> (node id, passthrough)
        self.was: set[int] = set()             #: node ids opened in passthrough before
        self.writers: dict[int, int] = {}      #: node id -> opens that may write, being made
        self.waiting: dict[int, int] = {}      #: node id -> such opens waiting for readers
        #: copies of lower data may be passed through (the kernel refused none yet: a
        #: lower directory on a stacked file system, say, which an upper need not be)
        self.lower_enabled = True
        #: called with False when passthrough of lower data stops for good
        self.lower_off: Callable[[], None] | None = None

    def open_out(self, nodeid: int, fi: FileInfo) -> bytes:
        """The OPEN/CREATE reply for handle ``fi`` of ``nodeid``, in passthrough when
        the rules allow it and the adapter offers a backing file (a copy of lower data
        only while no open that may write is being made: ``writer``)."""
        if not self.enabled and not self.nodes:
            return fi.open_out()
        with self.lock:
            node = self.nodes.get(nodeid)
            if (node is None and self.enabled and fi.backing is not None
                    and not self.cached.get(nodeid)
                    and not (fi.lower_data and (self.writers.get(nodeid)
                                                or not self.lower_enabled))):
                backing_id = self._register(fi.backing, fi.lower_data)
                if backing_id > 0:
                    node = self.nodes[nodeid] = [backing_id, 0, fi.lower_data]
            if node is not None:
                node[1] += 1
                self.fhs[fi.fh] = (nodeid, True)
                self.was.add(nodeid)
                return OPEN_OUT.pack(fi.fh, FOPEN_PASSTHROUGH, node[0])
            self.cached[nodeid] = self.cached.get(nodeid, 0) + 1
            self.fhs[fi.fh] = (nodeid, False)
            if nodeid in self.was:
                fi.keep_cache = False
            return fi.open_out()

    def _register(self, backing: Callable[[], int | None], lower_data: bool = False) -> int:
        """A backing id for the file ``backing`` gives, or 0 (cached mode, then);
        ``lower_data``: that file is a copy of lower data."""
        try:
            fd = backing()
        except OSError as exc:
            log.debug("no backing file: %s", exc)
            return 0
        if fd is None:
            return 0
        try:
            # a mutable buffer: ioctl's return value (the id) comes back
            return int(fcntl.ioctl(self.fd, DEV_IOC_BACKING_OPEN,
                                   bytearray(BACKING_MAP.pack(fd, 0, 0))))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ELOOP) and lower_data:
                # a copy or a lower directory on a stacked file system: lower files stay
                # with the daemon (upper ones may still be passed through)
                log.warning("FUSE passthrough of lower files refused (%s): the daemon "
                            "serves their reads", exc)
                self.lower_enabled = False
                if self.lower_off is not None:
                    self.lower_off()
            elif exc.errno in (errno.EPERM, errno.ELOOP):
                # not allowed here (CAP_SYS_ADMIN), or the upper is on a stacked file
                # system (overlayfs): so for every file, stop asking
                log.warning("FUSE passthrough refused (%s): the daemon serves all I/O", exc)
                self.enabled = False
                if self.lower_off is not None:
                    self.lower_off()
            else:
                log.debug("backing file refused: %s", exc)
            return 0

    @contextlib.contextmanager
    def writer(self, nodeid: int) -> Iterator[None]:
        """Around an open that may write, or a truncate, of ``nodeid`` (before the
        overlay copies the file up): refused with ETXTBSY ("text file busy", as for a
        running executable) while the node is open in passthrough on a read-only copy of
        its lower data (the kernel would hand that same copy to this open, and it
        cannot be swapped for the upper file); meanwhile no such passthrough begins.

        The kernel sends a RELEASE after ``close`` has returned, so the readers may be
        gone already while their RELEASEs are still on their way: the open waits for
        them up to ``WRITER_WAIT`` seconds, without the session's lock (other threads
        serve them meanwhile), before it is refused."""
        deadline = None
        try:
            while True:
                with self.lock:
                    node = self.nodes.get(nodeid)
                    if node is None or not node[2]:
                        self.writers[nodeid] = self.writers.get(nodeid, 0) + 1
                        break
                    if deadline is None:  # new readers wait meanwhile (``writer_first``)
                        self.waiting[nodeid] = self.waiting.get(nodeid, 0) + 1
                now = time.monotonic()
                if deadline is None:
                    # (an io_uring queue's own thread must not wait: the RELEASEs come
                    # through it; ``_Session._may_wait`` sent it to a helper if it could)
                    deadline = now + (0.0 if _no_wait() else WRITER_WAIT)
                if now >= deadline:
                    raise FUSEError(errno.ETXTBSY)
                unlocked(time.sleep, 0.001)
        finally:
            if deadline is not None:
                with self.lock:
                    n = self.waiting.pop(nodeid) - 1
                    if n:
                        self.waiting[nodeid] = n
        try:
            yield
        finally:
            with self.lock:
                n = self.writers.pop(nodeid) - 1
                if n:
                    self.writers[nodeid] = n

    def writer_first(self, nodeid: int) -> None:
        """Before a read-only open of ``nodeid``: while an open for writing waits for the
        node's readers of a lower copy to go (``writer``), a new reader waits too (up to
        ``WRITER_WAIT``, without the session's lock), so that readers that keep coming
        do not shut the writer out."""
        if _no_wait():
            return
        deadline = time.monotonic() + WRITER_WAIT
        while nodeid in self.waiting and time.monotonic() < deadline:
            unlocked(time.sleep, 0.001)

    def released(self, fh: int) -> None:
        with self.lock:
            got = self.fhs.pop(fh, None)
            if got is None:
                return
            nodeid, passthrough = got
            if not passthrough:
                n = self.cached.get(nodeid, 0) - 1
                if n > 0:
                    self.cached[nodeid] = n
                else:
                    self.cached.pop(nodeid, None)
                return
            node = self.nodes[nodeid]
            node[1] -= 1
            if node[1] > 0:
                return
            del self.nodes[nodeid]
            try:
                fcntl.ioctl(self.fd, DEV_IOC_BACKING_CLOSE, struct.pack("<I", node[0]))
            except OSError as exc:
                if exc.errno not in (errno.ENODEV, errno.ENOTCONN):
                    log.error("closing backing file %d: %s", node[0], exc)

    def forgotten(self, nodeids: list[int]) -> None:
        if self.was:
            with self.lock:
                self.was.difference_update(nodeids)


def _attr_out(e: EntryAttributes) -> bytes:
    t = _split_timeout(e.attr_timeout)
    return ATTR_OUT.pack(t[0], t[1], 0, *e.pack_attr())


def _name(body: memoryview) -> bytes:
    b = bytes(body)
    end = b.find(b"\0")
    return b if end < 0 else b[:end]


def _names(body: memoryview, n: int) -> list[bytes]:
    return bytes(body).split(b"\0")[:n]


def _sized(value: bytes, size: int) -> bytes:
    """A getxattr/listxattr reply: the size alone when asked for 0 bytes, else the
    value (ERANGE if it does not fit)."""
    if size == 0:
        return XATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FUSEError(errno.ERANGE)
    return value


#: requests that touch no table of the adapter: answered without ``_Session.lock``
_UNLOCKED = frozenset((READ, WRITE))

_HANDLERS = {
    INIT: _Session.h_init, DESTROY: _Session.h_destroy, LOOKUP: _Session.h_lookup,
    GETATTR: _Session.h_getattr, SETATTR: _Session.h_setattr, READLINK: _Session.h_readlink,
    SYMLINK: _Session.h_symlink, MKNOD: _Session.h_mknod, MKDIR: _Session.h_mkdir,
    UNLINK: _Session.h_unlink, RMDIR: _Session.h_rmdir, RENAME: _Session.h_rename,
    RENAME2: _Session.h_rename2, LINK: _Session.h_link, OPEN: _Session.h_open,
    CREATE: _Session.h_create, READ: _Session.h_read, WRITE: _Session.h_write,
    STATFS: _Session.h_statfs, RELEASE: _Session.h_release, FSYNC: _Session.h_fsync,
    SETXATTR: _Session.h_setxattr, GETXATTR: _Session.h_getxattr,
    LISTXATTR: _Session.h_listxattr, REMOVEXATTR: _Session.h_removexattr,
    OPENDIR: _Session.h_opendir, RELEASEDIR: _Session.h_releasedir,
    READDIRPLUS: _Session.h_readdirplus,  # READDIR: never sent (DO_READDIRPLUS, no AUTO)
    FSYNCDIR: _Session.h_fsyncdir, ACCESS: _Session.h_access,
}


# --- mounting --------------------------------------------------------------------------------

#: options fusermount3 takes (others are the adapter's business, or refused by it)
_MOUNT_OPTIONS = ("allow_other", "allow_root", "default_permissions", "ro", "rw", "fsname",
                  "subtype", "max_read", "nosuid", "nodev", "noexec", "suid", "dev", "exec",
                  "noatime", "nodiratime", "sync", "async", "dirsync")


def _fusermount(mountpoint: str, options: set[str]) -> int:
    """Mount with ``fusermount3`` and return the ``/dev/fuse`` fd it passes back."""
    opts = sorted(o for o in options if o.split("=", 1)[0] in _MOUNT_OPTIONS)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        argv = ["fusermount3", *(["-o", ",".join(opts)] if opts else []), "--", mountpoint]
        proc = subprocess.Popen(argv, env=env, pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        finally:
            err = proc.communicate()[1]
        if proc.returncode != 0 or not fds:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"fusermount3 failed: {err.decode(errors='replace').strip()}")
        os.set_inheritable(fds[0], False)  # never into a child (fusermount3 -u, say)
        return fds[0]
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo field: spaces, tabs, newlines and backslashes are octal
    escapes there."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _connection_of(mountpoint: str) -> str | None:
    """The FUSE connection of the mount at ``mountpoint``: its device minor in
    /proc/self/mountinfo, which names it under /sys/fs/fuse/connections (no request to
    the file system itself)."""
    # never a stat of the mountpoint itself: that request would come to this daemon,
    # which does not answer yet (its parent's real path, then the name)
    absolute = os.path.abspath(mountpoint)
    target = os.path.join(os.path.realpath(os.path.dirname(absolute)),
                          os.path.basename(absolute))
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            found = None
            for line in f:
                fields, _, fstype = line.partition(" - ")
                parts = fields.split()
                if len(parts) > 4 and fstype.startswith("fuse") \
                        and _unescape(parts[4]) == target:
                    found = parts[2].split(":")[1]  # the last mount there wins
            return found
    except (OSError, IndexError):
        return None


def _abort_fd(conn: str | None) -> int:
    """An fd of the connection's ``abort`` file (fusectl), or -1 (not mounted there,
    say in a container: then a lazily unmounted mount that is still in use keeps the
    daemon until it is left)."""
    if conn is None:
        return -1
    try:
        return os.open(f"/sys/fs/fuse/connections/{conn}/abort", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.info("cannot open the connection's abort file: %s", exc)
        return -1


def _abort(fd: int) -> None:
    """Abort the FUSE connection (fusectl): every waiting and later request fails, and
    the threads reading /dev/fuse get ENODEV. After a lazy unmount of a mount still in
    use (a shell's cwd) the connection would live on, and the daemon with it. Through
    the fd opened at mount time: once the connection is gone the write fails, harmlessly."""
    if fd < 0:
        return
    try:
        os.write(fd, b"1")
    except OSError:
        pass


# --- pyfuse3's module functions ---------------------------------------------------------------

_session: _Session | None = None


def unlocked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` without the session's lock (``lowlevel._thread`` and
    ``_call`` on this transport: the overlay call may take long, other requests go on
    meanwhile). Called only by a request that holds the lock."""
    s = _session
    if s is None:
        return fn(*args, **kwargs)
    s.lock.release()
    try:
        return fn(*args, **kwargs)
    finally:
        s.lock.acquire()


def init(ops: Any, mountpoint: str, options: set[str]) -> None:
    global _session
    try:
        _session = _Session(ops, mountpoint, set(options))
    except (OSError, RuntimeError) as exc:
        raise RuntimeError(str(exc)) from None


async def main() -> None:
    """Serve until unmounted; the requests are answered in threads (module docstring),
    this only waits for them (so that ``lowlevel.serve`` keeps its signal handling)."""
    s = _session
    assert s is not None
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters:
        await trio.to_thread.run_sync(s.serve, abandon_on_cancel=True)
    else:  # trio < 0.23 calls it ``cancellable``
        await trio.to_thread.run_sync(s.serve, cancellable=True)


def terminate() -> None:
    """Stop serving: unmount lazily and abort the connection (the threads then read
    ENODEV and end, also when something still uses the mount)."""
    s = _session
    if s is not None:
        s.stopped = True
        subprocess.run(["fusermount3", "-u", "-z", "--", s.mountpoint],
                       stdin=subprocess.DEVNULL, capture_output=True, check=False)
        _abort(s.abort_fd)


def close(unmount: bool = True) -> None:
    global _session
    s, _session = _session, None
    if s is None:
        return
    if unmount:
        subprocess.run(["fusermount3", "-u", "-z", "--", s.mountpoint],
                       stdin=subprocess.DEVNULL, capture_output=True, check=False)
    for t in s.threads:
        t.join(timeout=5)
    for fd in (s.fd, s.abort_fd):
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["ROOT_INODE", "EntryAttributes", "FUSEError", "FileInfo", "Operations",
           "RequestContext", "SetattrFields", "StatvfsData", "close", "init", "main",
           "readdir_reply", "terminate", "unlocked"]
