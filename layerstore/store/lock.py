"""The store's lock file: imports (shared) exclude gc (exclusive).

Chunks are written in several transactions during an import, before the layer that
references them is visible. A gc running at that moment would see them as garbage, so
an import holds the lock shared for its whole length and gc holds it exclusive.
``flock`` locks die with their process, so a killed import never leaves it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import LockedError


@contextlib.contextmanager
def store_lock(path: Path, *, exclusive: bool, wait: float = 30.0, what: str = "") -> Iterator[None]:
    """Hold the lock at ``path``; wait up to ``wait`` seconds, then raise LockedError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    other = "an import is running" if exclusive else "gc is running"
                    raise LockedError(f"cannot {what or 'lock the store'}: {other}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
