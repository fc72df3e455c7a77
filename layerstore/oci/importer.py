"""Import images into the store: verify while streaming, publish whole or not at all.

For each layer: the blob is hashed as stored (its manifest digest), decompressed by
magic bytes, hashed again (the diff_id), split into chunks and entries. Chunks go to the
store in batches as they come (content-addressed: harmless if the import dies); the
layer's entries and record are written in one transaction only after both digests
matched. The image record and its names are written last, in one transaction. A layer
that is already in the store (same diff_id) is not read again.

The whole import holds the store's lock shared, so gc cannot run meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..digest import parse_oci_digest
from ..errors import DigestMismatchError, InvalidLayerError, UsageError
from ..store import Store
from ..store.chunks import ChunkBatch
from ..store.images import normalize_name, put_image
from ..store.layers import encode_entries, put_layer
from ..store.records import ImageRecord, LayerRecord
from .sources import (
    MT_OCI_CONFIG,
    ImageSource,
    LayerSource,
    host_platform,
    open_source,
)
from .streams import HashingReader, PeekReader, Prefetcher, detect_compression, open_layer_stream
from .tarlayer import read_layer_tar

Progress = Callable[[str, int | None], Callable[[int], None]]


@dataclass
class ImportResult:
    image_id: str
    names: list[str]
    layers_new: int
    layers_reused: int


def no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


def import_path(
    store: Store,
    path: Path | str,
    *,
    tag: str | None = None,
    platform: str | None = None,
    progress: Progress | None = None,
) -> list[ImportResult]:
    """Import every image in ``path``; return one result per image."""
    path = Path(path)
    progress = progress or no_progress
    tag = normalize_name(tag) if tag else None
    with store.importing(), open_source(path, store.tmp_dir(), platform) as images:
        if tag and len(images) > 1:
            raise UsageError(f"{path}: --tag needs an input with one image (this one has {len(images)})")
        results = []
        for img in images:
            names = [tag] if tag else []
            names += [normalize_name(n) for n in img.names if n and normalize_name(n) not in names]
            results.append(import_image(store, img, names, progress, str(path)))
        return results


@dataclass
class PreparedLayer:
    """A layer read and verified, not yet visible: written with its image."""

    record: LayerRecord
    items: list[tuple[bytes, bytes]]


def import_image(store: Store, img: ImageSource, names: list[str], progress: Progress,
                  source: str) -> ImportResult:
    """Read and verify every layer, then make the new layers, the image and its names
    visible in one transaction: a failure anywhere leaves nothing visible (only chunks
    nothing references, which gc removes)."""
    diff_ids: list[str] = []
    prepared: dict[str, PreparedLayer] = {}
    reused = 0
    for i, layer in enumerate(img.layers):
        if layer.diff_id is not None and layer.diff_id in prepared:
            diff_ids.append(layer.diff_id)  # the same layer twice in one image
            continue
        diff_id, new = import_layer(store, layer, progress, f"layer {i + 1}/{len(img.layers)}")
        diff_ids.append(diff_id)
        if new is None:
            reused += 1
        else:
            prepared.setdefault(diff_id, new)
    config = img.config if img.config is not None else make_config(diff_ids, source)
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    rec = ImageRecord(id=image_id, config=config, config_media_type=img.config_media_type
                      if img.config is not None else MT_OCI_CONFIG, diff_ids=diff_ids,
                      manifest=img.manifest, manifest_media_type=img.manifest_media_type,
                      created=time.time(), source=source)

    def publish(txn: Any) -> None:
        for p in prepared.values():
            put_layer(txn, store.env, p.items, p.record)
        put_image(txn, store.env, rec, names)

    store.env.write(publish)
    return ImportResult(image_id, names, len(prepared), reused)


def make_config(diff_ids: list[str], source: str) -> bytes:
    """A minimal OCI image config for a bare layer tar or a directory."""
    os_, arch, variant = host_platform()
    doc: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "layerstore import"}],
    }
    if variant:
        doc["variant"] = variant
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def import_layer(store: Store, layer: LayerSource, progress: Progress,
                 label: str) -> tuple[str, PreparedLayer | None]:
    """Read and verify one layer blob; returns (diff_id, the prepared layer, or None if
    the store has it already). Its chunks are stored; its entries are not yet."""
    env = store.env
    if layer.diff_id is not None:
        key = bytes.fromhex(parse_oci_digest(layer.diff_id)[1])
        with env.read() as txn:
            if txn.get(key, db=env.db("layers")) is not None:
                return layer.diff_id, None
    batch = ChunkBatch(env, store.params)
    cdc = store.params.chunker()
    raw_file = None
    try:
        raw_file = layer.open()
        # The blob as stored is hashed only when it is compressed: for a plain tar the
        # blob digest is the diff_id, hashed once below.
        raw = PeekReader(raw_file, 4)
        compression = detect_compression(raw.head)
        raw_hash: HashingReader | None = None
        if layer.digest and (compression != "none" or not layer.digest.startswith("sha256:")):
            raw_hash = HashingReader(raw, parse_oci_digest(layer.digest)[0])
            raw = raw_hash
        stream, _ = open_layer_stream(raw, layer.what)
        tick = progress(label, layer.size)
        diff_hash = hashlib.sha256()
        # reading, decompressing and both hashes run in a thread of their own
        ahead: Prefetcher | None = None
        try:
            ahead = Prefetcher(stream, diff_hash)
            result = read_layer_tar(ahead, None, batch, cdc, layer.what,
                                    progress=tick if compression == "none" else None)
        finally:
            if ahead is not None:
                ahead.close()
        if raw_hash is not None:
            raw_hash.drain()
        if compression != "none":
            tick(layer.size or 0)
    except BaseException:
        batch.abort()
        raise
    finally:
        if raw_file is not None:
            raw_file.close()
        finish = getattr(layer, "finish", None)
        if finish is not None:
            finish()
    batch.close()
    diff_id = "sha256:" + diff_hash.hexdigest()
    if raw_hash is not None:
        blob_digest, blob_size = raw_hash.digest(), raw_hash.count
    else:
        blob_digest, blob_size = diff_id, result.tar_size
    if layer.digest is not None and blob_digest != layer.digest:
        raise DigestMismatchError(f"{layer.what}: blob digest is {blob_digest}, expected {layer.digest}")
    if layer.size is not None and layer.digest is not None and blob_size != layer.size:
        raise DigestMismatchError(f"{layer.what}: blob is {blob_size} bytes, the manifest says {layer.size}")
    if layer.diff_id is not None and diff_id != layer.diff_id:
        raise DigestMismatchError(f"{layer.what}: diff_id is {diff_id}, the config says {layer.diff_id}")
    if result.tar_size == 0:
        raise InvalidLayerError(f"{layer.what}: empty layer")
    rec = LayerRecord(
        diff_id=diff_id, layer_no=0, tar_size=result.tar_size,
        content_size=result.builder.content_size(), entry_count=len(result.builder.entries),
        tarsplit=result.tarsplit_digest, created=0.0,
        sources=[[layer.media_type, layer.digest or "", blob_size]],
        links=result.builder.link_groups(),
    )
    return diff_id, PreparedLayer(rec, encode_entries(result.builder))
