"""Export images as OCI image layouts (a directory or a tar).

Each layer is rebuilt from its tar header stream and its files' chunks, byte for byte
the uncompressed tar that was imported: its sha256 is the diff_id (checked while it is
written; a difference is store damage). Layers are written uncompressed
(``application/vnd.oci.image.layer.v1.tar``), so the blob digest equals the diff_id and
the image config is written back unchanged: the image keeps its id. The manifest and
index are new (the original manifest named compressed blobs that cannot be reproduced).

Output appears whole or not at all: it is written beside the destination under a
temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import IntegrityError, UsageError
from ..store import Store
from ..store.chunks import iter_file_data
from ..store.images import names_of, resolve
from ..store.records import LayerRecord
from ..store.tarsplit import replay
from .sources import MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_LAYER, MT_OCI_MANIFEST

CONTAINERD_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"


def get_layer(store: Store, diff_id: str) -> LayerRecord:
    key = bytes.fromhex(diff_id.split(":", 1)[1])
    with store.env.read() as txn:
        value = txn.get(key, db=store.env.db("layers"))
    if value is None:
        raise IntegrityError(f"layer {diff_id} is missing from the store")
    return LayerRecord.decode(value)


def layer_tar(store: Store, rec: LayerRecord) -> Iterator[bytes]:
    """The uncompressed layer tar, rebuilt byte for byte."""
    env = store.env
    try:
        yield from replay(iter_file_data(env, rec.tarsplit), lambda d: iter_file_data(env, d))
    except ValueError as exc:
        raise IntegrityError(f"layer {rec.diff_id}: damaged header stream ({exc})") from None


def _checked(chunks: Iterator[bytes], rec: LayerRecord) -> Iterator[bytes]:
    h = hashlib.sha256()
    n = 0
    for c in chunks:
        h.update(c)
        n += len(c)
        yield c
    if "sha256:" + h.hexdigest() != rec.diff_id or n != rec.tar_size:
        raise IntegrityError(f"layer {rec.diff_id} does not rebuild to its diff_id (store damaged)")


def _desc(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None) -> dict:
    d: dict = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = annotations
    return d


def export_image(store: Store, ref: str, dest: Path, *,
                 progress: Callable[[str, int | None], Callable[[int], None]] | None = None) -> str:
    """Write image ``ref`` as an OCI layout at ``dest`` (a ``.tar`` name: a tar)."""
    with store.env.read() as txn:
        img = resolve(txn, store.env, ref)
        names = names_of(txn, store.env).get(img.id, [])
    layers = [get_layer(store, d) for d in img.diff_ids]
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": _desc(MT_OCI_CONFIG, img.id, len(img.config)),
        "layers": [_desc(MT_OCI_LAYER, r.diff_id, r.tar_size) for r in layers],
    }, indent=2).encode()
    mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    descs = []
    for name in names or [None]:
        ann = None
        if name:
            ann = {CONTAINERD_NAME: name, REF_NAME: name.rsplit(":", 1)[-1]}
        descs.append(_desc(MT_OCI_MANIFEST, mdigest, len(manifest), ann))
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": descs},
                       indent=2).encode()
    small = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": index,
        f"blobs/sha256/{mdigest.split(':')[1]}": manifest,
        f"blobs/sha256/{img.id.split(':')[1]}": img.config,
    }
    progress = progress or (lambda label, total: (lambda n: None))
    dest = Path(dest)
    if os.path.lexists(dest) and not (dest.is_dir() and not any(dest.iterdir())):
        raise UsageError(f"{dest} already exists")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{parent} is not a directory")
    as_tar = dest.name.endswith(".tar")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=parent))
    try:
        if as_tar:
            tmp_tar = tmp / "out.tar"
            with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as tf:
                for d in ("blobs", "blobs/sha256"):
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                    tf.addfile(ti)
                for name, data in small.items():
                    _tar_add(tf, name, len(data), iter([data]))
                for i, r in enumerate(layers):
                    tick = progress(f"layer {i + 1}/{len(layers)}", r.tar_size)
                    _tar_add(tf, f"blobs/sha256/{r.diff_id.split(':')[1]}", r.tar_size,
                             _ticking(_checked(layer_tar(store, r), r), tick))
            os.rename(tmp_tar, dest)
            shutil.rmtree(tmp)
        else:
            (tmp / "blobs/sha256").mkdir(parents=True)
            for name, data in small.items():
                (tmp / name).write_bytes(data)
            for i, r in enumerate(layers):
                tick = progress(f"layer {i + 1}/{len(layers)}", r.tar_size)
                with open(tmp / "blobs/sha256" / r.diff_id.split(":")[1], "wb") as f:
                    for c in _ticking(_checked(layer_tar(store, r), r), tick):
                        f.write(c)
            if dest.is_dir():
                dest.rmdir()
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return img.id


def _ticking(chunks: Iterator[bytes], tick: Callable[[int], None]) -> Iterator[bytes]:
    for c in chunks:
        tick(len(c))
        yield c


class _IterReader:
    def __init__(self, chunks: Iterator[bytes]):
        self.it = chunks
        self.buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            try:
                self.buf += next(self.it)
            except StopIteration:
                break
        if n < 0:
            data, self.buf = self.buf, b""
        else:
            data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _tar_add(tf: tarfile.TarFile, name: str, size: int, chunks: Iterator[bytes]) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o644, int(time.time())
    reader = _IterReader(chunks)
    tf.addfile(ti, reader)  # type: ignore[arg-type]
    # drain so the digest check at the end of the iterator runs
    if reader.read(1):
        raise IntegrityError(f"{name}: more data than its recorded size")
