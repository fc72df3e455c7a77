"""Store unit tests, no FUSE: chunking, map growth, dedup, rmi/gc, check, names, locks.

Most tests import through the CLI (a subprocess, as users do) and look at the store
through the API; every test that changes the store ends with ``check``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import assert_clean

from layerstore.errors import AmbiguousNameError, ImageNotFoundError
from layerstore.oci.exporter import get_layer
from layerstore.oci.importer import import_path
from layerstore.store import Store, chunks, layers
from layerstore.store.check import check
from layerstore.store.chunks import ChunkBatch, ChunkParams, FileWriter, iter_file_data
from layerstore.store.images import normalize_name, resolve
from layerstore.store.records import Entry, FileRecord, entry_key
from layerstore.store.usage import usage

MiB = 1 << 20
KiB = 1 << 10
RAW = ChunkParams(compression="none")  #: byte counts exact: value = 1 codec byte + payload


# --- inputs ----------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes], mtime: int = 1_700_000_000) -> bytes:
    """A PAX layer tar with the given files (parent directories added)."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            parts = name.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in seen:
                    seen.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, mtime
                    tf.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, mtime
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_layout(dest: Path, images: list[dict]) -> list[str]:
    """An OCI layout by hand. Each image: ``layers`` (uncompressed tars), optional
    ``name`` (containerd annotation), ``diff_ids`` (override), ``extra`` (config fields).
    Returns the image ids."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    descs, ids = [], []
    for img in images:
        tars = img["layers"]
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers",
                       "diff_ids": img.get("diff_ids") or [sha256(t) for t in tars]},
            **img.get("extra", {}),
        }).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": put(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": put(t), "size": len(t)} for t in tars],
        }).encode()
        desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest), "size": len(manifest)}
        if img.get("name"):
            desc["annotations"] = {"io.containerd.image.name": img["name"]}
        descs.append(desc)
        ids.append(sha256(config))
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": descs}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return ids


def images_json(cli) -> list[dict]:
    return json.loads(cli("images", "--json").stdout)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def entries_of(s: Store, diff_id: str) -> dict[bytes, Entry]:
    rec = get_layer(s, diff_id)
    with s.env.read() as txn:
        return dict(layers.walk(txn, s.env, rec.layer_no))


# --- chunking parameters -----------------------------------------------------------------


def test_chunk_params_are_kept_in_meta(tmp_path: Path, cli, root: Path) -> None:
    small = ChunkParams(min_size=4 * KiB, avg_size=16 * KiB, max_size=64 * KiB,
                        compression="zstd:5")
    Store.open(root, params=small).close()
    with Store.open(root, params=ChunkParams()) as s:
        assert s.params == small
    with Store.open(root) as s:
        assert s.params == small
    # The CLI (which opens with default parameters) cuts with the stored ones.
    data = random.Random(1).randbytes(2 * MiB)
    tar = layer_tar({"f": data})
    (tmp_path / "l.tar").write_bytes(tar)
    cli("import", tmp_path / "l.tar", "--tag", "p:1")
    with Store.open(root) as s:
        e = entries_of(s, sha256(tar))[b"/f"]
        with s.env.read() as txn:
            rec = chunks.get_file(txn, s.env, e.digest)
        assert all(n <= 64 * KiB for _, n in rec.chunks)
        assert all(n >= 4 * KiB for _, n in rec.chunks[:-1])
        assert len(rec.chunks) > 2 * MiB // (64 * KiB)
        assert s.params == small
    # and a store made with the defaults keeps them when opened with others
    other = tmp_path / "other"
    Store.open(other).close()
    with Store.open(other, params=small) as s:
        assert s.params == ChunkParams()
    assert_clean(root)


# --- map growth ----------------------------------------------------------------------------


def test_map_grows_on_map_full(tmp_path: Path) -> None:
    rnd = random.Random(2)
    files = {f"d/f{i}": rnd.randbytes(4 * MiB) for i in range(5)}
    files["d/small"] = b"x" * 100
    tar = layer_tar(files)
    (tmp_path / "big.tar").write_bytes(tar)
    with Store.open(tmp_path / "store", map_size=1 * MiB, params=RAW) as s:
        assert s.env.env.info()["map_size"] == 1 * MiB
        import_path(s, tmp_path / "big.tar", tag="big:1")
        assert s.env.env.info()["map_size"] >= 20 * MiB
        ents = entries_of(s, sha256(tar))
        for name, data in files.items():
            e = ents[b"/" + name.encode()]
            assert b"".join(iter_file_data(s.env, e.digest)) == data
        r = check(s.env)
        assert r.clean, r.damage
    assert_clean(tmp_path / "store")


def test_a_remap_waits_for_the_transactions_of_other_threads(tmp_path: Path) -> None:
    """Another process grew the store: this one maps it anew, while a thread still
    holds a value from the old map (a mount's READ, say). The remap waits for that
    transaction to end (before: the value pointed into an unmapped map: SIGBUS)."""
    import threading

    from layerstore.store.txn import Env

    env = Env(tmp_path / "db", map_size=1 * MiB)
    value = random.Random(5).randbytes(200_000)
    env.write(lambda txn: txn.put(b"k" * 32, value, db=env.db("chunks")))
    holding, done = threading.Event(), threading.Event()
    events: list[str] = []
    got: list[bytes] = []

    def reader() -> None:
        with env.read(buffers=True) as txn:
            view = txn.get(b"k" * 32, db=env.db("chunks"))
            holding.set()
            time.sleep(0.3)  # the remap is asked for meanwhile
            got.append(bytes(view))
            events.append("reader done")
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    assert holding.wait(5)
    env._set_mapsize(8 * MiB)  # what a MapResizedError leads to
    events.append("remapped")
    t.join()
    assert events == ["reader done", "remapped"]
    assert got == [value]
    with env.read() as txn:  # and the store reads on from the new map
        assert txn.get(b"k" * 32, db=env.db("chunks")) == value
    env.close()


def test_a_remap_that_gives_up_lets_readers_in_again(tmp_path: Path, monkeypatch) -> None:
    """A reader that does not finish (or an interrupt while the remap waits) must not
    leave the gate shut: the remap gives up ("try again") and readers go on."""
    import threading

    from layerstore.errors import StoreError
    from layerstore.store import txn as txn_mod
    from layerstore.store.txn import Env

    monkeypatch.setattr(txn_mod, "REMAP_WAIT", 0.2)
    env = Env(tmp_path / "db", map_size=1 * MiB)
    env.write(lambda txn: txn.put(b"k", b"v", db=env.db("meta")))
    holding, release = threading.Event(), threading.Event()

    def reader() -> None:
        with env.read():
            holding.set()
            release.wait(5)

    t = threading.Thread(target=reader)
    t.start()
    assert holding.wait(5)
    with pytest.raises(StoreError, match="try again"):
        env._set_mapsize(8 * MiB)
    assert not env._gate.remapping
    got: list[bytes] = []

    def another() -> None:
        with env.read() as txn:
            got.append(txn.get(b"k", db=env.db("meta")))

    other = threading.Thread(target=another)
    other.start()
    other.join(2)
    assert got == [b"v"]  # a new reader got in while the first still reads
    release.set()
    t.join()
    env._set_mapsize(8 * MiB)  # and a remap goes through once the readers are done
    env.close()


def test_a_transaction_inside_another_does_not_wait_for_itself(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A remap asked for from inside a transaction (an inner one found the store
    grown) would wait for the thread's own outer one: it is a "try again" error."""
    import lmdb

    from layerstore.errors import StoreError
    from layerstore.store.txn import Env

    env = Env(tmp_path / "db", map_size=1 * MiB)
    real = env.env.begin
    calls = [0]

    def begin(**kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise lmdb.MapResizedError("grown by another process")
        return real(**kw)

    monkeypatch.setattr(env, "env", type("E", (), {"begin": staticmethod(begin),
                                                   "__getattr__": lambda self, n: getattr(real.__self__, n)})())
    with env.read(), pytest.raises(StoreError, match="try again"), env.read():
        pass
    with env.read():  # and the gate is let go of
        pass
    monkeypatch.undo()
    env.close()


# --- FileWriter ----------------------------------------------------------------------------


class CollectingBatch:
    """Stands in for ChunkBatch: keeps what FileWriter hands over."""

    def __init__(self) -> None:
        self.chunks: dict[bytes, bytes] = {}
        self.files: dict[bytes, FileRecord] = {}

    def add_chunk(self, digest: bytes, data) -> None:
        data = bytes(data)
        assert blake3.blake3(data).digest() == digest
        self.chunks[digest] = data

    def add_file(self, digest: bytes, record: FileRecord) -> None:
        self.files[digest] = record


def write_in_pieces(params: ChunkParams, data: bytes, sizes) -> tuple[bytes, FileRecord]:
    batch = CollectingBatch()
    fw = FileWriter(batch, params.chunker())  # type: ignore[arg-type]
    view = memoryview(data)
    pos = 0
    for n in sizes:
        if pos >= len(data):
            break
        fw.write(view[pos:pos + n])
        pos += n
    assert pos >= len(data)
    digest, rec = fw.close()
    assert batch.files[digest] == rec
    assert b"".join(batch.chunks[d] for d, _ in rec.chunks) == data
    return digest, rec


def one_pass_cuts(params: ChunkParams, data: bytes) -> list[tuple[bytes, int]]:
    """The reference: FastCDC over the whole content in one call."""
    if not data:
        return []
    if len(data) < params.min_size:
        return [(blake3.blake3(data).digest(), len(data))]
    view = memoryview(data)
    return [(blake3.blake3(view[c.offset:c.offset + c.length]).digest(), c.length)
            for c in params.chunker().cut_buf(view)]


def random_sizes(seed: int):
    rnd = random.Random(seed)
    while True:
        yield rnd.choice([1, 1, 7, 4096, 65_537, 300_000, rnd.randrange(1, 2 * MiB)])


@pytest.mark.parametrize("params", [ChunkParams(), ChunkParams(2 * KiB, 8 * KiB, 32 * KiB)],
                         ids=["default", "small"])
def test_file_writer_cuts_do_not_depend_on_write_sizes(params: ChunkParams,
                                                        monkeypatch) -> None:
    rnd = random.Random(3)
    pattern = rnd.randbytes(10_000)
    # Larger than the cut window (4 MiB): cutting resumes across buffer refills.
    data = rnd.randbytes(6 * MiB) + pattern * 300 + rnd.randbytes(77)
    want = one_pass_cuts(params, data)
    assert len(want) > 10
    results = {label: write_in_pieces(params, data, sizes) for label, sizes in [
        ("whole", [len(data)]),
        ("1MiB", iter(lambda: MiB, None)),
        ("4KiB", iter(lambda: 4 * KiB, None)),
        ("random", random_sizes(4)),
    ]}
    for label, (digest, rec) in results.items():
        assert digest == blake3.blake3(data).digest(), label
        assert rec.chunks == want, label
        assert rec.size == len(data)
    # 1-byte writes are slow in Python: shrink the cut window so that they still cross it
    # several times (the window only has to hold one maximal chunk).
    monkeypatch.setattr(chunks, "CUT_WINDOW", params.max_size + 1000)
    small = data[:3 * params.max_size + 12345]
    want = one_pass_cuts(params, small)
    for sizes in ([len(small)], iter(lambda: 1, None), iter(lambda: 4 * KiB, None),
                  random_sizes(5)):
        digest, rec = write_in_pieces(params, small, sizes)
        assert digest == blake3.blake3(small).digest()
        assert rec.chunks == want


@pytest.mark.parametrize("size", [0, 1, 16 * KiB - 1, 16 * KiB, 16 * KiB + 1, 256 * KiB + 1])
def test_file_writer_edges(size: int) -> None:
    data = random.Random(size).randbytes(size)
    digest, rec = write_in_pieces(ChunkParams(), data, [max(1, size)])
    assert digest == blake3.blake3(data).digest()
    assert rec.chunks == one_pass_cuts(ChunkParams(), data)
    assert rec.size == size


def test_file_writer_through_a_real_batch(store: Store, root: Path) -> None:
    data = random.Random(6).randbytes(5 * MiB)
    batch = ChunkBatch(store.env, store.params, limit=1 * MiB)
    fw = FileWriter(batch, store.params.chunker())
    for i in range(0, len(data), 100_000):
        fw.write(data[i:i + 100_000])
    digest, _ = fw.close()
    batch.close()
    assert b"".join(iter_file_data(store.env, digest)) == data
    assert digest.hex() == subprocess.run(["b3sum", "--no-names", "-"], input=data,
                                          capture_output=True, check=True).stdout.decode().strip()
    r = check(store.env)
    assert r.clean, r.damage
    assert r.garbage_files == 1  # nothing references it: gc would take it


# --- dedup ---------------------------------------------------------------------------------


def chunk_set(params: ChunkParams, data: bytes) -> dict[bytes, int]:
    return dict(one_pass_cuts(params, data))


def stored_of(chunk_lens: dict[bytes, int]) -> int:
    """Stored bytes of raw chunks: 1 codec byte + payload each."""
    return sum(n + 1 for n in chunk_lens.values())


def tarsplit_chunks(s: Store, diff_id: str) -> dict[bytes, int]:
    rec = get_layer(s, diff_id)
    with s.env.read() as txn:
        return dict(chunks.get_file(txn, s.env, rec.tarsplit).chunks)


def test_dedup_two_images_share_base_and_most_of_a_modified_file(tmp_path: Path, cli,
                                                                  root: Path) -> None:
    Store.open(root, params=RAW).close()
    rnd = random.Random(7)
    base_files = {"usr/lib/libbig.so": rnd.randbytes(3 * MiB),
                  "etc/os-release": b"ID=test\n", "usr/bin/tool": rnd.randbytes(200 * KiB)}
    v1 = rnd.randbytes(32 * MiB)
    v2 = bytearray(v1)
    mid = len(v2) // 2
    v2[mid:mid + 4 * KiB] = rnd.randbytes(4 * KiB)
    v2[1000:1000] = rnd.randbytes(100)
    v2 = bytes(v2)
    base = layer_tar(base_files)
    top1 = layer_tar({"data/big.bin": v1}, mtime=1_700_000_100)
    top2 = layer_tar({"data/big.bin": v2}, mtime=1_700_000_200)
    id1, = write_layout(tmp_path / "v1", [{"layers": [base, top1]}])
    id2, = write_layout(tmp_path / "v2", [{"layers": [base, top2]}])

    cli("import", tmp_path / "v1", "--tag", "app:1")
    with Store.open(root) as s:
        u1 = usage(s.env)
        ts = {d: tarsplit_chunks(s, d) for d in (sha256(base), sha256(top1))}
    c_base = {}
    for data in base_files.values():
        c_base.update(chunk_set(RAW, data))
    c1, c2 = chunk_set(RAW, v1), chunk_set(RAW, v2)
    # the first image: every distinct chunk once (content plus the two header streams)
    want1 = {**c_base, **c1, **ts[sha256(base)], **ts[sha256(top1)]}
    assert u1.stored_bytes == stored_of(want1)
    assert u1.chunk_bytes == sum(want1.values())
    assert u1.chunk_count == len(want1)

    p = cli("import", tmp_path / "v2", "--tag", "app:2")
    assert "app:2" in p.stdout
    with Store.open(root) as s:
        u2 = usage(s.env)
        ts[sha256(top2)] = tarsplit_chunks(s, sha256(top2))
    new2 = {d: n for d, n in {**c2, **ts[sha256(top2)]}.items() if d not in want1}
    # Only the chunks around the two edits (and the new header stream) are new.
    assert u2.stored_bytes - u1.stored_bytes == stored_of(new2)
    changed = {d: n for d, n in c2.items() if d not in c1}
    assert sum(changed.values()) <= 8 * RAW.max_size, "an edit changed too many chunks"
    assert len(changed) >= 2  # the insert and the overwrite each change a chunk
    one_copy = len(v1) + sum(len(d) for d in base_files.values())
    assert u2.stored_bytes < 1.1 * one_copy
    assert u2.logical_bytes == 2 * len(base) + len(top1) + len(top2)
    assert u2.layers == 3 and u2.images == 2

    # unique bytes: what rmi + gc of that image alone would free
    only1 = {d: n for d, n in {**c1, **ts[sha256(top1)]}.items()
             if d not in c2 and d not in ts[sha256(top2)] and d not in c_base}
    only2 = {d: n for d, n in {**c2, **ts[sha256(top2)]}.items()
             if d not in c1 and d not in ts[sha256(top1)] and d not in c_base}
    per = {i.id: i for i in u2.per_image}
    assert per[id1].unique_bytes == stored_of(only1)
    assert per[id2].unique_bytes == stored_of(only2)
    assert per[id1].names == ["app:1"] and per[id2].names == ["app:2"]
    df = json.loads(cli("df", "--json").stdout)
    assert df["stored_bytes"] == u2.stored_bytes
    assert {i["id"]: i["unique_bytes"] for i in df["per_image"]} == \
        {id1: per[id1].unique_bytes, id2: per[id2].unique_bytes}
    assert_clean(root)

    # rmi + gc frees exactly the unique chunks of the removed image
    cli("rmi", "app:2")
    out = cli("gc").stdout
    assert f"{len(only2)} chunks" in out, out
    with Store.open(root) as s:
        u3 = usage(s.env)
    assert u3.stored_bytes == u2.stored_bytes - stored_of(only2) == u1.stored_bytes
    assert u3.chunk_count == u1.chunk_count
    assert [i["name"] for i in images_json(cli)] == ["app:1"]
    assert_clean(root)
    # and the remaining image still exports byte for byte
    cli("export", "app:1", tmp_path / "out")
    manifest_desc = json.loads((tmp_path / "out/index.json").read_text())["manifests"][0]
    manifest = json.loads((tmp_path / "out/blobs/sha256" /
                           manifest_desc["digest"].split(":")[1]).read_text())
    assert [l["digest"] for l in manifest["layers"]] == [sha256(base), sha256(top1)]
    assert (tmp_path / "out/blobs/sha256" / sha256(top1).split(":")[1]).read_bytes() == top1


def test_reimport_is_idempotent(tmp_path: Path, cli, root: Path) -> None:
    tar = layer_tar({"a/b": b"hello" * 1000, "c": random.Random(8).randbytes(300 * KiB)})
    write_layout(tmp_path / "l", [{"layers": [tar]}])
    cli("import", tmp_path / "l", "--tag", "x:1")
    with Store.open(root) as s:
        u1 = usage(s.env)
    cli("import", tmp_path / "l", "--tag", "x:2")
    with Store.open(root) as s:
        u2 = usage(s.env)
    assert (u2.stored_bytes, u2.chunk_count, u2.layers, u2.images) == \
        (u1.stored_bytes, u1.chunk_count, 1, 1)
    assert sorted(i["name"] for i in images_json(cli)) == ["x:1", "x:2"]
    assert_clean(root)


# --- rmi, tags, gc -------------------------------------------------------------------------


def test_rmi_of_one_of_two_tags_only_untags(tmp_path: Path, cli, root: Path) -> None:
    tar = layer_tar({"f": random.Random(9).randbytes(100 * KiB)})
    (tmp_path / "l.tar").write_bytes(tar)
    image_id = cli("import", tmp_path / "l.tar", "--tag", "one").stdout.split()[0]
    cli("tag", "one", "two:2")
    assert sorted(i["name"] for i in images_json(cli)) == ["one:latest", "two:2"]
    out = cli("rmi", "one").stdout
    assert "Untagged: one:latest" in out and "Deleted" not in out
    rows = images_json(cli)
    assert [(r["id"], r["name"]) for r in rows] == [(image_id, "two:2")]
    cli("gc")
    cli("export", "two:2", tmp_path / "out")  # nothing was freed
    out = cli("rmi", "two:2").stdout
    assert f"Deleted: {image_id}" in out
    assert images_json(cli) == []
    cli("gc")
    with Store.open(root) as s:
        u = usage(s.env)
        assert (u.images, u.layers, u.chunk_count, u.stored_bytes) == (0, 0, 0, 0)
        with s.env.read() as txn:
            for db in ("files", "entries", "layers", "images", "names"):
                assert txn.stat(s.env.db(db))["entries"] == 0, db
    assert_clean(root)


def test_gc_removes_what_a_failed_import_left(tmp_path: Path, cli, root: Path) -> None:
    rnd = random.Random(10)
    good = layer_tar({"lib/a.so": rnd.randbytes(2 * MiB), "etc/x": b"x"})
    bad = layer_tar({"data/b": rnd.randbytes(3 * MiB)})
    write_layout(tmp_path / "lay", [{"layers": [good, bad],
                                     "diff_ids": [sha256(good), sha256(b"something else")]}])
    p = cli("import", tmp_path / "lay", "--tag", "bad:1", check=False)
    msg = one_line_error(p)
    assert "diff_id" in msg and str(tmp_path / "lay") in msg
    assert images_json(cli) == []
    rep = json.loads(cli("check", "--json").stdout)
    assert rep["clean"] and rep["damage"] == []
    # Nothing is visible (layers and image commit together), but the chunks of both
    # layers were written before the second diff_id turned out wrong.
    assert rep["layers"] == rep["images"] == 0
    assert rep["garbage_layers"] == 0
    assert rep["garbage_chunks"] > 0 and rep["garbage_files"] > 0
    with Store.open(root) as s:
        assert usage(s.env).chunk_bytes >= 5 * MiB
        # Entries whose layer record never got written (no import does this, but gc
        # must cope): a layer number nobody has.
        orphan = Entry(0, size=0)
        s.env.write(lambda txn: [txn.put(entry_key(4242, p), orphan.encode(),
                                         db=s.env.db("entries"))
                                 for p in (b"/", b"/x", b"/x/y")])
    (root / "tmp" / "import-leftover.tar").write_bytes(b"junk")
    out = cli("gc").stdout
    assert f"{rep['garbage_chunks']} chunks" in out, out
    rep = json.loads(cli("check", "--json").stdout)
    assert rep["clean"]
    assert (rep["garbage_layers"], rep["garbage_chunks"], rep["garbage_files"]) == (0, 0, 0)
    with Store.open(root) as s, s.env.read() as txn:
        for db in ("chunks", "files", "entries", "layers", "images", "names"):
            assert txn.stat(s.env.db(db))["entries"] == 0, db
    assert not (root / "tmp" / "import-leftover.tar").exists()
    # The store is fine for the next import of the corrected image.
    write_layout(tmp_path / "ok", [{"layers": [good, bad]}])
    cli("import", tmp_path / "ok", "--tag", "ok:1")
    cli("export", "ok:1", tmp_path / "out.tar")
    assert_clean(root)


# --- check finds damage ---------------------------------------------------------------------


@pytest.fixture
def imported(tmp_path: Path, cli, root: Path):
    """A store with one image of two layers; returns (diff_ids, files)."""
    rnd = random.Random(11)
    files1 = {"bin/sh": rnd.randbytes(600 * KiB), "etc/passwd": b"root:x:0:0::/root:/bin/sh\n"}
    files2 = {"app/data": rnd.randbytes(1 * MiB)}
    tars = [layer_tar(files1), layer_tar(files2)]
    write_layout(tmp_path / "lay", [{"layers": tars}])
    cli("import", tmp_path / "lay", "--tag", "img:1")
    assert_clean(root)
    return [sha256(t) for t in tars], {**files1, **files2}


def check_fails(cli, *expect: str) -> str:
    p = cli("check", check=False)
    assert p.returncode == 90, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    for e in expect:
        assert e in p.stdout, p.stdout
    return p.stdout


def _damage_chunk(s: Store, diff_id: str, vpath: bytes, index: int,
                  value: bytes | None) -> tuple[Any, bytes]:
    """Overwrite chunk ``index`` of a file with ``value`` (None: delete it); returns the
    file's entry and the chunk's key."""
    e = entries_of(s, diff_id)[vpath]
    with s.env.read() as txn:
        key = chunks.get_file(txn, s.env, e.digest).chunks[index][0]
    db = s.env.db("chunks")
    s.env.write(lambda txn: txn.put(key, value, db=db) if value is not None else txn.delete(key, db=db))
    return e, key


def test_check_finds_a_corrupt_chunk(imported, cli, root: Path) -> None:
    diff_ids, _ = imported
    with Store.open(root) as s:
        e, key = _damage_chunk(s, diff_ids[1], b"/app/data", 1, b"\x00garbage")
        r = check(s.env)
        assert not r.clean
        assert any(key.hex()[:16] in d for d in r.damage), r.damage
    out = check_fails(cli, f"chunk {key.hex()[:16]}", "DAMAGED")
    assert f"file {e.digest.hex()[:16]}" in out or "app" in out or diff_ids[1] in out
    # Reading the damaged file is an error with the store's exit code, not a traceback.
    p = cli("export", "img:1", root.parent / "out", check=False)
    assert p.returncode == 90 and "Traceback" not in p.stderr, p.stderr
    assert not (root.parent / "out").exists()


def test_check_finds_an_undecodable_chunk(imported, cli, root: Path) -> None:
    diff_ids, _ = imported
    with Store.open(root) as s:
        _, key = _damage_chunk(s, diff_ids[0], b"/bin/sh", 0, b"\x01not zstd")
    check_fails(cli, f"chunk {key.hex()[:16]}")


def test_check_finds_a_missing_file_record(imported, cli, root: Path) -> None:
    diff_ids, _ = imported
    with Store.open(root) as s:
        e = entries_of(s, diff_ids[0])[b"/bin/sh"]
        s.env.write(lambda txn: txn.delete(e.digest, db=s.env.db("files")))
        r = check(s.env)
        assert not r.clean
    check_fails(cli, e.digest.hex()[:16], diff_ids[0])


def test_check_finds_a_missing_chunk(imported, cli, root: Path) -> None:
    diff_ids, _ = imported
    with Store.open(root) as s:
        e, _ = _damage_chunk(s, diff_ids[1], b"/app/data", 0, None)
    check_fails(cli, f"file {e.digest.hex()[:16]}")


def test_check_finds_an_image_with_a_missing_layer(imported, cli, root: Path) -> None:
    diff_ids, _ = imported
    with Store.open(root) as s:
        key = bytes.fromhex(diff_ids[1].split(":")[1])
        s.env.write(lambda txn: txn.delete(key, db=s.env.db("layers")))
    check_fails(cli, f"layer {diff_ids[1]} is missing")
    p = cli("export", "img:1", root.parent / "out", check=False)
    assert p.returncode == 90 and diff_ids[1] in one_line_error(p)


def test_check_finds_a_layer_with_a_missing_entry(imported, cli, root: Path) -> None:
    diff_ids, _ = imported
    with Store.open(root) as s:
        rec = get_layer(s, diff_ids[0])
        s.env.write(lambda txn: txn.delete(entry_key(rec.layer_no, b"/etc/passwd"),
                                           db=s.env.db("entries")))
    check_fails(cli, diff_ids[0])


def test_check_finds_a_corrupt_record(imported, cli, root: Path) -> None:
    diff_ids, _ = imported
    with Store.open(root) as s:
        rec = get_layer(s, diff_ids[0])
        s.env.write(lambda txn: txn.put(entry_key(rec.layer_no, b"/etc/passwd"), b"\xc1junk",
                                        db=s.env.db("entries")))
    check_fails(cli, diff_ids[0])


def test_check_finds_a_name_without_image(imported, cli, root: Path) -> None:
    with Store.open(root) as s:
        s.env.write(lambda txn: txn.put(b"ghost:1", b"sha256:" + b"0" * 64,
                                        db=s.env.db("names")))
    check_fails(cli, "ghost:1")


# --- names -----------------------------------------------------------------------------------


def test_names_and_id_prefixes(tmp_path: Path, cli, root: Path) -> None:
    assert normalize_name("alpine") == "alpine:latest"
    assert normalize_name("alpine:3.19") == "alpine:3.19"
    assert normalize_name("localhost:5000/x/alpine") == "localhost:5000/x/alpine:latest"
    tar = layer_tar({"bin/busybox": random.Random(12).randbytes(50 * KiB)})
    (tmp_path / "l.tar").write_bytes(tar)
    image_id = cli("import", tmp_path / "l.tar", "--tag", "alpine").stdout.split()[0]
    rows = images_json(cli)
    assert [(r["repository"], r["tag"], r["name"]) for r in rows] == \
        [("alpine", "latest", "alpine:latest")]
    hexid = image_id.split(":")[1]
    for ref in ["alpine:latest", image_id, hexid, hexid[:12], "sha256:" + hexid[:12]]:
        assert json.loads(cli("inspect", ref).stdout)[0]["Id"] == image_id
    for n, ref in enumerate(["alpine", hexid[:4]]):
        assert cli("export", ref, tmp_path / f"out{n}").stdout.strip() == image_id
    p = cli("export", "nosuch", tmp_path / "x", check=False)
    assert "no such image" in one_line_error(p) and p.returncode == 5
    p = cli("export", "alpine:3", tmp_path / "x", check=False)
    assert "no such image" in one_line_error(p)
    p = cli("tag", "alpine", "Bad Name!", check=False)
    assert "invalid" in one_line_error(p)
    assert_clean(root)


def test_ambiguous_id_prefix(tmp_path: Path, cli, root: Path) -> None:
    tar = layer_tar({"f": b"same layer"})
    # Two configs whose ids share their first 4 hex digits (a birthday search).
    seen: dict[str, int] = {}
    nonce = 0
    while True:
        nonce += 1
        cfg_id = write_layout_id(tar, nonce)
        if cfg_id[:4] in seen:
            pair = (seen[cfg_id[:4]], nonce)
            prefix = cfg_id[:4]
            break
        seen[cfg_id[:4]] = nonce
    ids = write_layout(tmp_path / "lay", [
        {"layers": [tar], "name": f"amb:{n}", "extra": {"author": f"nonce {n}"}} for n in pair])
    assert ids[0][7:11] == ids[1][7:11] == prefix and ids[0] != ids[1]
    cli("import", tmp_path / "lay")
    assert sorted(r["name"] for r in images_json(cli)) == sorted(f"amb:{n}" for n in pair)
    for ref in (prefix, "sha256:" + prefix):
        p = cli("export", ref, tmp_path / "out", check=False)
        assert "ambiguous" in one_line_error(p)
        p = cli("rmi", ref, check=False)
        assert "ambiguous" in one_line_error(p)
    with Store.open(root) as s, s.env.read() as txn:
        with pytest.raises(AmbiguousNameError):
            resolve(txn, s.env, prefix)
        with pytest.raises(ImageNotFoundError):
            resolve(txn, s.env, "ffff" if not prefix.startswith("ffff") else "eeee")
        # a longer prefix picks one
        for i in ids:
            assert resolve(txn, s.env, i.split(":")[1][:20]).id == i
    assert len(images_json(cli)) == 2
    assert_clean(root)


def write_layout_id(tar: bytes, n: int) -> str:
    """The image id (hex) that write_layout gives an image with this nonce."""
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]}, "author": f"nonce {n}",
    }).encode()
    return hashlib.sha256(config).hexdigest()


