"""Which FUSE transport the adapter runs on, chosen once at import (``LAYERSTORE_FUSE``).

- ``wire`` (the default): the FUSE protocol spoken on ``/dev/fuse`` directly
  (``wire.py``), under the inode-based adapter ``lowlevel.py``. One kernel inode per
  file (hard links share it), per-entry timeouts, negative entries cached, and what
  libfuse 3.14 (Debian bookworm's) cannot ask the kernel for: listings kept by the
  kernel (no OPENDIR), and no GETXATTR ``security.capability`` before every write
  (``FUSE_HANDLE_KILLPRIV_V2``). Needs ``fusermount3`` and trio. In the suite against
  mfusepy (``benchmarks/README.md``, "Session 6: the FUSE protocol spoken directly"):
  random 4 KiB writes 2.4-4.1x as fast, warm walks in 0.32-0.87x the time, first
  walks 0.95-1.17x, metadata changes about the same, creates 1.13-1.22x and deletes
  0.81-0.84x as fast (three runs of 5).
- ``mfusepy`` on libfuse3 (``LAYERSTORE_FUSE=mfusepy``; the default until session 6,
  and the choice when ``fusermount3`` or trio is missing): the maintained fork of fusepy
  with the same API, on libfuse's high-level (path-based) API. On libfuse3 the kernel
  gets every entry's attributes with the listing (readdirplus) and can be told to drop
  a file's cached attributes (``fuse_invalidate_path``), which is what lets the writable
  mount cache attributes at all although libfuse gives each name of a hard link its own
  kernel inode (see ``daemon.serve_fuse``). libfuse 3.14's high-level API drops
  ``cache_readdir``, so every listing reaches the daemon.
- ``pyfuse3`` on libfuse3's low-level API (``LAYERSTORE_FUSE=pyfuse3``, the same
  ``lowlevel.py``): optional (the ``pyfuse3`` extra; it compiles against libfuse3-dev).
  A request costs ~85 us against ~50 on the others (pyfuse3 runs every request on
  trio), and libfuse 3.14 limits it as it limits mfusepy.
- ``fusepy`` on libfuse2: the fallback when libfuse3 is missing, or
  ``LAYERSTORE_FUSE=fusepy``.

``LAYERSTORE_FUSE=wire``, ``mfusepy`` or ``pyfuse3`` insists on that transport (an
ImportError otherwise, saying what is missing).

Everything else in ``layerstore/fuse/`` imports the high-level binding from here, as
``fusepy``; ``TRANSPORT`` names the transport and ``LOWLEVEL`` says whether the daemon
serves through ``lowlevel.py`` (wire or pyfuse3).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import struct
import threading
from types import ModuleType
from typing import Any

CHOICE_ENV = "LAYERSTORE_FUSE"


def _transport() -> str:
    """``wire``, ``pyfuse3`` or ``highlevel`` (mfusepy or fusepy: ``_load``)."""
    choice = os.environ.get(CHOICE_ENV, "auto")
    if choice in ("auto", "wire"):
        missing = []
        try:
            import trio  # noqa: F401
        except ImportError:
            missing.append("trio (pip install trio)")
        if shutil.which("fusermount3") is None:
            missing.append("fusermount3 (apt-get install fuse3)")
        if not missing:
            return "wire"
        if choice == "wire":
            raise ImportError(f"{CHOICE_ENV}=wire needs {' and '.join(missing)}")
    if choice == "pyfuse3":
        try:
            import pyfuse3  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"{CHOICE_ENV}=pyfuse3 but pyfuse3 cannot be imported ({exc}); "
                              "install it with: pip install 'layerstore[pyfuse3]' "
                              "(needs libfuse3-dev, pkg-config and a C compiler)") from exc
        return "pyfuse3"
    return "highlevel"


def _load() -> tuple[ModuleType, int]:
    choice = os.environ.get(CHOICE_ENV, "auto")
    if choice in ("auto", "mfusepy", "pyfuse3", "wire"):
        # mfusepy looks for libfuse2 first unless told which library to load
        old = os.environ.get("FUSE_LIBRARY_NAME")
        os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
        try:
            import mfusepy

            if mfusepy.fuse_version_major == 3:
                return mfusepy, 3
            if choice == "mfusepy":
                raise ImportError("mfusepy did not load libfuse3")
        except (ImportError, OSError):
            if choice == "mfusepy":
                raise
        finally:
            if old is None:
                os.environ.pop("FUSE_LIBRARY_NAME", None)
            else:
                os.environ["FUSE_LIBRARY_NAME"] = old
    import fuse as fusepy_module  # fusepy's module, not this package

    return fusepy_module, 2


TRANSPORT = _transport()
LOWLEVEL = TRANSPORT != "highlevel"
fusepy, FUSE_MAJOR = _load()
NAME = ("the FUSE protocol on /dev/fuse (wire.py)" if TRANSPORT == "wire"
        else "pyfuse3 on libfuse3 (low-level API)" if TRANSPORT == "pyfuse3"
        else f"{fusepy.__name__} on libfuse{FUSE_MAJOR}")

if FUSE_MAJOR == 3:
    _invalidate = fusepy._libfuse.fuse_invalidate_path
    _invalidate.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

#: ``fuse_readdir_flags`` / ``fuse_fill_dir_flags`` of libfuse3
READDIR_PLUS = 1
FILL_DIR_PLUS = 2


def invalidate_path(path: str, encoding: str) -> None:
    """libfuse3's ``fuse_invalidate_path``: the kernel forgets the attributes and data it
    caches for the node at ``path``. Only during a request (it needs the request's
    ``struct fuse``); a no-op on libfuse2."""
    if FUSE_MAJOR != 3:
        return
    ctx = fusepy._libfuse.fuse_get_context()
    if ctx:
        _invalidate(ctypes.c_void_p(ctx.contents.fuse), path.encode(encoding))


#: per libfuse thread: ``n``, how many callbacks it has made; ``after``, what
#: ``remember_attrs`` keeps for the next one
_calls = threading.local()


def remember_attrs(path: str, attrs: dict[str, int] | None) -> None:
    """After a change through ``path`` in the current callback: ``attrs``, its
    attributes now. libfuse3's high-level setattr (chmod, chown, utimens) asks for the
    attributes right after the change, in the same request and thread, to put them in
    the reply: ``FUSE.fgetattr`` answers that call with these, if it is the very next
    callback of the thread and for the same path, instead of walking the overlay again
    (for the first chmod of a lower file that getattr took 140-190 us of the ~1.1 ms).
    A no-op on libfuse2, which does not ask."""
    if FUSE_MAJOR == 3 and attrs is not None:
        _calls.after = (getattr(_calls, "n", 0), path, attrs)


_pinned: set[int] = set()
#: how many libfuse threads keep a Python thread state (~20 KiB each)
MAX_PINNED = 64


def _pin_thread_state() -> None:
    """Keep a Python thread state for the calling libfuse worker thread.

    libfuse calls the binding from its own threads, and ctypes makes a new Python thread
    state for every such call and deletes it afterwards (an mmap, a munmap and the state
    built and torn down, per FUSE request; thread-local data such as the zstd
    decompressor of ``store/chunks.py`` went with it). One ``PyGILState_Ensure`` that is
    never released keeps the thread's state alive, so later calls reuse it: a trivial
    file system answered ``stat`` in 30-41 us instead of 47-55 us (best of 5 x 3,000).
    A first walk of 2,907 files (``os.walk`` + ``lstat``) took 595-677 ms instead of
    1,079-1,172 ms. A state per worker thread is kept; a thread that libfuse ends
    leaves its state behind, so at most ``MAX_PINNED`` are kept (libfuse 3 keeps its
    few worker threads; beyond that bound a thread gets a state per call again)."""
    tid = threading.get_native_id()
    if tid not in _pinned and len(_pinned) < MAX_PINNED:
        _pinned.add(tid)
        ctypes.pythonapi.PyGILState_Ensure()


def _stat_layout() -> struct.Struct | None:
    """``struct stat`` of 64-bit Linux as one ``struct.Struct``, if mfusepy's ``c_stat``
    has that layout (checked field by field), else None."""
    want = {"st_dev": (0, 8), "st_ino": (8, 8), "st_nlink": (16, 8), "st_mode": (24, 4),
            "st_uid": (28, 4), "st_gid": (32, 4), "st_rdev": (40, 8), "st_size": (48, 8),
            "st_blksize": (56, 8), "st_blocks": (64, 8), "st_atimespec": (72, 16),
            "st_mtimespec": (88, 16), "st_ctimespec": (104, 16)}
    c_stat = getattr(fusepy, "c_stat", None)
    try:
        if c_stat is None or ctypes.sizeof(c_stat) != 144:
            return None
        for name, (offset, size) in want.items():
            field = getattr(c_stat, name)
            if (field.offset, field.size) != (offset, size):
                return None
    except AttributeError:
        return None
    # dev ino nlink | mode uid gid pad | rdev size blksize blocks | 3 timespecs | reserved
    return struct.Struct("<QQQIII4xQqqqqqqqqq24x")


_STAT = _stat_layout()
_NS = 1_000_000_000


def fill_stat(st: Any, attrs: dict[str, int]) -> None:
    """Write a ``st_*`` dict (times in ns) into a ``c_stat``: one ``pack_into`` instead
    of mfusepy's ``set_st_attrs``, a ctypes attribute write per field (measured: 0.7 us
    against 3.6 us per call with the memset; every getattr and listed entry pays it)."""
    if _STAT is not None:
        g = attrs.get
        a_s, a_ns = divmod(g("st_atime", 0), _NS)
        m_s, m_ns = divmod(g("st_mtime", 0), _NS)
        c_s, c_ns = divmod(g("st_ctime", 0), _NS)
        try:
            _STAT.pack_into(st, 0, g("st_dev", 0), g("st_ino", 0), g("st_nlink", 0),
                            g("st_mode", 0), g("st_uid", 0), g("st_gid", 0), g("st_rdev", 0),
                            g("st_size", 0), g("st_blksize", 0), g("st_blocks", 0),
                            a_s, a_ns, m_s, m_ns, c_s, c_ns)
            return
        except (struct.error, TypeError):
            pass  # a value out of range or not an int: the field-by-field way below
    ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
    fusepy.set_st_attrs(st, attrs, use_ns=True)


class FUSE(fusepy.FUSE):  # type: ignore[misc,name-defined]
    """The binding's ``FUSE`` with what libfuse3 offers and mfusepy does not pass on:

    - readdirplus that the kernel uses: libfuse's high-level API passes a listing's
      attributes on only when the filler gets each entry's offset (entries filled with
      offset 0 go out with node id 0, "ignore these attributes"), so listings are
      served in offset mode: the listing is made once per open directory (at offset 0,
      kept until ``releasedir``) and each READDIRPLUS request takes the next entries
      from it, each with its offset and its full attributes. A tree walk then needs no
      LOOKUP per entry;
    - ``cache_readdir`` + ``keep_cache`` on directories when the operations say
      ``cache_readdir = True`` (libfuse 3.14's high-level API drops both; later ones
      pass them on, and the kernel then keeps listings);
    - ``ftruncate`` with its fh, and ``rename`` flags (RENAME_NOREPLACE is honoured by
      the operations' ``rename(old, new, flags)``; mfusepy drops both);
    - attributes written in one call (``fill_stat``);
    - a Python thread state kept per libfuse thread (``_pin_thread_state``), and
      ``create`` without mfusepy's ``inspect.signature`` on every call.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: open directory handle -> [the operations' fh, the listing once made, the
        #: operations' ``changes()`` just before it was made]
        self._dirs: dict[int, list[Any]] = {}
        self._dir_ids = itertools.count(1)
        super().__init__(*args, **kwargs)

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        _pin_thread_state()
        _calls.n = getattr(_calls, "n", 0) + 1
        return super()._wrapper(func, *args, **kwargs)

    if fusepy.__name__ == "mfusepy":

        def create(self, path: bytes, mode: int, fip: Any) -> int:
            fi = fip.contents
            fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode,
                                           fi.flags)
            return 0

    if FUSE_MAJOR == 3:

        def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            after = getattr(_calls, "after", None)
            if after is not None:
                _calls.after = None
                if after[0] == _calls.n - 1 and after[1] == decoded:
                    fill_stat(buf.contents, after[2])  # see ``remember_attrs``
                    return 0
            fh = fip.contents.fh if fip else None
            fill_stat(buf.contents, self.operations.getattr(decoded, fh))
            return 0

        def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int,
                           fip: Any, flags: int) -> int:
            handle = fip.contents.fh
            state = self._dirs.get(handle)
            if state is None:  # not opened through ``opendir``: list, keep nothing
                state = [handle, None, 0]
            changes = getattr(self.operations, "changes", None)
            listing = state[1]
            if listing is None or offset == 0:
                decoded = None if path is None else path.decode(self.encoding, self.errors)
                state[1] = None
                state[2] = changes() if changes is not None else 0  # before the listing
                listing = state[1] = list(self.operations.readdir(decoded, state[0]))
            # The attributes of a later piece go to the kernel only if nothing changed
            # since the listing was made: libfuse sends them with the entry's node id,
            # and the kernel would keep old ones (a deleted file shown as there, a
            # grown one as short) for the attribute timeout. Else the names go without.
            plus = bool(flags & READDIR_PLUS) and (
                offset == 0 or changes is None or changes() == state[2])
            st = fusepy.c_stat()
            encoding, errors = self.encoding, self.errors
            for i in range(offset, len(listing)):
                name, attrs, _off = listing[i]
                if attrs is not None:
                    fill_stat(st, attrs)
                    fill = FILL_DIR_PLUS if plus and name not in (".", "..") else 0
                    full = filler(buf, name.encode(encoding, errors), st, i + 1, fill)
                else:
                    full = filler(buf, name.encode(encoding, errors), None, i + 1, 0)
                if full:
                    break
            return 0

        def opendir(self, path: bytes, fip: Any) -> int:
            fh = self.operations.opendir(path.decode(self.encoding, self.errors))
            handle = next(self._dir_ids)
            self._dirs[handle] = [fh, None, 0]  # the operations' fh, listing, changes
            fip.contents.fh = handle
            if getattr(self.operations, "cache_readdir", False):
                fip.contents.cache_readdir = 1
                fip.contents.keep_cache = 1
            return 0

        def releasedir(self, path: bytes | None, fip: Any) -> int:
            state = self._dirs.pop(fip.contents.fh, None)
            fh = state[0] if state is not None else fip.contents.fh
            return self.operations.releasedir(  # type: ignore[no-any-return]
                None if path is None else path.decode(self.encoding, self.errors), fh)

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(  # type: ignore[no-any-return]
                None if path is None else path.decode(self.encoding, self.errors), length, fh)

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(  # type: ignore[no-any-return]
                old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors),
                flags)


__all__ = ["FUSE", "FUSE_MAJOR", "LOWLEVEL", "NAME", "TRANSPORT", "fill_stat", "fusepy", "invalidate_path",
           "remember_attrs"]
