"""Disk usage: logical vs stored bytes, the dedup ratio, unique bytes per image.

- ``logical_bytes``: sum over images of their uncompressed layer tars (what the images
  would take as plain tars, each image counted whole);
- ``content_bytes``: sum of file content over the distinct layers in the store;
- ``chunk_bytes``: payload bytes of the distinct chunks (after dedup, before compression);
- ``stored_bytes``: bytes of the stored chunk values (after dedup and compression);
- ``unique_bytes`` of an image: stored bytes of chunks that no other image uses
  (what ``rmi`` + ``gc`` of that image alone would free).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .chunks import decode_chunk
from .images import all_images, names_of
from .layers import iter_layer_values
from .records import Entry, FileRecord, LayerRecord
from .txn import Env


@dataclass
class ImageUsage:
    id: str
    names: list[str]
    logical_bytes: int
    unique_bytes: int


@dataclass
class Usage:
    images: int = 0
    layers: int = 0
    logical_bytes: int = 0
    content_bytes: int = 0
    chunk_count: int = 0
    chunk_bytes: int = 0
    stored_bytes: int = 0
    db_file_bytes: int = 0
    per_image: list[ImageUsage] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dedup_ratio"] = round(self.dedup_ratio, 3)
        return d


def usage(env: Env) -> Usage:
    u = Usage()
    with env.read() as txn:
        chunks_db, files_db = env.db("chunks"), env.db("files")
        stored: dict[bytes, int] = {}
        with txn.cursor(db=chunks_db) as cur:
            for k, v in cur:
                stored[k] = len(v)
                u.chunk_count += 1
                u.stored_bytes += len(v)
                u.chunk_bytes += len(decode_chunk(v)) if v[:1] != b"\x00" else len(v) - 1
        layer_chunks: dict[str, set[bytes]] = {}
        layer_recs: dict[str, LayerRecord] = {}
        file_chunks: dict[bytes, list[bytes]] = {}

        def chunks_of(digest: bytes) -> list[bytes]:
            if digest not in file_chunks:
                value = txn.get(digest, db=files_db)
                file_chunks[digest] = [d for d, _ in FileRecord.decode(value).chunks] if value else []
            return file_chunks[digest]

        with txn.cursor(db=env.db("layers")) as cur:
            for _, v in cur:
                rec = LayerRecord.decode(v)
                u.layers += 1
                u.content_bytes += rec.content_size
                layer_recs[rec.diff_id] = rec
                s: set[bytes] = set(chunks_of(rec.tarsplit))
                for ev in iter_layer_values(txn, env, rec.layer_no):
                    e = Entry.decode(ev)
                    if e.digest:
                        s.update(chunks_of(e.digest))
                layer_chunks[rec.diff_id] = s
        images = all_images(txn, env)
        names = names_of(txn, env)
    per_image_chunks = []
    for img in images:
        u.images += 1
        logical = sum(layer_recs[d].tar_size for d in img.diff_ids if d in layer_recs)
        u.logical_bytes += logical
        s = set().union(*(layer_chunks.get(d, set()) for d in img.diff_ids))
        per_image_chunks.append((img, logical, s))
    counts: dict[bytes, int] = {}
    for _, _, s in per_image_chunks:
        for d in s:
            counts[d] = counts.get(d, 0) + 1
    for img, logical, s in per_image_chunks:
        unique = sum(stored.get(d, 0) for d in s if counts[d] == 1)
        u.per_image.append(ImageUsage(img.id, names.get(img.id, []), logical, unique))
    u.db_file_bytes = env.file_size()
    return u