# --- imports and gc exclude each other --------------------------------------------------------


def test_gc_does_not_run_during_an_import(store: Store, cli, root: Path) -> None:
    with store.importing():
        t0 = time.monotonic()
        p = cli("gc", "--wait", "0.5", check=False)
        took = time.monotonic() - t0
    msg = one_line_error(p)
    assert "import" in msg and "gc" in msg, msg
    assert 0.5 <= took < 10
    cli("gc", "--wait", "0.5")  # free again
    assert_clean(root)


def test_import_waits_for_gc(store: Store, tmp_path: Path, root: Path, cli) -> None:
    tar = layer_tar({"f": b"content"})
    (tmp_path / "l.tar").write_bytes(tar)
    with store.collecting(wait=1):
        proc = subprocess.Popen([sys.executable, "-m", "layerstore", "--root", str(root),
                                 "import", str(tmp_path / "l.tar"), "--tag", "w:1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None, "the import did not wait for gc"
        with store.env.read() as txn:
            assert txn.stat(store.env.db("chunks"))["entries"] == 0
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [r["name"] for r in images_json(cli)] == ["w:1"]
    assert_clean(root)


def test_check_finds_a_corrupt_image_record(imported, cli, root: Path) -> None:
    image_id = images_json(cli)[0]["id"]
    with Store.open(root) as s:
        s.env.write(lambda txn: txn.put(bytes.fromhex(image_id.split(":")[1]), b"\x93junk",
                                        db=s.env.db("images")))
    check_fails(cli, f"image {image_id}")
    # gc must not sweep anything while it cannot read what is live
    p = cli("gc", check=False)
    assert p.returncode == 90 and "corrupt" in one_line_error(p)
    with Store.open(root) as s, s.env.read() as txn:
        assert txn.stat(s.env.db("layers"))["entries"] == 2
