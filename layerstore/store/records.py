"""Record types of the store and their compact, versioned binary encodings.

Every value written to LMDB is msgpack (never pickle) whose first element is the record
version, so a later layerstore can read or refuse old records. Keys are raw bytes and
built only by the functions here.

Paths inside a layer are *vpaths*: ``bytes``, absolute (``b"/usr/bin"``), normalised,
with the root as ``b"/"``. Bytes, not str, so names that are not UTF-8 round-trip.
Imports only ``digest`` and ``errors``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..digest import DIGEST_SIZE
from ..errors import IntegrityError

# --- entry types ---------------------------------------------------------------------

REG = 0  #: regular file (content in ``files``/``chunks``)
DIR = 1  #: directory
SYMLINK = 2  #: symbolic link (``target`` verbatim)
CHR = 3  #: character device
BLK = 4  #: block device
FIFO = 5  #: named pipe
WHITEOUT = 6  #: deletes the same path in the layers below (OCI ``.wh.NAME``)

TYPE_NAMES = {REG: "file", DIR: "dir", SYMLINK: "symlink", CHR: "char", BLK: "block",
              FIFO: "fifo", WHITEOUT: "whiteout"}

# --- entry flags ---------------------------------------------------------------------

OPAQUE = 1  #: directory hides all children of the same path in lower layers
IMPLICIT = 2  #: directory not in the tar, made for a child; lower attributes win

ENTRY_VERSION = 1


@dataclass(slots=True)
class Entry:
    """One path in one layer: its type and metadata (one inode, or a whiteout)."""

    type: int
    mode: int = 0o644  #: permission bits incl. setuid/setgid/sticky (no S_IFMT)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0  #: content size for files, 0 otherwise
    rdev: tuple[int, int] = (0, 0)  #: (major, minor) for devices
    target: bytes = b""  #: symlink target, verbatim
    digest: bytes = b""  #: blake3 of the content, for regular files
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    link_group: int = 0  #: >0: entries of a layer with the same group are one inode
    flags: int = 0

    @property
    def opaque(self) -> bool:
        return bool(self.flags & OPAQUE)

    @property
    def implicit(self) -> bool:
        return bool(self.flags & IMPLICIT)

    def encode(self) -> bytes:
        return msgpack.packb(
            [ENTRY_VERSION, self.type, self.mode, self.uid, self.gid, self.mtime_ns,
             self.size, list(self.rdev), self.target, self.digest, self.xattrs,
             self.link_group, self.flags],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        v = _unpack(data, "entry")
        if v[0] != ENTRY_VERSION:
            raise IntegrityError(f"entry record version {v[0]} is not supported")
        return cls(v[1], v[2], v[3], v[4], v[5], v[6], (v[7][0], v[7][1]), v[8], v[9],
                   v[10], v[11], v[12])


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:
        raise IntegrityError(f"corrupt {what} record") from exc


# --- entry keys ----------------------------------------------------------------------
#
# key = layer_no (8 bytes, big endian) + parent + b"\0" + name
#
# All children of one directory share the prefix ``layer_no + parent + b"\0"``, so a
# listing is one range scan and a lookup one get. LMDB keys are at most 511 bytes and a
# name at most 255, so a parent longer than PARENT_INLINE_MAX is replaced by
# b"\xff" + blake3(parent): still one prefix per directory, and never equal to a literal
# parent, which starts with b"/". The root directory's own entry has parent b"" and
# name b"".

LAYER_NO_SIZE = 8
PARENT_INLINE_MAX = 200
NAME_MAX = 255


def layer_prefix(layer_no: int) -> bytes:
    return struct.pack(">Q", layer_no)


def parent_key(parent: bytes) -> bytes:
    if len(parent) <= PARENT_INLINE_MAX:
        return parent
    from ..digest import blake3_raw

    return b"\xff" + blake3_raw(parent)


def split_vpath(vpath: bytes) -> tuple[bytes, bytes]:
    """``b"/a/b"`` -> ``(b"/a", b"b")``; ``b"/a"`` -> ``(b"/", b"a")``; root -> ``(b"", b"")``."""
    if vpath == b"/":
        return b"", b""
    parent, _, name = vpath.rpartition(b"/")
    return (parent or b"/"), name


def entry_key(layer_no: int, vpath: bytes) -> bytes:
    parent, name = split_vpath(vpath)
    return layer_prefix(layer_no) + parent_key(parent) + b"\0" + name


def children_prefix(layer_no: int, dir_vpath: bytes) -> bytes:
    return layer_prefix(layer_no) + parent_key(dir_vpath) + b"\0"


def join_vpath(parent: bytes, name: bytes) -> bytes:
    return (b"" if parent == b"/" else parent) + b"/" + name


# --- file content --------------------------------------------------------------------

_CHUNK_REF = struct.Struct(f">{DIGEST_SIZE}sI")
FILE_VERSION = 1


@dataclass(slots=True)
class FileRecord:
    """A file's content: its size and the ordered list of (chunk digest, length)."""

    size: int
    chunks: list[tuple[bytes, int]]

    def encode(self) -> bytes:
        body = b"".join(_CHUNK_REF.pack(d, n) for d, n in self.chunks)
        return struct.pack(">BQ", FILE_VERSION, self.size) + body

    @classmethod
    def decode(cls, data: bytes) -> FileRecord:
        if len(data) < 9 or data[0] != FILE_VERSION or (len(data) - 9) % _CHUNK_REF.size:
            raise IntegrityError("corrupt file record")
        (size,) = struct.unpack_from(">Q", data, 1)
        return cls(size, list(_CHUNK_REF.iter_unpack(bytes(data[9:]))))


