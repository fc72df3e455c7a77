"""Images and their names.

An image id is ``sha256:<hex>`` of its config blob (what docker and podman show), and
its key in ``images`` is the 32 raw bytes. ``names`` maps ``name:tag`` to an image id.
Names are normalised the way users type them: ``alpine`` means ``alpine:latest``.
"""

from __future__ import annotations

import re

import lmdb

from ..errors import AmbiguousNameError, ImageNotFoundError, UsageError
from .records import ImageRecord
from .txn import Env

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
_HEX_RE = re.compile(r"^(sha256:)?[0-9a-f]{4,64}$")


def normalize_name(name: str) -> str:
    """``alpine`` -> ``alpine:latest``; checks the characters a reference may have."""
    if not name or not _NAME_RE.match(name) or len(name) > 255:
        raise UsageError(f"invalid image name {name!r} (expected NAME[:TAG])")
    last = name.rsplit("/", 1)[-1]
    if "@" in name:
        return name
    if ":" not in last:
        name += ":latest"
    return name


def image_key(image_id: str) -> bytes:
    return bytes.fromhex(image_id.split(":", 1)[1])


def get_image(txn: lmdb.Transaction, env: Env, image_id: str) -> ImageRecord | None:
    value = txn.get(image_key(image_id), db=env.db("images"))
    return ImageRecord.decode(value) if value is not None else None


def all_images(txn: lmdb.Transaction, env: Env) -> list[ImageRecord]:
    with txn.cursor(db=env.db("images")) as cur:
        return [ImageRecord.decode(v) for _, v in cur]


def names_of(txn: lmdb.Transaction, env: Env) -> dict[str, list[str]]:
    """image id -> its names, sorted."""
    out: dict[str, list[str]] = {}
    with txn.cursor(db=env.db("names")) as cur:
        for k, v in cur:
            out.setdefault(v.decode(), []).append(k.decode())
    return out


def resolve(txn: lmdb.Transaction, env: Env, ref: str) -> ImageRecord:
    """An image by ``name[:tag]``, full id, or a unique id prefix (4+ hex digits)."""
    names_db = env.db("names")
    try:
        name = normalize_name(ref)
    except UsageError:
        name = None
    if name is not None:
        value = txn.get(name.encode(), db=names_db)
        if value is not None:
            rec = get_image(txn, env, value.decode())
            if rec is not None:
                return rec
    if _HEX_RE.match(ref):
        prefix = ref.split(":", 1)[-1]
        found = [r for r in all_images(txn, env) if r.id.split(":", 1)[1].startswith(prefix)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise AmbiguousNameError(f"image id prefix {ref!r} is ambiguous")
    raise ImageNotFoundError(f"no such image: {ref}")


def put_image(txn: lmdb.Transaction, env: Env, rec: ImageRecord, names: list[str]) -> None:
    """Store an image (idempotent) and point ``names`` at it. Requires a write txn."""
    key = image_key(rec.id)
    if txn.get(key, db=env.db("images")) is None:
        txn.put(key, rec.encode(), db=env.db("images"))
    for n in names:
        txn.put(n.encode(), rec.id.encode(), db=env.db("names"))
