"""The tar header stream of a layer: its framing, written and read in one place.

A layer's header stream holds every byte of its uncompressed tar that is not regular-file
data, in order, with a reference to the file's content where the data stood:

- ``b"R" + u32 length + bytes``: bytes kept verbatim (headers, PAX records, padding,
  sparse data areas, the end-of-archive blocks);
- ``b"F" + 32-byte blake3 + u64 size``: the content of a file in ``files``.

The stream is stored as a chunked file itself. Replaying it rebuilds the tar byte for
byte (the idea of containers/storage's tar-split).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator

from ..digest import DIGEST_SIZE

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def raw_frame_header(length: int) -> bytes:
    return b"R" + _U32.pack(length)


def file_frame(digest: bytes, size: int) -> bytes:
    return b"F" + digest + _U64.pack(size)


def iter_frames(data: Iterable[bytes]) -> Iterator[tuple[bytes, bytes | None, int]]:
    """Parse a header stream: yields ``(verbatim_bytes, None, 0)`` pieces and
    ``(b"", digest, size)`` file references, in order. Raises ValueError if malformed."""
    buf = bytearray()
    it = iter(data)

    def need(n: int) -> bool:
        while len(buf) < n:
            try:
                buf.extend(next(it))
            except StopIteration:
                return False
        return True

    while need(1):
        tag = buf[0]
        if tag == 0x52:  # R
            if not need(5):
                raise ValueError("truncated header stream")
            (n,) = _U32.unpack_from(buf, 1)
            del buf[:5]
            while n > 0:
                if not buf and not need(1):
                    raise ValueError("truncated header stream")
                take = min(n, len(buf))
                yield bytes(buf[:take]), None, 0
                del buf[:take]
                n -= take
        elif tag == 0x46:  # F
            if not need(1 + DIGEST_SIZE + 8):
                raise ValueError("truncated header stream")
            digest = bytes(buf[1:1 + DIGEST_SIZE])
            (size,) = _U64.unpack_from(buf, 1 + DIGEST_SIZE)
            del buf[:1 + DIGEST_SIZE + 8]
            yield b"", digest, size
        else:
            raise ValueError(f"bad header stream tag {tag}")


def replay(data: Iterable[bytes], read_file: Callable[[bytes], Iterable[bytes]]) -> Iterator[bytes]:
    """The tar's bytes, in order: verbatim pieces and file contents (``read_file``)."""
    for raw, digest, size in iter_frames(data):
        if digest is None:
            yield raw
            continue
        got = 0
        for part in read_file(digest):
            got += len(part)
            yield part
        if got != size:
            raise ValueError("a file's size differs from the header stream")
