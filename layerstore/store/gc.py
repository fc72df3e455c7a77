"""Garbage collection: mark from images and containers, sweep what nothing reaches.

Marking: containers -> their images; images -> layers (by diff_id); layers -> their
header stream and every regular file's content; files -> chunks. Sweeping deletes
unreferenced layers (entries and record), files and chunks in batched write
transactions. Runs with the store lock exclusive, so no import is under way (an import
writes chunks before the layer that references them is visible).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb

from . import places
from .filecache import FileCache
from .images import all_images
from .layers import iter_layer_values
from .records import Entry, FileRecord, LayerRecord, layer_prefix
from .txn import Env

SWEEP_BATCH = 10_000


@dataclass
class GcResult:
    layers: int = 0
    files: int = 0
    chunks: int = 0
    bytes: int = 0  #: bytes of chunk values freed
    cache_files: int = 0  #: copies removed from the file cache (``store.filecache``)
    cache_bytes: int = 0


def mark(env: Env, tick: Callable[[int], None] | None = None) -> tuple[set[bytes], set[bytes], set[bytes]]:
    """(live layer keys, live file digests, live chunk digests)."""
    live_layers: set[bytes] = set()
    live_files: set[bytes] = set()
    live_chunks: set[bytes] = set()
    with env.read() as txn:
        for img in all_images(txn, env):
            for d in img.diff_ids:
                live_layers.add(bytes.fromhex(d.split(":", 1)[1]))
        # Containers reach the store only through their image (which rmi will not
        # remove while they exist); lazily copied-up files will add chunk references here.
        for key in sorted(live_layers):
            value = txn.get(key, db=env.db("layers"))
            if value is None:
                continue
            rec = LayerRecord.decode(value)
            live_files.add(rec.tarsplit)
            for v in iter_layer_values(txn, env, rec.layer_no):
                e = Entry.decode(v)
                if e.digest:
                    live_files.add(e.digest)
            if tick:
                tick(1)
        files_db = env.db("files")
        for f in live_files:
            value = txn.get(f, db=files_db)
            if value is not None:
                for d, _ in FileRecord.decode(value).chunks:
                    live_chunks.add(d)
    return live_layers, live_files, live_chunks


def collect(env: Env, root: Path | None = None, tick: Callable[[int], None] | None = None,
            drop_file_cache: bool = False) -> GcResult:
    """Delete everything unreachable. Requires the store lock held exclusive.

    With ``root``, also removes leftover import files under ``ROOT/tmp``, container
    directories that no container record names (``remove_container`` deletes the record
    first), and the file cache's copies of content no layer has any more (all of them
    with ``drop_file_cache``)."""
    live_layers, live_files, live_chunks = mark(env, tick)
    result = GcResult()
    if root is not None:
        result.cache_files, result.cache_bytes = FileCache(root).sweep(
            None if drop_file_cache else live_files.__contains__)
    with env.read() as txn:
        dead_layers = []
        with txn.cursor(db=env.db("layers")) as cur:
            for k, v in cur:
                if k not in live_layers:
                    dead_layers.append((k, LayerRecord.decode(v).layer_no))
        live_nos = set()
        with txn.cursor(db=env.db("layers")) as cur:
            for k, v in cur:
                if k in live_layers:
                    live_nos.add(LayerRecord.decode(v).layer_no)
        # entries of layers whose record never got written (an import that died)
        orphan_nos = set()
        with txn.cursor(db=env.db("entries")) as cur:
            key = b""
            while cur.set_range(key):
                no = int.from_bytes(cur.key()[:8], "big")
                if no not in live_nos:
                    orphan_nos.add(no)
                key = layer_prefix(no + 1)
        dead_files = []
        with txn.cursor(db=env.db("files")) as cur:
            for k in cur.iternext(keys=True, values=False):
                if k not in live_files:
                    dead_files.append(k)
        dead_chunks = []
        with txn.cursor(db=env.db("chunks")) as cur:
            for k, v in cur:
                if k not in live_chunks:
                    dead_chunks.append((k, len(v)))

    def drop_layer(no: int, key: bytes | None) -> Callable[[lmdb.Transaction], None]:
        def fn(txn: lmdb.Transaction) -> None:
            if key is not None:
                txn.delete(key, db=env.db("layers"))
            prefix = layer_prefix(no)
            with txn.cursor(db=env.db("entries")) as cur:
                if cur.set_range(prefix):
                    while cur.key().startswith(prefix):
                        if not cur.delete():
                            break
        return fn

    for key, no in dead_layers:
        env.write(drop_layer(no, key))
        orphan_nos.discard(no)
        result.layers += 1
    for no in orphan_nos:
        env.write(drop_layer(no, None))
    for i in range(0, len(dead_files), SWEEP_BATCH):
        part = dead_files[i:i + SWEEP_BATCH]
        env.write(lambda txn, part=part: [
            (txn.delete(k, db=env.db("files")), txn.delete(k, db=env.db("places")))
            for k in part])
    result.files = len(dead_files)

    def drop_chunks(part: list[bytes]) -> Callable[[lmdb.Transaction], None]:
        def fn(txn: lmdb.Transaction) -> None:
            # their pages will hold other values: the places recorded so far are not
            # to be used again (``places``)
            places.bump_generation(txn, env)
            for k in part:
                txn.delete(k, db=env.db("chunks"))
        return fn

    for i in range(0, len(dead_chunks), SWEEP_BATCH):
        env.write(drop_chunks([k for k, _ in dead_chunks[i:i + SWEEP_BATCH]]))
    result.chunks = len(dead_chunks)
    if dead_chunks or places.stale(env):
        places.refresh(env)
    result.bytes = sum(n for _, n in dead_chunks)
    if root is not None:
        for p in (root / "tmp").glob("import-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        with env.read() as txn:
            ids = {k.decode() for k in txn.cursor(db=env.db("containers")).iternext(values=False)}
        cdir = root / "containers"
        if cdir.is_dir():
            for p in cdir.iterdir():
                if p.name not in ids and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
    return result
