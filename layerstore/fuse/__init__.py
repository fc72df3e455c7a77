"""The FUSE adapter: operations on libfuse's high-level API (``operations.py``), the same
on the low-level API through pyfuse3 (``lowlevel.py``, ``LAYERSTORE_FUSE=pyfuse3``), the
mount daemon (``daemon.py``), the fuse-overlayfs-compatible entry point (``compat.py``),
and the choice of Python binding (``binding.py``: mfusepy on libfuse3, else fusepy on
libfuse2; pyfuse3 when asked for). Inside, the high-level binding is imported from
``binding`` as ``fusepy``; never create a top-level module named ``fuse`` (it would
shadow fusepy's)."""

from __future__ import annotations

import errno
import logging

log = logging.getLogger("layerstore.fuse")


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
