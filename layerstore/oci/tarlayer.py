"""Import one uncompressed layer tar stream into the store, keeping its header stream.

The tar is parsed with the standard library's ``tarfile`` in stream mode (ustar, GNU,
PAX, long names, sparse files). Every byte passes through a ``TarSplitter``:

- all bytes are hashed with sha256 (the diff_id);
- a regular file's data is cut into chunks and stored by content (``FileWriter``);
- every other byte (headers, PAX records, padding, sparse data areas, the end-of-archive
  blocks) goes verbatim into the layer's *tar header stream*, with a reference to the
  file content where the data stood.

Replaying the header stream rebuilds the uncompressed tar byte for byte (the idea of
containers/storage's tar-split), so ``export`` reproduces the diff_id.

The header stream's framing is in ``store/tarsplit.py``.

xattrs come from the raw PAX records (``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*``)
because ``tarfile`` decodes non-name PAX values as UTF-8 with replacement, which would
corrupt binary values such as ``security.capability``.
"""

from __future__ import annotations

import base64
import tarfile
import urllib.parse
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

from ..errors import InvalidLayerError
from ..store.chunks import ChunkBatch, FileWriter
from ..store.layers import LayerBuilder, normalize_member_name
from ..store.records import BLK, CHR, DIR, FIFO, REG, SYMLINK, Entry
from ..store.tarsplit import file_frame, raw_frame_header

#: A whiteout: ``.wh.NAME`` deletes NAME from the layers below (OCI layer.md).
WHITEOUT_PREFIX = b".wh."
#: The opaque marker: hides all lower children of the directory it is in.
OPAQUE_MARKER = b".wh..wh..opq"

TAR_BUFSIZE = 1 << 20
READ_AHEAD = 64 << 10
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)


