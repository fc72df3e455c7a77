"""Chunks and file contents: content-defined chunking, codecs, batched writes.

- ``ChunkParams`` are the FastCDC parameters, kept in ``meta`` so one store always cuts
  the same way (identical content -> identical chunks -> stored once).
- ``FileWriter`` takes a file's bytes in pieces (push), cuts them with FastCDC, hashes
  every chunk and the whole file with blake3, and hands new chunks to a ``ChunkBatch``.
- ``ChunkBatch`` holds new chunks and file records in memory until ``flush``: one write
  transaction that stores only chunks the store does not have yet (compressed if that
  pays). Chunks are content-addressed, so a batch committed by an import that later
  fails leaves only unreferenced chunks, which gc removes and check does not call damage.

A stored chunk value is one codec byte followed by the payload.
Threading: a ``ChunkBatch`` belongs to one thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import lmdb
import pyfastcdc
import zstandard

from ..digest import blake3_hasher, blake3_raw
from ..errors import IntegrityError
from .places import put_places
from .records import FileRecord
from .txn import Env

CODEC_RAW = 0
CODEC_ZSTD = 1

#: Stored compressed only when compression saves at least this fraction.
MIN_SAVING = 0.10

#: How much of a file is buffered before it is cut (a multiple of the max chunk size).
CUT_WINDOW = 4 << 20

#: Threads of the batch compressor. Two even while the caller cuts and hashes on the
#: other core: zstd releases the GIL, so its second thread works whenever the caller
#: waits (for the GIL, for the disk, or for this batch).
ZSTD_THREADS = 2

#: Chunks a batch writer looks up before it looks up all of them (``_any_stored``).
PROBE = 8

#: The batch writer drops the LMDB map pages it has touched every this many gets or puts
#: (``Env.release_map``): each one can map ~64 KiB, so this bounds them to a few MiB.
RELEASE_EVERY = 64


@dataclass(frozen=True)
class ChunkParams:
    """FastCDC parameters (bytes) and the chunk codec of a store."""

    min_size: int = 16 << 10
    avg_size: int = 64 << 10
    max_size: int = 256 << 10
    compression: str = "zstd:1"  #: "none" or "zstd:LEVEL"

    def to_meta(self) -> dict[str, Any]:
        return {"min": self.min_size, "avg": self.avg_size, "max": self.max_size,
                "compression": self.compression}

    @classmethod
    def from_meta(cls, d: dict[str, Any]) -> ChunkParams:
        return cls(d["min"], d["avg"], d["max"], d["compression"])

    def chunker(self) -> Any:
        # pyfastcdc's "avg_size" is the mask target beyond min_size (paper §3.4):
        # the real mean is about avg + min, so we pass avg - min to get avg.
        return pyfastcdc.FastCDC(
            max(256, self.avg_size - self.min_size),
            min_size=self.min_size,
            max_size=self.max_size,
        )

    def compressor(self) -> Any:
        if self.compression == "none":
            return None
        kind, _, level = self.compression.partition(":")
        if kind != "zstd":
            raise ValueError(f"unknown compression {self.compression!r}")
        return zstandard.ZstdCompressor(level=int(level or 3))


#: A ZstdDecompressor must not be used by two threads at once (the FUSE daemon reads
#: from many threads), so each thread has its own.
_local = threading.local()


def _decompressor() -> Any:
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d


def decode_chunk(value: bytes) -> bytes:
    """The payload of a stored chunk value."""
    if not value:
        raise IntegrityError("empty chunk record")
    codec = value[0]
    if codec == CODEC_RAW:
        return value[1:]
    if codec == CODEC_ZSTD:
        try:
            return _decompressor().decompress(value[1:])
        except zstandard.ZstdError as exc:
            raise IntegrityError("corrupt compressed chunk") from exc
    raise IntegrityError(f"unknown chunk codec {codec}")


def get_chunk(txn: lmdb.Transaction, env: Env, digest: bytes) -> bytes:
    value = txn.get(digest, db=env.db("chunks"))
    if value is None:
        raise IntegrityError(f"chunk {digest.hex()[:16]} is missing")
    return decode_chunk(value)


def get_file(txn: lmdb.Transaction, env: Env, digest: bytes) -> FileRecord:
    value = txn.get(digest, db=env.db("files"))
    if value is None:
        raise IntegrityError(f"file {digest.hex()[:16]} is missing")
    return FileRecord.decode(value)


def iter_file_data(env: Env, digest: bytes, batch: int = 64) -> Iterator[bytes]:
    """Yield a file's content chunk by chunk. Opens one short read txn per ``batch``
    chunks, so no transaction is held while the caller works on what it gets."""
    with env.read() as txn:
        rec = get_file(txn, env, digest)
    for i in range(0, len(rec.chunks), batch):
        with env.read() as txn:
            parts = [get_chunk(txn, env, d) for d, _ in rec.chunks[i:i + batch]]
        yield from parts


def _any_stored(txn: lmdb.Transaction, db: Any, keys: list[bytes]) -> bool:
    """Whether any of ``PROBE`` keys spread over ``keys`` is stored already.

    A batch of a new image holds new chunks only; a batch of an image that shares its
    content with one stored holds mostly old ones. So the writer looks up a sample
    first and, when none of it is stored, compresses and puts the whole batch without
    a lookup per chunk (those lookups cost a third of an import's writing thread).
    A stored chunk the sample missed is compressed for nothing and kept as it was."""
    step = max(1, len(keys) // PROBE)
    return any(txn.get(d, db=db) is not None for d in keys[::step])


class ChunkBatch:
    """New chunks and file records, written to the store in batches.

    ``add_chunk``/``add_file`` collect in memory; when ``limit`` bytes are pending the
    batch is handed to one background thread that compresses it and writes it in one
    transaction, while the caller goes on cutting and hashing (zstd and LMDB release the
    GIL, so the two use both cores). At most one batch is in flight, which bounds memory
    to about two batches. ``close()`` writes what is left and waits; it must be called
    before anything references the chunks (the layer's final transaction). An error in
    the writer is raised by the next ``add_*``/``close`` call.
    """

    def __init__(self, env: Env, params: ChunkParams, limit: int = 16 << 20):
        self.env = env
        self.params = params
        self.limit = limit
        self.chunks: dict[bytes, bytes] = {}
        self.files: dict[bytes, bytes] = {}
        self.pending_bytes = 0
        self._compressor = params.compressor()
        #: digests already handed to a batch: skip them cheaply. Two sets, because a
        #: one-chunk file has the same digest as its chunk.
        self.seen: set[bytes] = set()
        self.seen_files: set[bytes] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: Future[None] | None = None

    def add_chunk(self, digest: bytes, data: bytes | memoryview) -> None:
        if digest in self.seen:
            return
        self.seen.add(digest)
        self.chunks[digest] = bytes(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= self.limit:
            self._hand_off()

    def add_file(self, digest: bytes, record: FileRecord) -> None:
        if digest not in self.seen_files:
            self.seen_files.add(digest)
            self.files[digest] = record.encode()

    def _wait(self) -> None:
        if self._inflight is not None:
            fut, self._inflight = self._inflight, None
            fut.result()

    def _hand_off(self) -> None:
        self._wait()
        if not self.chunks and not self.files:
            return
        chunks, files = self.chunks, self.files
        self.chunks, self.files, self.pending_bytes = {}, {}, 0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
        self._inflight = self._pool.submit(self._write, chunks, files)

    def close(self) -> None:
        """Write everything pending and wait for it (also stops the writer thread)."""
        try:
            self._wait()
            self._hand_off()
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def abort(self) -> None:
        """Drop what is pending, wait for the batch in flight, stop the writer."""
        self.chunks, self.files, self.pending_bytes = {}, {}, 0
        try:
            self._wait()
        except Exception:
            pass
        finally:
            self.close()

    def _write(self, chunks: dict[bytes, bytes], files: dict[bytes, bytes]) -> None:
        env = self.env
        chunks_db, files_db = env.db("chunks"), env.db("files")
        keys = list(chunks)
        with env.read() as txn:
            if _any_stored(txn, chunks_db, keys):
                missing = []
                for i, d in enumerate(keys):
                    if txn.get(d, db=chunks_db) is None:
                        missing.append(d)
                    if i % RELEASE_EVERY == RELEASE_EVERY - 1:
                        env.release_map()
            else:
                missing = keys
        values = self._encode([chunks[d] for d in missing])
        # One ``putmulti`` per database instead of a Python loop of ``put``s, whose
        # bytecode needs the GIL that the reading thread holds most of the time
        # (measured: the loop took 0.34-0.36 s of a 270 MiB import, putmulti
        # 0.25-0.28 s). Chunks go in the order they were cut, so that a file's chunks
        # lie one after the other in the store's file (what a mount reading the file
        # asks for ahead: ``overlay.lower.StoreLayers._read_ahead``); file records
        # are small and go in key order.
        chunk_items = list(zip(missing, values))
        file_items = sorted(files.items())

        def put(txn: lmdb.Transaction) -> None:
            # overwrite=False: a chunk or file already stored (by another import, or
            # one the probe did not see) is kept as it is
            for db, items in ((chunks_db, chunk_items), (files_db, file_items)):
                cur = txn.cursor(db=db)
                for i in range(0, len(items), RELEASE_EVERY):
                    cur.putmulti(items[i:i + RELEASE_EVERY], overwrite=False)
                    env.release_map()
            # where the chunks of the files lie, for readers of whole files
            # (``places``), in the transaction that stores the file records
            put_places(txn, env, [(d, FileRecord.decode(v)) for d, v in file_items])

        env.write(put)
        env.release_map()
        env.start_writeback()

    def _encode(self, payloads: list[bytes]) -> list[bytes]:
        if self._compressor is None or not payloads:
            return [b"\x00" + p for p in payloads]
        compressed: Any
        if len(payloads) > 8:
            # segments of one buffer: each is copied once, into its value below
            compressed = self._compressor.multi_compress_to_buffer(payloads,
                                                                   threads=ZSTD_THREADS)
        else:
            compressed = [self._compressor.compress(p) for p in payloads]
        out = []
        for p, c in zip(payloads, compressed):
            if len(c) <= len(p) * (1 - MIN_SAVING):
                out.append(b"\x01" + c)
            else:
                out.append(b"\x00" + p)
        return out


class FileWriter:
    """Cut one file's content into chunks as it is written; ``close`` gives the record."""

    def __init__(self, batch: ChunkBatch, cdc: Any):
        self.batch = batch
        self.cdc = cdc
        self.buf = bytearray()
        #: created only once the file outgrows the buffer: a smaller file is hashed in
        #: one call at ``close`` (most files of a root filesystem are a few KiB)
        self.hasher: Any = None
        self.size = 0
        self.chunks: list[tuple[bytes, int]] = []

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        elif len(self.buf) + len(data) >= CUT_WINDOW:
            self.hasher = blake3_hasher()
            self.hasher.update(self.buf)
            self.hasher.update(data)
        self.buf += data
        if len(self.buf) >= CUT_WINDOW:
            self._cut(final=False)

    def _cuts(self) -> list[tuple[int, int]]:
        with memoryview(self.buf) as view:
            return [(c.offset, c.length) for c in self.cdc.cut_buf(view)]

    def _cut(self, final: bool, cuts: list[tuple[int, int]] | None = None) -> None:
        """Store the chunks ``cuts`` (default: cut the buffer now), drop them from the
        buffer."""
        if cuts is None:
            cuts = self._cuts()
        if not final:
            # The last chunk may have been cut short by the end of the buffer; keep it
            # and cut again with more data (a cut point depends only on its own chunk).
            cuts = cuts[:-1]
        with memoryview(self.buf) as view:
            for off, n in cuts:
                data = view[off:off + n]
                d = blake3_raw(data)
                self.batch.add_chunk(d, data)
                self.chunks.append((d, n))
                data.release()
        if cuts:
            del self.buf[: cuts[-1][0] + cuts[-1][1]]

    def close(self) -> tuple[bytes, FileRecord]:
        """Cut what is left; hand the file record to the batch; return (digest, record)."""
        if self.hasher is None:
            # The whole file is in the buffer. A file the chunker leaves whole (smaller
            # than the minimum chunk, or cut once) is one chunk whose digest is the
            # file's: hashed once.
            cuts = self._cuts() if len(self.buf) >= self.cdc.min_size else []
            digest = blake3_raw(self.buf)
            if len(cuts) > 1:
                self._cut(final=True, cuts=cuts)
            elif self.buf:
                self.batch.add_chunk(digest, self.buf)
                self.chunks.append((digest, len(self.buf)))
        else:
            self._cut(final=True)
            digest = self.hasher.digest()
        self.buf = bytearray()
        record = FileRecord(self.size, self.chunks)
        self.batch.add_file(digest, record)
        return digest, record
