"""The fast tar header reader against tarfile: the same entries, header stream and errors.

``oci/tarlayer.py`` parses common headers itself and lets ``tarfile`` read any member it
does not take. The reference here is the same importer with the fast reader switched off
(every member read by ``tarfile``). Inputs cover what each reader takes: ustar prefixes,
GNU long names and links, PAX records (paths, xattrs, ns mtimes, big ids, non-UTF-8
names), V7 directories, base-256 numbers, global PAX headers, ``hdrcharset``, whiteouts
with data, and damaged archives.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from typing import Any

import pytest
from helpers_images import tar_bytes

from layerstore.errors import InvalidLayerError
from layerstore.oci import tarlayer
from layerstore.oci.streams import Prefetcher
from layerstore.store import Store
from layerstore.store.chunks import ChunkBatch


def _ti(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.mtime = 1_700_000_000
    t.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def _rich(fmt: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    deep = "/".join(["a" * 60] * 3)
    out: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_ti("etc", tarfile.DIRTYPE), None),
        (_ti("etc/small", uid=1000, gid=1000, mode=0o4755), b"small file\n"),
        (_ti("etc/empty"), b""),
        (_ti("etc/big", mode=0o600), bytes(range(256)) * 400),  # several chunks
        (_ti("etc/link", tarfile.SYMTYPE, linkname="small"), None),
        (_ti("etc/hard", tarfile.LNKTYPE, linkname="etc/small"), None),
        (_ti("dev", tarfile.DIRTYPE), None),
        (_ti("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (_ti("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
        (_ti("dev/fifo", tarfile.FIFOTYPE), None),
        (_ti(deep, tarfile.DIRTYPE), None),  # ustar: prefix + name
        (_ti("/".join(["a" * 60] * 2) + "/" + "f" * 60), b"prefix and name\n"),
        (_ti("d", tarfile.DIRTYPE), None),
        (_ti("d/.wh.gone"), None),
        (_ti("d/.wh..wh..opq"), None),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        out.append((_ti(deep + "/" + "f" * 120), b"long name\n"))  # GNU: L; PAX: path
        out.append((_ti("etc/longlink", tarfile.SYMTYPE, linkname="t" * 150), None))  # GNU: K
        out.append((_ti("bigid", uid=3_000_000, gid=4_000_000), b"ids\n"))  # GNU: base-256
        out.append((_ti("caf\udcc3\udca9-not-utf8"), b"bytes\n"))  # PAX: hdrcharset
    if fmt == tarfile.PAX_FORMAT:
        x = _ti("etc/xattrs")
        x.pax_headers = {"SCHILY.xattr.user.a": "1", "SCHILY.xattr.user.b": "x=y z",
                         "mtime": "1700000000.123456789"}
        out.append((x, b"xattrs\n"))
    return out


def _read(store: Store, data: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch,
          block: int = 0) -> tuple[dict[bytes, bytes], int, bytes] | str:
    """Entries (encoded), tar size and header-stream digest; or the error message.
    ``block``: read through a ``Prefetcher`` of blocks that size (it hashes, then)."""
    with monkeypatch.context() as m:
        if not fast:
            def never(tee: object) -> object:
                raise tarlayer._Fallback

            m.setattr(tarlayer, "_fast_member", never)
        batch = ChunkBatch(store.env, store.params)
        diff_hash = hashlib.sha256()
        stream: Any = io.BytesIO(data)
        if block:
            stream = Prefetcher(stream, diff_hash, block=block, depth=2)
        try:
            r = tarlayer.read_layer_tar(stream, None if block else diff_hash, batch,
                                        store.params.chunker(), "in")
        except InvalidLayerError as exc:
            batch.abort()
            return str(exc)
        finally:
            if block:
                stream.close()
        batch.close()
    assert diff_hash.digest() == hashlib.sha256(data).digest()
    return ({k: v.encode() for k, v in r.builder.entries.items()}, r.tar_size,
            r.tarsplit_digest)


def _same(store: Store, data: bytes, monkeypatch: pytest.MonkeyPatch) -> object:
    fast = _read(store, data, True, monkeypatch)
    slow = _read(store, data, False, monkeypatch)
    assert fast == slow
    # the importer reads through a Prefetcher: its blocks end anywhere in a header
    assert _read(store, data, True, monkeypatch, block=1000) == fast
    return fast


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_formats(store: Store, fmt: int, monkeypatch: pytest.MonkeyPatch) -> None:
    got = _same(store, tar_bytes(_rich(fmt), fmt=fmt), monkeypatch)
    assert isinstance(got, tuple) and len(got[0]) > 10


def test_fast_reader_takes_the_common_headers(store: Store,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """GNU tar's and tarfile's usual headers never need tarfile (GNU base-256 ids do)."""
    pax = tar_bytes([m for m in _rich(tarfile.PAX_FORMAT) if "not-utf8" not in m[0].name],
                    fmt=tarfile.PAX_FORMAT)
    gnu = tar_bytes([m for m in _rich(tarfile.GNU_FORMAT) if "not-utf8" not in m[0].name],
                    fmt=tarfile.GNU_FORMAT)
    calls = []
    real_open = tarfile.open

    def counting_open(*a: object, **kw: object) -> object:
        calls.append(1)
        return real_open(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tarlayer.tarfile, "open", counting_open)
    _read(store, pax, True, monkeypatch)
    assert calls == []
    _read(store, gnu, True, monkeypatch)
    assert len(calls) == 1  # the base-256 uid, then the fast reader again


def _pax_global_then(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar with a global PAX header after the first member (git archive writes one)."""
    first = tar_bytes(members[:1], fmt=tarfile.PAX_FORMAT)[:1024]  # a's header and data block
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tf:
        for ti, data in members[1:]:
            ti.size = len(data or b"")
            tf.addfile(ti, io.BytesIO(data or b""))
    return first + buf.getvalue()