class TarSplitter:
    """Seekable-forward view of the uncompressed stream for ``tarfile``: hashes every
    byte and sends non-payload bytes to the header stream (see the module docstring).

    ``tarfile`` (mode ``r:``) reads headers block by block and seeks forward over file
    data; file data itself is read here with ``copy_payload``, straight from the source
    into a ``FileWriter``, without passing through ``tarfile``'s buffers.
    """

    def __init__(self, raw: Any, hasher: Any, tarsplit: FileWriter):
        self.raw = raw
        self.hasher = hasher
        self.out = tarsplit
        self.pos = 0  #: offset of the next byte
        self.cut = 0  #: every byte before this is accounted for
        self.pending = bytearray()  #: bytes [cut, pos), not yet classified
        self.size = 0
        #: read-ahead: bytes [pos, pos + len(ahead) - ahead_off) read from the source
        #: (and hashed) but not handed out yet. Headers are read 512 bytes at a time;
        #: serving them from here saves a trip through the source's layers each time,
        #: and the hash sees big updates.
        self.ahead = b""
        self.ahead_off = 0

    def _fill(self, n: int) -> bytes:
        data = self.raw.read(n)
        while 0 < len(data) < n:  # a short read is not the end of the stream
            more = self.raw.read(n - len(data))
            if not more:
                break
            data += more
        if data:
            self.hasher.update(data)
        return data

    def _pull(self, n: int) -> bytes:
        avail = len(self.ahead) - self.ahead_off
        if avail == 0:
            if n >= READ_AHEAD:
                data = self._fill(n)
                self.pos += len(data)
                return data
            self.ahead, self.ahead_off = self._fill(READ_AHEAD), 0
            avail = len(self.ahead)
            if avail == 0:
                return b""
        if n <= avail:
            data = self.ahead[self.ahead_off:self.ahead_off + n]
            self.ahead_off += n
        else:
            data = self.ahead[self.ahead_off:] + self._fill(n - avail)
            self.ahead, self.ahead_off = b"", 0
        self.pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        data = self._pull(TAR_BUFSIZE if n is None or n < 0 else n)
        self.pending += data
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise InvalidLayerError("tar stream needs a backward seek (unsupported layout)")
        while self.pos < pos:
            if not self.read(min(TAR_BUFSIZE, pos - self.pos)):
                break
        return self.pos

    def seekable(self) -> bool:
        return True

    def peek(self, start: int, end: int) -> bytes:
        """Unclassified bytes [start, end) (a member's raw headers)."""
        return bytes(self.pending[start - self.cut:end - self.cut])

    def _raw(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.out.write(raw_frame_header(len(data)))
            self.out.write(data)

    def copy_payload(self, size: int, fw: FileWriter, what: str) -> None:
        """Bytes [cut, pos) are verbatim; the next ``size`` bytes are file data."""
        self._raw(self.pending)
        self.pending = bytearray()
        remaining = size
        while remaining > 0:
            data = self._pull(min(TAR_BUFSIZE, remaining))
            if not data:
                raise InvalidLayerError(f"{what}: truncated tar")
            fw.write(data)
            remaining -= len(data)
        self.cut = self.pos

    def file_ref(self, digest: bytes, size: int) -> None:
        self.out.write(file_frame(digest, size))

    def finish(self, members_end: int, what: str) -> None:
        """Read to EOF, check the end-of-archive block, flush the verbatim tail."""
        while self.read(TAR_BUFSIZE):
            pass
        self.size = self.pos
        off = members_end - self.cut
        if off < 0 or bytes(self.pending[off:off + BLOCK]) != ZERO_BLOCK:
            raise InvalidLayerError(f"{what}: truncated tar (no end-of-archive block)")
        self._raw(self.pending)
        self.pending = bytearray()
        self.cut = self.pos


@dataclass
class LayerImport:
    """What reading one layer tar produced (not yet visible in the store)."""

    builder: LayerBuilder
    tar_size: int
    tarsplit_digest: bytes


def _pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            break
        if length <= 0:
            break
        rec = data[sp + 1:pos + length - 1]
        key, _, value = rec.partition(b"=")
        out.append((key, value))
        pos += length
    return out


def raw_xattrs(headers: bytes) -> dict[bytes, bytes]:
    """xattrs from the PAX extended headers among a member's raw header blocks."""
    xattrs: dict[bytes, bytes] = {}
    pos = 0
    while pos + BLOCK <= len(headers):
        hdr = headers[pos:pos + BLOCK]
        typeflag = hdr[156:157]
        try:
            size = tarfile.nti(hdr[124:136])
        except (tarfile.InvalidHeaderError, ValueError):
            break
        body = headers[pos + BLOCK:pos + BLOCK + size]
        if typeflag in (b"x", b"X"):
            for key, value in _pax_records(body):
                if key.startswith(b"SCHILY.xattr."):
                    xattrs[key[len(b"SCHILY.xattr."):]] = value
                elif key.startswith(b"LIBARCHIVE.xattr."):
                    name = urllib.parse.unquote_to_bytes(key[len(b"LIBARCHIVE.xattr."):])
                    try:
                        xattrs[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
                    except ValueError:
                        raise InvalidLayerError("malformed LIBARCHIVE.xattr record") from None
        elif typeflag not in (b"L", b"K", b"g"):
            break
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return xattrs


def _mtime_ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except ArithmeticError:
            pass
    return int(m.mtime) * 1_000_000_000


def _b(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def read_layer_tar(
    stream: Any,
    diff_hasher: Any,
    batch: ChunkBatch,
    cdc: Any,
    what: str,
    progress: Callable[[int], None] | None = None,
) -> LayerImport:
    """Read one uncompressed tar stream into chunks and a ``LayerBuilder``.

    Chunks are stored as the batch fills; entries stay in memory until the caller
    verifies the diff_id and writes the layer with ``store.layers.put_layer``.
    """
    tarsplit = FileWriter(batch, cdc)
    tee = TarSplitter(stream, diff_hasher, tarsplit)
    builder = LayerBuilder()
    last_pos = 0
    try:
        tf = tarfile.open(fileobj=tee, mode="r:",  # type: ignore[call-overload]
                          encoding="utf-8", errors="surrogateescape")
        while True:
            m = tf.next()
            if m is None:
                break
            tf.members.clear()  # tarfile keeps every member; we do not need them
            name = normalize_member_name(_b(m.name))
            parent, _, base = name.rpartition(b"/")
            parent = parent or b"/"
            if base.startswith(WHITEOUT_PREFIX):
                # Whiteouts first: a whiteout may itself be stored as a hard link.
                if base == OPAQUE_MARKER:
                    builder.opaque(parent)
                else:
                    victim = base[len(WHITEOUT_PREFIX):]
                    if victim in (b"", b".", b".."):
                        raise InvalidLayerError(f"whiteout {m.name!r} has no valid name")
                    builder.whiteout((b"" if parent == b"/" else parent) + b"/" + victim)
                continue
            xattrs = {}
            if any(k.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")) for k in m.pax_headers):
                xattrs = raw_xattrs(tee.peek(m.offset, m.offset_data))
            entry = Entry(REG, mode=m.mode & 0o7777, uid=m.uid, gid=m.gid,
                          mtime_ns=_mtime_ns(m), xattrs=xattrs)
            if m.isreg():
                fw = FileWriter(batch, cdc)
                if getattr(m, "sparse", None) is None:
                    tee.copy_payload(m.size, fw, what)
                    digest, rec = fw.close()
                    tee.file_ref(digest, rec.size)
                else:
                    # Sparse: the data area (map + data blocks) stays verbatim in the
                    # header stream; the logical content (holes as zeros) is stored.
                    f = tf.extractfile(m)
                    assert f is not None
                    while True:
                        data = f.read(TAR_BUFSIZE)
                        if not data:
                            break
                        fw.write(data)
                    digest, rec = fw.close()
                    if rec.size != m.size:
                        raise InvalidLayerError(f"{what}: truncated tar (in {m.name!r})")
                entry.size, entry.digest = rec.size, digest
                builder.add(name, entry)
            elif m.islnk():
                builder.hardlink(name, normalize_member_name(_b(m.linkname)))
            elif m.issym():
                entry.type, entry.target = SYMLINK, _b(m.linkname)
                builder.add(name, entry)
            elif m.isdir():
                entry.type = DIR
                builder.add(name, entry)
            elif m.ischr() or m.isblk():
                entry.type = CHR if m.ischr() else BLK
                entry.rdev = (m.devmajor, m.devminor)
                builder.add(name, entry)
            elif m.isfifo():
                entry.type = FIFO
                builder.add(name, entry)
            else:
                raise InvalidLayerError(f"{what}: entry {m.name!r} has unsupported type {m.type!r}")
            if progress is not None and tee.pos - last_pos > (8 << 20):
                progress(tee.pos - last_pos)
                last_pos = tee.pos
        members_end = tf.offset
        tee.finish(members_end, what)
    except tarfile.ReadError as exc:
        msg = str(exc)
        if "unexpected end" in msg or "truncated" in msg:
            raise InvalidLayerError(f"{what}: truncated tar") from None
        raise InvalidLayerError(f"{what}: not a valid tar archive ({msg})") from None
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidLayerError(f"{what}: invalid tar ({exc})") from None
    except InvalidLayerError as exc:
        # the path rules in store/layers.py do not know the input: name it here
        if str(exc).startswith(f"{what}: "):
            raise
        raise InvalidLayerError(f"{what}: {exc}") from None
    if progress is not None:
        progress(tee.pos - last_pos)
    ts_digest, _ = tarsplit.close()
    return LayerImport(builder, tee.size, ts_digest)
