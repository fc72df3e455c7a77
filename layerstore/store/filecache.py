"""Whole copies of big lower files, kept beside the store for FUSE passthrough.

A FUSE mount reads a lower file's data from its chunks in LMDB, so every read of it
goes through the daemon and the FUSE page cache (4 KiB folios on kernel 6.18: a warm
read ran at ~0.3x kernel overlayfs). With a plain file holding the same bytes the
daemon can hand the open file to the kernel (``FUSE_PASSTHROUGH``), which then reads
that file itself, at the speed of the file system under the store, cold and warm.

Layout, under the store root::

    cache/files/<first 2 hex of the digest>/<blake3 hex of the content>

- A cache file is made only from the store's own chunks, and linked under its name only
  after its content was hashed again and matched the name, and after ``fdatasync``:
  the bytes are written to an unnamed ``O_TMPFILE`` first, so a killed or crashed
  filler leaves nothing behind, and a name never holds a partial file.
- Files are mode 0444. A passthrough open is re-opened by the kernel with the caller's
  flags and the daemon's credentials, so the adapter never passes a cache file through
  to an open that may write (``wire._Passthrough``: an open that copies the file up
  while readers hold the cache file is refused, ETXTBSY).
- Only files of at least ``FILL_FROM`` bytes are cached; the total is kept under a
  budget (``LAYERSTORE_FILE_CACHE``: a size such as ``8G``, or ``0`` to turn the cache
  off; default ``DEFAULT_BUDGET``), the least recently opened files leaving first.
- It is a cache: removing any of it loses nothing (``layerstore gc --drop-file-cache``
  empties it; ``gc`` removes files whose content no layer has any more; ``check``
  re-hashes every cache file).

Threading: ``FileCache`` is shared by a daemon's threads; one filler thread makes the
files, in the order they were asked for.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..digest import blake3_hasher

log = logging.getLogger(__name__)

#: Files smaller than this are not cached: the FUSE page cache serves them well, and a
#: root filesystem has tens of thousands of them.
FILL_FROM = 1 << 20

#: The default budget of a store's file cache.
DEFAULT_BUDGET = 4 << 30

#: The environment variable that sets the budget (``0`` or ``off``: no cache).
ENV = "LAYERSTORE_FILE_CACHE"

#: An open cache file's access time is moved forward (for the budget's order) when it
#: is older than this.
TOUCH_AFTER_NS = 60 * 10**9

#: the filler thread's nice value
FILLER_NICE = 10

_NAME = re.compile(r"^[0-9a-f]{64}$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_budget(text: str) -> int:
    """``8G``, ``512M``, ``1073741824``, ``0``/``off`` -> bytes (ValueError if not)."""
    t = text.strip().lower()
    if t in ("off", "no", "false"):
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", t)
    if m is None:
        raise ValueError(f"{ENV}={text!r} is not a size (such as 8G) or 0")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def budget_from_env(strict: bool = False) -> int:
    """The budget ``LAYERSTORE_FILE_CACHE`` asks for (a bad value: the default, with a
    warning, so that a mount goes on; ValueError if ``strict``)."""
    text = os.environ.get(ENV)
    if text is None or not text.strip():
        return DEFAULT_BUDGET
    try:
        return parse_budget(text)
    except ValueError as exc:
        if strict:
            raise
        log.warning("%s; using %d bytes", exc, DEFAULT_BUDGET)
        return DEFAULT_BUDGET


def cache_dir(root: Path) -> Path:
    return root / "cache" / "files"


class FileCache:
    """The file cache of the store at ``root`` (see the module docstring)."""

    def __init__(self, root: Path, budget: int | None = None):
        self.dir = cache_dir(root)
        self.budget = budget_from_env() if budget is None else budget
        self._lock = threading.Lock()
        self._wanted: dict[bytes, tuple[int, Callable[[int], None]]] = {}
        self._failed: set[bytes] = set()  #: digests whose fill failed: not asked for again
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._busy = False
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.dir / h[:2] / h

    def open(self, digest: bytes, size: int) -> int | None:
        """A read-only fd of the cached copy of content ``digest`` (``size`` bytes), or
        None if there is none (the caller owns the fd)."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                os.close(fd)
                return None
            now = time.time_ns()
            if now - st.st_atime_ns > TOUCH_AFTER_NS:
                with contextlib.suppress(OSError):
                    os.utime(fd, ns=(now, st.st_mtime_ns))
        except OSError:
            os.close(fd)
            return None
        return fd

    def want(self, digest: bytes, size: int, write: Callable[[int], None]) -> None:
        """Ask the filler to make the copy of ``digest``: ``write(fd)`` writes the whole
        content to ``fd`` from offset 0 (in the filler's thread)."""
        if not self.enabled or size > self.budget:
            return
        with self._lock:
            if self._closed or digest in self._wanted or digest in self._failed:
                return
            self._wanted[digest] = (size, write)
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill_loop, daemon=True,
                                                name="file-cache")
                self._thread.start()
            self._wake.notify()

    def close(self, timeout: float = 20.0) -> bool:
        """Stop taking requests; wait up to ``timeout`` for the copies asked for (the
        daemon's exit: a short-lived mount still leaves the big files it read cached
        for the next one). False if the filler is still copying then (the store must
        stay open: it reads the store's map; the process's exit ends it, and an
        unfinished copy has no name)."""
        with self._lock:
            self._closed = True
            t = self._thread
            self._wake.notify()
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                log.warning("file cache: a copy was still being made at exit")
                return False
        return True

    def _fill_loop(self) -> None:
        # behind the mount's own work: a nice thread (Linux: per thread)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILLER_NICE)
        while True:
            with self._lock:
                while not self._wanted and not self._closed:
                    self._wake.wait()
                if not self._wanted:
                    return
                digest = next(iter(self._wanted))
                size, write = self._wanted[digest]
            try:
                self.fill(digest, size, write)
            except Exception as exc:  # noqa: BLE001  (a cache: reads go on through the daemon)
                log.warning("file cache: could not keep %s: %s", digest.hex()[:16], exc)
                with self._lock:
                    self._failed.add(digest)
            finally:
                with self._lock:
                    self._wanted.pop(digest, None)

    def fill(self, digest: bytes, size: int, write: Callable[[int], None]) -> bool:
        """Make the cached copy of ``digest`` now; False if it was there already."""
        final = self.path(digest)
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(final.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o444)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
            write(fd)
            got = os.fstat(fd).st_size
            if got != size:
                raise OSError(errno.EIO, f"wrote {got} bytes, not {size}")
            if _hash_fd(fd, size) != digest:
                raise OSError(errno.EIO, "the copy does not match its digest")
            os.fdatasync(fd)
            dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                # linkat(AT_SYMLINK_FOLLOW) of the unnamed file (os.link uses linkat only
                # with a dir fd; link(2) would link the /proc symlink itself)
                os.link(f"/proc/self/fd/{fd}", final.name, dst_dir_fd=dfd,
                        follow_symlinks=True)
            except FileExistsError:
                return False
            finally:
                os.close(dfd)
        finally:
            os.close(fd)
        self.prune(keep=digest)
        return True

    def entries(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every cache file (named by a digest) and its stat."""
        try:
            subs = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        for sub in subs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(sub.path):
                if _NAME.match(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        yield Path(e.path), e.stat(follow_symlinks=False)

    def usage(self) -> tuple[int, int]:
        """(files, bytes) in the cache."""
        n = total = 0
        for _, st in self.entries():
            n += 1
            total += st.st_size
        return n, total

    def prune(self, keep: bytes | None = None) -> int:
        """Remove the least recently opened files until the total fits the budget;
        the number removed."""
        files = sorted(self.entries(), key=lambda e: e[1].st_atime_ns)
        total = sum(st.st_size for _, st in files)
        removed = 0
        for p, st in files:
            if total <= self.budget:
                break
            if keep is not None and p.name == keep.hex():
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            total -= st.st_size
            removed += 1
        return removed

    def sweep(self, live: Callable[[bytes], bool] | None = None) -> tuple[int, int]:
        """Remove every file (``live`` None) or those whose digest ``live`` calls dead;
        (files, bytes) removed."""
        n = total = 0
        for p, st in list(self.entries()):
            if live is not None and live(bytes.fromhex(p.name)):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
                total += st.st_size
        return n, total

    def verify(self, tick: Callable[[int], None] | None = None) -> list[str]:
        """Re-hash every cache file: what is wrong with them (for ``check``)."""
        bad = []
        for p, st in list(self.entries()):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                if _hash_fd(fd, st.st_size).hex() != p.name:
                    bad.append(f"file cache: {p} does not hold the content its name says "
                               "('layerstore gc --drop-file-cache' empties the cache)")
            finally:
                os.close(fd)
            if tick:
                tick(1)
        return bad


def _hash_fd(fd: int, size: int) -> bytes:
    # single-threaded (~1.5 GB/s): the daemon is a fork, and blake3's thread pool, if
    # the parent had started it, would not be there after the fork (the hash waited
    # for ever in a daemon forked by ``layerstore bench``)
    h = blake3_hasher()
    if size:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            h.update(m)
    return h.digest()  # type: ignore[no-any-return]