def test_global_pax_header_hands_the_rest_to_tarfile(store: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = _pax_global_then([(_ti("a"), b"a"), (_ti("b"), b"b"), (_ti("c", uid=7), b"c")])
    got = _same(store, data, monkeypatch)
    assert isinstance(got, tuple) and set(got[0]) == {b"/", b"/a", b"/b", b"/c"}


def test_hdrcharset_and_unknown_pax_keys(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _ti("a")
    a.pax_headers = {"hdrcharset": "BINARY"}
    b = _ti("b")
    b.pax_headers = {"comment": "made by hand", "SCHILY.xattr.user.k": "v"}
    _same(store, tar_bytes([(a, b"a"), (b, b"b"), (_ti("c"), b"c")], fmt=tarfile.PAX_FORMAT),
          monkeypatch)


def test_v7_directory_and_whiteout_with_data(store: Store,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(tar_bytes([(_ti("olddir/"), b""),
                                (_ti("olddir/.wh.x"), b"data of a whiteout"),
                                (_ti("olddir/f"), b"f")], fmt=tarfile.USTAR_FORMAT))
    data[156] = 0  # typeflag NUL: a V7 regular file whose name ends in "/" is a directory
    chk = 256 + sum(data[:148]) + sum(data[156:512])
    data[148:156] = b"%06o\0 " % chk
    got = _same(store, bytes(data), monkeypatch)
    assert isinstance(got, tuple) and b"/olddir/f" in got[0]


@pytest.mark.parametrize("damage", ["checksum", "number", "cut-header", "cut-data",
                                    "cut-padding", "no-end", "pax-framing", "longname-cut"])
def test_damage_is_reported_the_same(store: Store, damage: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = tarfile.GNU_FORMAT if damage == "longname-cut" else tarfile.PAX_FORMAT
    members = [(_ti("a"), b"a" * 700), (_ti("b"), b"b"), (_ti("l" * 150), b"long")]
    if damage == "pax-framing":
        members[1][0].pax_headers = {"SCHILY.xattr.user.k": "v"}
    data = bytearray(tar_bytes(members, fmt=fmt))
    second = 512 + 1024  # after a's header and two data blocks
    if damage == "checksum":
        data[second + 10] ^= 1
    elif damage == "number":
        data[second + 100:second + 108] = b"00009\0\0\0"
        chk = 256 + sum(data[second:second + 148]) + sum(data[second + 156:second + 512])
        data[second + 148:second + 156] = b"%06o\0 " % chk
    elif damage == "cut-header":
        del data[second + 300:]
    elif damage == "cut-data":
        del data[600:]
    elif damage == "cut-padding":
        del data[512 + 800:]
    elif damage == "no-end":
        del data[data.index(b"long") + 512:]  # after the last member's data block
    elif damage == "pax-framing":
        i = data.index(b"SCHILY.xattr.user.k=v\n")
        data[i + len("SCHILY.xattr.user.k=v")] = ord("X")  # the record's newline
    elif damage == "longname-cut":
        del data[second + 512 + 512 + 100:]
    got = _same(store, bytes(data), monkeypatch)
    if damage not in ("pax-framing",):
        assert isinstance(got, str), got


class _Failing(io.BytesIO):
    """Gives ``good`` bytes, then fails like a truncated gzip stream."""

    def __init__(self, good: bytes):
        super().__init__(good)
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        data = super().read(n)
        if not data:
            raise InvalidLayerError("in: truncated gzip stream")
        return data


def test_prefetcher_hands_out_bytes_then_the_error_in_order() -> None:
    good = bytes(range(256)) * 40
    h = hashlib.sha256()
    p = Prefetcher(_Failing(good), h, block=1000, depth=2)
    got = bytearray()
    with pytest.raises(InvalidLayerError, match="truncated gzip"):
        while True:
            got += p.read(333)
    p.close()
    assert bytes(got) == good and h.digest() == hashlib.sha256(good).digest()
    assert not p.thread.is_alive()


def test_prefetcher_close_stops_the_thread_early() -> None:
    src = _Failing(bytes(10 << 20))
    p = Prefetcher(src, None, block=4096, depth=2)
    assert len(p.read(100)) == 100
    p.close()
    assert not p.thread.is_alive()
    assert src.reads < 10, "it stopped reading once closed"
    assert not [t for t in threading.enumerate() if t.name == "layer-reader"]