# --- layers, images, containers ------------------------------------------------------

LAYER_VERSION = 1
#: a layer record that lists its hard-link groups (``LayerRecord.links``, session 17):
#: an older layerstore refuses it with a one-line error instead of misreading it
LAYER_VERSION_LINKS = 2


@dataclass(slots=True)
class LayerRecord:
    """An imported layer. Key: the diff_id's raw sha256 (32 bytes)."""

    diff_id: str  #: sha256:<hex> of the uncompressed tar
    layer_no: int  #: the prefix of this layer's keys in ``entries``
    tar_size: int  #: bytes of the uncompressed tar
    content_size: int  #: sum of regular file sizes (hard links once)
    entry_count: int
    tarsplit: bytes  #: blake3 of the tar header stream (a ``files`` record)
    created: float
    sources: list[list[Any]] = field(default_factory=list)  #: [media type, digest, size] seen
    #: the layer's hard-link groups: group (``Entry.link_group``) -> its paths, so that
    #: a mount knows a hard link's count without walking the layer; None in records
    #: written before session 17 (the mount walks the layer then, once)
    links: dict[int, list[bytes]] | None = None

    def encode(self) -> bytes:
        fields = [LAYER_VERSION, self.diff_id, self.layer_no, self.tar_size,
                  self.content_size, self.entry_count, self.tarsplit, self.created,
                  self.sources]
        if self.links is not None:  # version 2 (a version-1 reader refuses it cleanly)
            fields[0] = LAYER_VERSION_LINKS
            fields.append(self.links)
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> LayerRecord:
        v = _unpack(data, "layer")
        if v[0] == LAYER_VERSION and len(v) == 9:
            return cls(*v[1:])
        if v[0] == LAYER_VERSION_LINKS and len(v) == 10 and isinstance(v[9], dict):
            return cls(*v[1:])
        raise IntegrityError(f"layer record version {v[0]} is not supported"
                             if v[0] not in (LAYER_VERSION, LAYER_VERSION_LINKS)
                             else "corrupt layer record")


IMAGE_VERSION = 1


@dataclass(slots=True)
class ImageRecord:
    """An image. Key: the config's sha256 (32 raw bytes); its id is ``sha256:<hex>``."""

    id: str
    config: bytes  #: the config blob, byte for byte as imported
    config_media_type: str
    diff_ids: list[str]  #: base first
    manifest: bytes  #: the manifest as imported (b"" if there was none)
    manifest_media_type: str
    created: float
    source: str = ""  #: what it was imported from (for humans)

    def encode(self) -> bytes:
        return msgpack.packb(
            [IMAGE_VERSION, self.id, self.config, self.config_media_type, self.diff_ids,
             self.manifest, self.manifest_media_type, self.created, self.source],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> ImageRecord:
        v = _unpack(data, "image")
        if v[0] != IMAGE_VERSION:
            raise IntegrityError(f"image record version {v[0]} is not supported")
        return cls(*v[1:])


CONTAINER_VERSION = 1


@dataclass(slots=True)
class ContainerRecord:
    """A container: an image plus its own upper and work directories."""

    id: str  #: 64 hex characters
    name: str
    image_id: str
    created: float
    upper: str = ""  #: host path of the upper directory
    work: str = ""  #: host path of the work directory

    def encode(self) -> bytes:
        return msgpack.packb(
            [CONTAINER_VERSION, self.id, self.name, self.image_id, self.created,
             self.upper, self.work],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> ContainerRecord:
        v = _unpack(data, "container")
        if v[0] != CONTAINER_VERSION:
            raise IntegrityError(f"container record version {v[0]} is not supported")
        return cls(*v[1:])
