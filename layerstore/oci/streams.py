"""Byte streams for importing: hashing, decompression by magic bytes, tar splitting.

- ``HashingReader`` counts and hashes what passes through it (blob digests, diff_ids).
- ``Prefetcher`` runs a reader chain (file, blob hash, decompression) and the diff_id's
  sha256 in a thread of its own, a few MiB ahead of the tar reader.
- ``open_layer_stream`` detects gzip / zstd / plain by magic bytes and returns a reader of
  the uncompressed tar. Decompression is streaming and strict: a stream that ends in the
  middle of a gzip member or zstd frame raises ``InvalidLayerError`` (python-zstandard's
  ``stream_reader`` would silently stop, so frames are driven here with decompressobj).
  Multi-member gzip and zstd skippable frames (eStargz, zstd:chunked) are read through.

Nothing here touches the store.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from typing import Any, BinaryIO

import zstandard

from ..errors import InvalidLayerError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_SIZE = 1 << 20


def detect_compression(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class HashingReader:
    """Read-through that hashes (sha256 or sha512) and counts every byte."""

    def __init__(self, raw: BinaryIO, algorithm: str = "sha256"):
        self.raw = raw
        self.hash = hashlib.new(algorithm)
        self.algorithm = algorithm
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.hash.update(data)
            self.count += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass

    def digest(self) -> str:
        return f"{self.algorithm}:{self.hash.hexdigest()}"


class Prefetcher:
    """Read ``src`` ahead in a thread, hashing what it reads with ``hasher``.

    The tar reader is Python bytecode and holds the GIL most of the time; reading the
    blob, hashing it (sha256 of the blob and of the tar), and decompressing it all
    release the GIL, so here they run on the other core while the tar reader parses.
    ``read`` hands out the bytes in order; an exception ``src`` raised is raised by the
    ``read`` that reaches it. At most ``depth`` blocks wait in the queue (memory is
    bounded). ``close`` stops the thread and must be called before ``src`` is closed.

    Blocks are big (4 MiB) because every block costs the thread a few GIL hand-overs,
    and each of those can wait a switch interval (5 ms) for the busy tar reader.
    """

    _EOF = object()

    def __init__(self, src: Any, hasher: Any = None, block: int = 4 << 20, depth: int = 2):
        self.src = src
        self.hasher = hasher
        self.block = block
        self.q: queue.Queue[Any] = queue.Queue(depth)
        self.stopping = threading.Event()
        self.buf = b""
        self.off = 0
        self.done = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="layer-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                data = self.src.read(self.block)
                if not data:
                    self._put(self._EOF)
                    return
                if self.hasher is not None:
                    self.hasher.update(data)
                self._put(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self.stopping.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> bool:
        """The next block into ``buf``; False at the end of the stream."""
        if self.error is not None:
            raise self.error  # again: an error is never a clean end
        if self.done:
            return False
        item = self.q.get()
        if item is self._EOF:
            self.done = True
            return False
        if isinstance(item, BaseException):
            self.done = True
            self.error = item
            raise item
        self.buf, self.off = item, 0
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        avail = len(self.buf) - self.off
        if avail == 0:
            if not self._next():
                return b""
            avail = len(self.buf)
        if n >= avail:
            data = self.buf if self.off == 0 else self.buf[self.off:]
            self.buf, self.off = b"", 0
            return data  # short: callers read again for more
        data = self.buf[self.off:self.off + n]
        self.off += n
        return data

    def close(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.q.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()


class PeekReader:
    """A reader with the first bytes looked at already (for magic detection)."""

    def __init__(self, raw: Any, size: int = 512):
        self.raw = raw
        self.head = raw.read(size)

    def read(self, n: int = -1) -> bytes:
        if self.head:
            head, self.head = self.head, b""
            if n is None or n < 0:
                return head + self.raw.read()
            if n <= len(head):
                self.head = head[n:]
                return head[:n]
            return head + self.raw.read(n - len(head))
        return self.raw.read(n)


class _Decompressor:
    """Streaming, strict, multi-member decompression (gzip or zstd)."""

    def __init__(self, raw: Any, kind: str, what: str):
        self.raw = raw
        self.kind = kind
        self.what = what
        self.obj: Any = self._new()
        self.buf = bytearray()
        self.off = 0
        self.done = False

    def _new(self) -> Any:
        if self.kind == "gzip":
            return zlib.decompressobj(31)
        return zstandard.ZstdDecompressor().decompressobj()

    def _fail(self, why: str) -> InvalidLayerError:
        return InvalidLayerError(f"{self.what}: {why}")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        while len(self.buf) - self.off < n and not self.done:
            data = self.raw.read(READ_SIZE)
            if not data:
                if not self.obj.eof:
                    raise self._fail(f"truncated {self.kind} stream")
                self.done = True
                break
            try:
                out = self.obj.decompress(data)
                while self.obj.eof and self.obj.unused_data:
                    rest = self.obj.unused_data
                    if self.kind == "gzip" and not rest.strip(b"\0"):
                        break  # zero padding after the last member
                    self.obj = self._new()
                    out += self.obj.decompress(rest)
            except (zlib.error, zstandard.ZstdError) as exc:
                raise self._fail(f"corrupt {self.kind} stream ({exc})") from None
            if self.off:
                del self.buf[: self.off]
                self.off = 0
            self.buf += out
        end = min(len(self.buf), self.off + n)
        data = bytes(self.buf[self.off:end])
        self.off = end
        return data


def open_layer_stream(raw: Any, what: str) -> tuple[Any, str]:
    """Wrap a blob reader: returns (reader of the uncompressed bytes, compression)."""
    peek = PeekReader(raw, 4)
    kind = detect_compression(peek.head)
    if kind == "none":
        return peek, kind
    return _Decompressor(peek, kind, what), kind
