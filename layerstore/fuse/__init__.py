"""The FUSE adapter: operations on the inode-based API (``lowlevel.py``), served by the
FUSE protocol spoken on /dev/fuse (``wire.py``, the default) or by pyfuse3; the same on
libfuse's high-level API (``operations.py``, through mfusepy or fusepy); the mount
daemon (``daemon.py``), the fuse-overlayfs-compatible entry point (``compat.py``), and
the choice of transport (``binding.py``, ``LAYERSTORE_FUSE``). Inside, the high-level
binding is imported from ``binding`` as ``fusepy``; never create a top-level module
named ``fuse`` (it would shadow fusepy's)."""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Callable
from typing import Any

log = logging.getLogger("layerstore.fuse")

#: capability bit of CAP_FSETID (linux/capability.h)
CAP_FSETID = 4


def killed_mode(mode: int) -> int:
    """``mode`` without what a write or truncate by a caller without CAP_FSETID clears
    (setuid, and setgid when the group may execute; as libfuse documents for
    FUSE_HANDLE_KILLPRIV_V2). Other than regular files are left alone."""
    if not stat.S_ISREG(mode):
        return mode
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def clear_setid(fs: Any, fh: int, may_keep: Callable[[], bool]) -> bool:
    """Clear setuid/setgid of the open upper file ``fh`` of ``fs`` (an ``OverlayFS``) as a
    write or truncate by a caller without CAP_FSETID does, unless ``may_keep()`` (asked
    only when there is something to clear). Through the handle: an fstat, and a fchmod
    when needed (the file may have no name any more). Whether it changed the mode."""
    mode = fs.fgetattr(fh)["st_mode"]
    killed = killed_mode(mode)
    if killed == mode or may_keep():
        return False
    fs.fchmod(fh, killed)
    return True


def may_keep_setid(pid: int, uid: int) -> bool:
    """Whether the caller (thread ``pid``) has CAP_FSETID, which keeps setuid/setgid on
    a write or truncate: its effective capabilities in /proc; by its uid (root) if they
    cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
    except (OSError, ValueError, IndexError):
        pass
    return uid == 0


def errno_of(call: str, exc: Exception) -> int:
    """The errno the kernel gets for an exception from the overlay in ``call`` (both
    adapters' one rule): an OSError's own (logged at debug level, unless ENOENT),
    EIO for anything else (logged as an error, with its traceback)."""
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        if exc.errno != errno.ENOENT:
            log.debug("%s: %s", call, exc)
        return exc.errno
    if isinstance(exc, OSError):
        log.error("%s: OSError without errno", call, exc_info=exc)
    else:
        log.error("%s failed", call, exc_info=exc)
    return errno.EIO
