"""Import one uncompressed layer tar stream into the store, keeping its header stream.

Headers are parsed by ``_fast_member`` for the common case (ustar/GNU/PAX headers of
plain files, directories, links, devices and FIFOs, GNU long names, PAX records this
module knows), with the same checks as the standard library's ``tarfile``; at anything
else (sparse files, global PAX headers, base-256 numbers, unknown PAX keys, a bad
checksum, a truncated or malformed header) ``tarfile`` takes over from that member in
stream mode, and raises what it raises. Every byte passes through a ``TarSplitter``:

- all bytes are hashed with sha256 (the diff_id), unless the caller's stream does it
  (``streams.Prefetcher``, the importer's case);
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
import re
import struct
import tarfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..digest import blake3_raw
from ..errors import InvalidLayerError
from ..store.chunks import ChunkBatch, FileWriter
from ..store.layers import LayerBuilder, normalize_member_name
from ..store.records import BLK, CHR, DIR, FIFO, REG, SYMLINK, Entry, FileRecord
from ..store.tarsplit import file_frame, raw_frame_header

#: A whiteout: ``.wh.NAME`` deletes NAME from the layers below (OCI layer.md).
WHITEOUT_PREFIX = b".wh."
#: The opaque marker: hides all lower children of the directory it is in.
OPAQUE_MARKER = b".wh..wh..opq"

TAR_BUFSIZE = 1 << 20
READ_AHEAD = 1 << 20
FRAMES_FLUSH = 1 << 20
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)


class TarSplitter:
    """Seekable-forward view of the uncompressed stream for ``tarfile``: hashes every
    byte and sends non-payload bytes to the header stream (see the module docstring).

    ``tarfile`` (mode ``r:``) reads headers block by block and seeks forward over file
    data; file data itself is read here with ``copy_payload``, straight from the source
    into a ``FileWriter``, without passing through ``tarfile``'s buffers.
    """

    def __init__(self, raw: Any, hasher: Any | None, tarsplit: FileWriter):
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
        #: header-stream frames not yet handed to ``out`` (one write per ~1 MiB, not two
        #: per member)
        self.frames = bytearray()

    def _fill(self, n: int) -> bytes:
        data = self.raw.read(n)
        while 0 < len(data) < n:  # a short read is not the end of the stream
            more = self.raw.read(n - len(data))
            if not more:
                break
            data += more
        if data and self.hasher is not None:
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

    # -- for the fast header reader: look at bytes before taking them ------------------

    def window(self, n: int) -> tuple[bytes, int] | None:
        """The next ``n`` bytes without taking them: (buffer, offset in it), or None if
        the stream ends first."""
        avail = len(self.ahead) - self.ahead_off
        if avail < n:
            more = self._fill(max(READ_AHEAD, n - avail))
            self.ahead = self.ahead[self.ahead_off:] + more if avail else more
            self.ahead_off = 0
            if len(self.ahead) < n:
                return None
        return self.ahead, self.ahead_off

    def take(self, n: int) -> None:
        """Take ``n`` bytes seen with ``window`` as verbatim (header) bytes."""
        off = self.ahead_off
        self.pending += memoryview(self.ahead)[off:off + n]
        self.ahead_off = off + n
        self.pos += n

    def small_file(self, size: int, batch: ChunkBatch) -> tuple[bytes, int] | None:
        """Store the next ``size`` bytes (already in the window) as a one-chunk file,
        hashed once (a file smaller than the minimum chunk is its own chunk); returns
        (digest, size) as ``FileWriter.close`` would."""
        self._raw(self.pending)
        self.pending = bytearray()
        off = self.ahead_off
        data = self.ahead[off:off + size]
        self.ahead_off = off + size
        self.pos += size
        self.cut = self.pos
        digest = blake3_raw(data)
        if size:
            batch.add_chunk(digest, data)
        batch.add_file(digest, FileRecord(size, [(digest, size)] if size else []))
        self.file_ref(digest, size)
        return digest, size

    def _raw(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            frames = self.frames
            frames += raw_frame_header(len(data))
            frames += data
            if len(frames) >= FRAMES_FLUSH:
                self.flush_frames()

    def flush_frames(self) -> None:
        self.out.write(self.frames)
        self.frames = bytearray()

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
        self.frames += file_frame(digest, size)

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
        self.flush_frames()


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


def _add_xattr(xattrs: dict[bytes, bytes], key: bytes, value: bytes) -> None:
    """Record one PAX record if it is an xattr (``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*``)."""
    if key.startswith(b"SCHILY.xattr."):
        xattrs[key[len(b"SCHILY.xattr."):]] = value
    elif key.startswith(b"LIBARCHIVE.xattr."):
        name = urllib.parse.unquote_to_bytes(key[len(b"LIBARCHIVE.xattr."):])
        try:
            xattrs[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
        except ValueError:
            raise InvalidLayerError("malformed LIBARCHIVE.xattr record") from None


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
                _add_xattr(xattrs, key, value)
        elif typeflag not in (b"L", b"K", b"g"):
            break
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return xattrs


# --- the fast header reader -------------------------------------------------------------

#: name mode uid gid size mtime chksum typeflag linkname magic version uname gname
#: devmajor devminor prefix (POSIX ustar; GNU uses the same offsets for these fields)
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
#: types whose data follows the header (tarfile's REGULAR_TYPES without GNU sparse)
_REGULAR = (b"0", b"\0", b"7")
#: other types this reader takes; tarfile does not skip data after them, so they must
#: have size 0 here
_OTHER = (b"1", b"2", b"3", b"4", b"5", b"6")
#: PAX keys the reader understands (tarfile's PAX_FIELDS and the times); xattrs too
_PAX_KEYS = frozenset((b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime",
                       b"ctime", b"uname", b"gname"))
#: longer GNU long names or PAX headers go through tarfile
_MAX_EXT = 1 << 20
#: mode, uid, gid, size, mtime and checksum (header bytes 100-156) as GNU tar and tarfile
#: write them: zero-padded octal ending in NUL; the checksum as 6 digits, NUL, space (or
#: 7 digits and NUL or space). Parsed with int() they give what tarfile.nti gives; any
#: other spelling goes through ``_oct``.
_NUMBERS = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0"
                      rb"([0-7]{6}\0 |[0-7]{7}[\0 ])")
_ZERO_NUMBERS = frozenset((bytes(8), b"0000000\0", b"0000000 "))


class Member:
    """One tar member as the importer needs it: names as bytes, mtime in ns."""

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "info",
        "linkname",
        "mode",
        "mtime_ns",
        "name",
        "size",
        "type",
        "uid",
        "xattrs",
    )

    def __init__(self, name: bytes, linkname: bytes, type_: bytes, mode: int, uid: int,
                 gid: int, size: int, mtime_ns: int, devmajor: int, devminor: int,
                 xattrs: dict[bytes, bytes], info: tarfile.TarInfo | None = None):
        self.name, self.linkname, self.type = name, linkname, type_
        self.mode, self.uid, self.gid, self.size, self.mtime_ns = mode, uid, gid, size, mtime_ns
        self.devmajor, self.devminor, self.xattrs = devmajor, devminor, xattrs
        self.info = info  #: the TarInfo when tarfile read it (sparse files need it)

    def show(self) -> str:
        return repr(self.name.decode("utf-8", "surrogateescape"))


class _Fallback(Exception):
    """The fast reader does not take this member: tarfile reads it."""


_END = object()


def _nts(field: bytes) -> bytes:
    i = field.find(b"\0")
    return field if i < 0 else field[:i]


def _oct(field: bytes) -> int:
    """tarfile.nti for octal fields; base-256 and anything invalid fall back."""
    if field[:1] in (b"\x80", b"\xff"):
        raise _Fallback
    try:
        return int(_nts(field).strip() or b"0", 8)
    except ValueError:
        raise _Fallback from None


def _pax_strict(body: bytes) -> list[tuple[bytes, bytes]]:
    """PAX records, framed as tarfile checks them; anything odd falls back."""
    out = []
    pos, n = 0, len(body)
    while pos < n and body[pos] != 0:
        sp = body.find(b" ", pos, pos + 21)
        if sp <= pos or not body[pos:sp].isdigit():
            raise _Fallback
        length = int(body[pos:sp])
        end = pos + length - 1  # the newline
        if length < 5 or pos + length > n or body[end] != 0x0A:
            raise _Fallback
        key, eq, value = body[sp + 1:end].partition(b"=")
        if not key or not eq:
            raise _Fallback
        out.append((key, value))
        pos += length
    return out


def _fast_member(tee: TarSplitter) -> Member | object:
    """Parse the next member's headers from the read-ahead window and take them.

    Returns a ``Member`` (its data not yet read), ``_END`` at the end-of-archive block,
    or raises ``_Fallback`` with nothing taken when tarfile must read this member."""
    win = tee.window(BLOCK)
    if win is None:
        raise _Fallback
    buf, start = win
    if buf[start:start + BLOCK] == ZERO_BLOCK:
        return _END
    off = start
    longname = longlink = None
    pax: list[tuple[bytes, bytes]] | None = None
    while True:
        (name, mode, uid, gid, size, mtime, chksum, typ, linkname, _magic, _version,
         _uname, _gname, devmajor, devminor, prefix) = _HEADER.unpack_from(buf, off)
        nums = _NUMBERS.match(buf, off + 100)
        if nums is not None:  # as GNU tar and tarfile write them
            mode_i, uid_i, gid_i, size_i, mtime_i, chk_i = (
                int(nums[1], 8), int(nums[2], 8), int(nums[3], 8), int(nums[4], 8),
                int(nums[5], 8), int(nums[6][:7].rstrip(b"\0 "), 8))
        else:
            mode_i, uid_i, gid_i, size_i, mtime_i, chk_i = (
                _oct(mode), _oct(uid), _oct(gid), _oct(size), _oct(mtime), _oct(chksum))
        if sum(buf[off:off + BLOCK]) - sum(chksum) + 256 != chk_i:
            raise _Fallback  # tarfile also accepts the signed sum, or says "bad checksum"
        major = 0 if devmajor in _ZERO_NUMBERS else _oct(devmajor)
        minor = 0 if devminor in _ZERO_NUMBERS else _oct(devminor)
        if typ in (b"L", b"K", b"x"):
            blocks = -(-size_i // BLOCK) * BLOCK
            if size_i > _MAX_EXT:
                raise _Fallback
            need = off - start + BLOCK + blocks + BLOCK
            win = tee.window(need)
            if win is None:
                raise _Fallback
            buf, start = win
            off = start + need - BLOCK - blocks
            body = buf[off:off + blocks]
            off += blocks
            if typ == b"x":
                if pax is not None or b"hdrcharset=" in body:
                    raise _Fallback
                pax = _pax_strict(body)
            elif typ == b"L":
                if longname is not None:
                    raise _Fallback
                longname = _nts(body)
            else:
                if longlink is not None:
                    raise _Fallback
                longlink = _nts(body)
            if buf[off:off + BLOCK] == ZERO_BLOCK:
                raise _Fallback  # tarfile: "unexpected end"-style errors
            continue
        break
    # The name as tarfile makes it (frombuf, then _proc_gnulong / _apply_pax_info).
    name_b = name.partition(b"\0")[0]
    if typ == b"\0" and name_b.endswith(b"/"):
        typ = b"5"  # old V7 directory
    if typ == b"5":
        name_b = name_b.rstrip(b"/")
    prefix_b = prefix.partition(b"\0")[0]
    if prefix_b:
        name_b = prefix_b + b"/" + name_b
    link_b = linkname.partition(b"\0")[0]
    mtime_ns = mtime_i * 1_000_000_000
    xattrs: dict[bytes, bytes] = {}
    if pax is not None:
        # tarfile applies the PAX header after the long name of an inner L/K header;
        # both together are rare: let tarfile order them.
        if longname is not None or longlink is not None:
            raise _Fallback
        for key, value in pax:
            if key in _PAX_KEYS:
                if key == b"path":
                    name_b = value.rstrip(b"/")
                elif key == b"linkpath":
                    link_b = value
                elif key == b"size":
                    size_i = _pax_int(value)
                elif key == b"uid":
                    uid_i = _pax_int(value)
                elif key == b"gid":
                    gid_i = _pax_int(value)
                elif key == b"mtime":
                    mtime_ns = _pax_ns(value)
            elif key.startswith((b"SCHILY.xattr.", b"LIBARCHIVE.xattr.")):
                _add_xattr(xattrs, key, value)
            else:
                raise _Fallback  # GNU.sparse.*, hdrcharset, ...: tarfile's business
    else:
        if longname is not None:
            name_b = longname[:-1] if typ == b"5" and longname.endswith(b"/") else longname
        if longlink is not None:
            link_b = longlink
    if typ not in _REGULAR and (typ not in _OTHER or size_i != 0):
        raise _Fallback
    tee.take(off + BLOCK - start)
    return Member(name_b, link_b, typ, mode_i, uid_i, gid_i, size_i, mtime_ns, major, minor,
                  xattrs)


def _pax_int(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise _Fallback from None  # tarfile makes it 0


def _pax_ns(value: bytes) -> int:
    try:
        d = Decimal(value.decode("ascii"))
    except (ArithmeticError, ValueError):
        raise _Fallback from None
    if not d.is_finite():
        raise _Fallback
    return int(d * 1_000_000_000)


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


def _from_tarinfo(m: tarfile.TarInfo, tee: TarSplitter) -> Member:
    xattrs = {}
    if any(k.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")) for k in m.pax_headers):
        xattrs = raw_xattrs(tee.peek(m.offset, m.offset_data))
    type_ = b"S" if m.isreg() and getattr(m, "sparse", None) is not None else m.type
    if m.isreg() and type_ != b"S":
        type_ = b"0"
    return Member(_b(m.name), _b(m.linkname), type_, m.mode, m.uid, m.gid, m.size,
                  _mtime_ns(m), m.devmajor, m.devminor, xattrs, m)


_TYPES = {b"2": SYMLINK, b"5": DIR, b"3": CHR, b"4": BLK, b"6": FIFO}


def read_layer_tar(
    stream: Any,
    diff_hasher: Any | None,
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
    small = cdc.min_size
    last_pos = 0
    tf: Any = None  #: tarfile, while it reads the members the fast reader does not take
    next_header = 0  #: where the next member's headers start
    try:
        while True:
            if tf is None:
                if tee.pos < next_header:
                    win = tee.window(next_header - tee.pos)
                    if win is None:
                        tee.seek(next_header)  # short: tarfile reports the truncation
                    else:
                        tee.take(next_header - tee.pos)
                try:
                    m = _fast_member(tee)
                except _Fallback:
                    tf = tarfile.open(fileobj=tee, mode="r:",  # type: ignore[call-overload]
                                      encoding="utf-8", errors="surrogateescape")
                    if tf.firstmember is None:  # what it read ends the members
                        members_end = tf.offset
                        break
                    continue
                if m is _END:
                    members_end = tee.pos
                    break
                assert isinstance(m, Member)
            else:
                info = tf.next()
                if info is None:
                    members_end = tf.offset
                    break
                tf.members.clear()  # tarfile keeps every member; we do not need them
                m = _from_tarinfo(info, tee)
            name = normalize_member_name(m.name)
            parent, _, base = name.rpartition(b"/")
            parent = parent or b"/"
            if base.startswith(WHITEOUT_PREFIX):
                # Whiteouts first: a whiteout may itself be stored as a hard link.
                if base == OPAQUE_MARKER:
                    builder.opaque(parent)
                else:
                    victim = base[len(WHITEOUT_PREFIX):]
                    if victim in (b"", b".", b".."):
                        raise InvalidLayerError(f"whiteout {m.show()} has no valid name")
                    builder.whiteout((b"" if parent == b"/" else parent) + b"/" + victim)
                if tf is None and m.type in _REGULAR and m.size:
                    # a whiteout's data (there should be none) stays in the header stream
                    next_header = tee.pos + -(-m.size // BLOCK) * BLOCK
                elif tf is None:
                    next_header = tee.pos
            else:
                entry = Entry(REG, mode=m.mode & 0o7777, uid=m.uid, gid=m.gid,
                              mtime_ns=m.mtime_ns, xattrs=m.xattrs)
                typ = m.type
                if typ in _REGULAR:
                    if tf is None and m.size < small and tee.window(m.size) is not None:
                        digest, size = tee.small_file(m.size, batch)
                    else:
                        fw = FileWriter(batch, cdc)
                        tee.copy_payload(m.size, fw, what)
                        digest, rec = fw.close()
                        size = rec.size
                        tee.file_ref(digest, size)
                    entry.size, entry.digest = size, digest
                    builder.add(name, entry)
                elif typ == b"S":
                    # Sparse: the data area (map + data blocks) stays verbatim in the
                    # header stream; the logical content (holes as zeros) is stored.
                    fw = FileWriter(batch, cdc)
                    f = tf.extractfile(m.info)
                    assert f is not None
                    while True:
                        data = f.read(TAR_BUFSIZE)
                        if not data:
                            break
                        fw.write(data)
                    digest, rec = fw.close()
                    if rec.size != m.size:
                        raise InvalidLayerError(f"{what}: truncated tar (in {m.show()})")
                    entry.size, entry.digest = rec.size, digest
                    builder.add(name, entry)
                elif typ == b"1":
                    builder.hardlink(name, normalize_member_name(m.linkname))
                elif typ in _TYPES:
                    entry.type = _TYPES[typ]
                    if typ == b"2":
                        entry.target = m.linkname
                    elif typ in (b"3", b"4"):
                        entry.rdev = (m.devmajor, m.devminor)
                    builder.add(name, entry)
                else:
                    raise InvalidLayerError(
                        f"{what}: entry {m.show()} has unsupported type {typ!r}")
                if tf is None:
                    next_header = tee.pos + (-m.size % BLOCK if typ in _REGULAR else 0)
            if tf is not None and not tf.pax_headers:
                # tarfile read this member; the fast reader takes the next one (unless a
                # global PAX header is in force: then tarfile reads to the end)
                next_header, tf = tf.offset, None
            if progress is not None and tee.pos - last_pos > (8 << 20):
                progress(tee.pos - last_pos)
                last_pos = tee.pos
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
