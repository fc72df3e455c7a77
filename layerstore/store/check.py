"""check: re-hash every chunk and file, and verify that every reference resolves.

Damage (exit non-zero): a chunk whose content does not hash to its key, a file whose
chunks are missing, of the wrong length, or do not hash to the file's digest, an entry
or record that does not decode, a layer whose header stream or file content is missing,
an image whose config does not hash to its id or names a missing layer, a name or a
container naming a missing image.

Garbage (reported, not damage): chunks, files, layers and entries nothing reaches, which
an interrupted import leaves behind and ``gc`` removes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..digest import blake3_hasher, blake3_raw
from ..errors import IntegrityError
from . import places
from .chunks import decode_chunk
from .filecache import FileCache
from .gc import mark
from .layers import iter_layer_values
from .records import REG, WHITEOUT, ContainerRecord, Entry, FileRecord, ImageRecord, LayerRecord
from .tarsplit import iter_frames
from .txn import Env


@dataclass
class CheckResult:
    damage: list[str] = field(default_factory=list)
    chunks: int = 0
    files: int = 0
    layers: int = 0
    images: int = 0
    garbage_chunks: int = 0
    garbage_files: int = 0
    garbage_layers: int = 0

    @property
    def clean(self) -> bool:
        return not self.damage


def _check_tarsplit(txn: Any, env: Env, rec: LayerRecord, file_size: dict[bytes, int],
                    bad: Callable[[str], None]) -> None:
    """Every file the header stream refers to is present with the right size."""
    chunks_db = env.db("chunks")
    ts = FileRecord.decode(txn.get(rec.tarsplit, db=env.db("files")))
    data = (decode_chunk(txn.get(d, db=chunks_db)) for d, _ in ts.chunks)
    total = 0
    try:
        for raw, digest, size in iter_frames(data):
            total += len(raw) + size
            if digest is not None and file_size.get(digest) != size:
                bad(f"layer {rec.diff_id}: file content {digest.hex()[:16]} of its tar is "
                    "missing or damaged")
    except ValueError as exc:
        bad(f"layer {rec.diff_id}: damaged tar header stream ({exc})")
        return
    if total != rec.tar_size:
        bad(f"layer {rec.diff_id}: header stream rebuilds {total} bytes, not {rec.tar_size}")


def _link_counts(links: Any) -> dict[int, int] | None:
    """Group -> how many paths a layer record lists for it (None if malformed)."""
    try:
        return {g: len(p) for g, p in links.items() if isinstance(p, list)} \
            if all(isinstance(p, list) for p in links.values()) else None
    except (AttributeError, TypeError):
        return None


def check(env: Env, tick: Callable[[int], None] | None = None,
          root: Path | None = None) -> CheckResult:
    """Re-hash and cross-check everything; with ``root``, also the copies in the store's
    file cache (``store.filecache``: a damaged copy would be read by passthrough)."""
    res = check_store(env, tick)
    if root is not None:
        res.damage += FileCache(root).verify()
    return res


def check_store(env: Env, tick: Callable[[int], None] | None = None) -> CheckResult:
    res = CheckResult()
    bad = res.damage.append
    chunk_len: dict[bytes, int] = {}
    with env.read() as txn:
        # chunks: the content hashes to the key
        with txn.cursor(db=env.db("chunks")) as cur:
            for k, v in cur:
                res.chunks += 1
                try:
                    data = decode_chunk(v)
                except IntegrityError as exc:
                    bad(f"chunk {k.hex()[:16]}: {exc}")
                    continue
                if blake3_raw(data) != k:
                    bad(f"chunk {k.hex()[:16]}: content does not match its digest")
                    continue
                chunk_len[k] = len(data)
                if tick:
                    tick(len(v))
        # files: chunks exist, lengths add up, the whole content hashes to the key
        file_size: dict[bytes, int] = {}
        with txn.cursor(db=env.db("files")) as cur:
            for k, v in cur:
                res.files += 1
                try:
                    rec = FileRecord.decode(v)
                except IntegrityError:
                    bad(f"file {k.hex()[:16]}: corrupt record")
                    continue
                missing = [d for d, _ in rec.chunks if d not in chunk_len]
                if missing:
                    bad(f"file {k.hex()[:16]}: {len(missing)} chunk(s) missing or damaged")
                    continue
                if any(chunk_len[d] != n for d, n in rec.chunks) or \
                        sum(n for _, n in rec.chunks) != rec.size:
                    bad(f"file {k.hex()[:16]}: chunk lengths do not add up to its size")
                    continue
                h = blake3_hasher()
                for d, _ in rec.chunks:
                    h.update(decode_chunk(txn.get(d, db=env.db("chunks"))))
                if h.digest() != k:
                    bad(f"file {k.hex()[:16]}: content does not match its digest")
                    continue
                file_size[k] = rec.size
        # layers: header stream and every file present, entry count right
        layer_nos: dict[int, str] = {}
        with txn.cursor(db=env.db("layers")) as cur:
            for k, v in cur:
                res.layers += 1
                try:
                    rec_l = LayerRecord.decode(v)
                except IntegrityError:
                    bad(f"layer {k.hex()[:16]}: corrupt record")
                    continue
                name = rec_l.diff_id
                if rec_l.diff_id != "sha256:" + k.hex():
                    bad(f"layer {name}: record key does not match its diff_id")
                if rec_l.layer_no in layer_nos:
                    bad(f"layer {name}: shares its entry prefix with {layer_nos[rec_l.layer_no]}")
                layer_nos[rec_l.layer_no] = name
                if rec_l.tarsplit not in file_size:
                    bad(f"layer {name}: tar header stream is missing or damaged")
                else:
                    _check_tarsplit(txn, env, rec_l, file_size, bad)
                count = 0
                groups: dict[int, int] = {}  # hard-link group -> entries in it
                for ev in iter_layer_values(txn, env, rec_l.layer_no):
                    count += 1
                    try:
                        e = Entry.decode(ev)
                    except IntegrityError:
                        bad(f"layer {name}: a corrupt entry record")
                        continue
                    if e.type == REG and e.size and file_size.get(e.digest) != e.size:
                        bad(f"layer {name}: file content {e.digest.hex()[:16]} missing or damaged")
                    if e.link_group and e.type != WHITEOUT:
                        groups[e.link_group] = groups.get(e.link_group, 0) + 1
                if count != rec_l.entry_count:
                    bad(f"layer {name}: has {count} entries, its record says {rec_l.entry_count}")
                if rec_l.links is not None and _link_counts(rec_l.links) != groups:
                    bad(f"layer {name}: the hard links its record lists are not its entries'")
        # where files' chunks lie (a hint readers use at the current generation)
        for msg in places.check(txn, env):
            bad(msg)
        # images: config hashes to the id; layers exist
        image_ids = set()
        with txn.cursor(db=env.db("images")) as cur:
            records = list(cur)
        for k, v in records:
            res.images += 1
            try:
                img = ImageRecord.decode(v)
            except IntegrityError:
                bad(f"image sha256:{k.hex()}: corrupt record")
                image_ids.add(f"sha256:{k.hex()}")  # its names are not missing an image
                continue
            image_ids.add(img.id)
            if "sha256:" + hashlib.sha256(img.config).hexdigest() != img.id:
                bad(f"image {img.id}: config does not match the image id")
            for d in img.diff_ids:
                if txn.get(bytes.fromhex(d.split(":", 1)[1]), db=env.db("layers")) is None:
                    bad(f"image {img.id}: layer {d} is missing")
        with txn.cursor(db=env.db("names")) as cur:
            for k, v in cur:
                if v.decode() not in image_ids:
                    bad(f"name {k.decode()}: image {v.decode()} is missing")
        with txn.cursor(db=env.db("containers")) as cur:
            for _, v in cur:
                c = ContainerRecord.decode(v)
                if c.image_id not in image_ids:
                    bad(f"container {c.name}: image {c.image_id} is missing")
    try:
        live_layers, live_files, live_chunks = mark(env)
    except IntegrityError as exc:
        # A record that does not decode stops the marking (gc refuses to run then too);
        # the loops above have named it, so report that instead of the bare error.
        if res.clean:
            bad(f"cannot tell garbage from live data: {exc}")
        return res
    with env.read() as txn:
        res.garbage_layers = sum(1 for k in txn.cursor(db=env.db("layers")).iternext(values=False)
                                 if k not in live_layers)
        res.garbage_files = sum(1 for k in txn.cursor(db=env.db("files")).iternext(values=False)
                                if k not in live_files)
        res.garbage_chunks = sum(1 for k in txn.cursor(db=env.db("chunks")).iternext(values=False)
                                 if k not in live_chunks)
    return res
