"""The store facade: one root directory, one LMDB environment, one lock file.

Root layout::

    ROOT/db/           the LMDB environment (DESIGN.md §2)
    ROOT/lock          imports take it shared, gc exclusive (``lock.py``)
    ROOT/tmp/          scratch space for imports (same filesystem as the root)
    ROOT/containers/   one directory per container: upper/ and work/

Module map (imports go downwards only)::

    txn.py       Env: the only place that opens LMDB transactions
    records.py   record types, encodings, entry keys
    chunks.py    FastCDC chunking, codecs, batched chunk writes
    layers.py    the changeset rules of a layer; writing and reading entries
    images.py    images and names
    gc.py        mark and sweep
    check.py     re-hash and verify every reference
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from ..errors import SchemaError, StoreAccessError
from .chunks import ChunkParams
from .lock import store_lock
from .txn import DEFAULT_MAP_SIZE, Env

SCHEMA_VERSION = 1


def default_root() -> Path:
    env = os.environ.get("LAYERSTORE_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/layerstore")
    home = Path(os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir)
    return home / ".local/share/layerstore"


class Store:
    """A layer store rooted at one directory."""

    def __init__(self, root: Path, env: Env, params: ChunkParams):
        self.root = root
        self.env = env
        self.params = params

    @classmethod
    def open(
        cls,
        root: Path | str | None = None,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        params: ChunkParams | None = None,
        create: bool = True,
    ) -> Store:
        """Open (and create if needed) the store at ``root``.

        ``params`` only matters when the store is created: after that the chunking
        parameters and codec in ``meta`` win, so one store always cuts the same way.
        """
        root = Path(root) if root is not None else default_root()
        root = root.absolute()
        if not create and not (root / "db" / "data.mdb").exists():
            raise StoreAccessError(f"no store at {root}")
        try:
            for sub in ("", "tmp", "containers"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            raise StoreAccessError(
                f"store root {root} is not writable: {exc.strerror or exc}") from None
        env = Env(root / "db", map_size=map_size)
        meta = env.db("meta")
        with env.read() as txn:
            stored = txn.get(b"chunking", db=meta)
            schema = txn.get(b"schema", db=meta)
        if schema is None:
            p = params or ChunkParams()

            def init(txn: Any) -> None:
                if txn.get(b"schema", db=meta) is None:
                    txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=meta)
                    txn.put(b"chunking", msgpack.packb(p.to_meta()), db=meta)

            env.write(init)
            with env.read() as txn:
                stored = txn.get(b"chunking", db=meta)
                schema = txn.get(b"schema", db=meta)
        if int(schema) != SCHEMA_VERSION:
            env.close()
            raise SchemaError(f"store {root} has schema {int(schema)}; this layerstore "
                              f"reads schema {SCHEMA_VERSION}")
        env.learn_value_slot()  # now, not inside a transaction that needs it (places)
        return cls(root, env, ChunkParams.from_meta(msgpack.unpackb(stored)))

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def importing(self) -> Iterator[None]:
        """Held for the whole of an import or a container creation: excludes gc (shared)."""
        with store_lock(self.root / "lock", exclusive=False, what="import"):
            yield

    @contextlib.contextmanager
    def collecting(self, wait: float = 30.0) -> Iterator[None]:
        """Held by gc: excludes imports (exclusive)."""
        with store_lock(self.root / "lock", exclusive=True, wait=wait, what="run gc"):
            yield

    def tmp_dir(self) -> Path:
        return self.root / "tmp"
