"""Lazy, block-level copy-up (``--copy-up lazy``, ``layerstore/overlay/lazy.py``): the
first write to a big lower file copies only the units it touches.

In-process (``OverlayFS``): what is read from the lowers, what the upper holds, the
content after random writes and truncates against a model (also after a "remount"),
hard links, renames, read handles opened before, the mark going once every unit is
filled, and commit. Through the mount (``layerstore mount --copy-up lazy``): a write
and a read back across a remount, and kill -9 of the daemon during random writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_clean
from helpers_images import OciLayout, tar_bytes
from helpers_overlay import count_lower_reads as _count_lower_reads
from helpers_overlay import read_all as _read_all

from layerstore.overlay.fs import LAZY, OverlayFS
from layerstore.overlay.lazy import LAZY_MIN, LAZY_XATTR
from layerstore.overlay.lower import MergedLowers, StoreLayers
from layerstore.overlay.upper import METACOPY_XATTR, ORIGIN_XATTR
from layerstore.store import Store
from layerstore.store.images import resolve

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (trusted.* xattrs)")
pytestmark = needs_root

MiB = 1 << 20
UNIT = 256 << 10
BIG = 5 * MiB + 12345  # not a multiple of the unit: the last unit is short


def _content(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def big_image(tmp_path: Path, cli, root: Path) -> Path:
    """lazy:1 with /big (random, BIG bytes), /big2 (a hard link of it), /small."""

    def ti(name: str, type_: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
        t = tarfile.TarInfo(name)
        t.type, t.mode, t.linkname, t.mtime = type_, 0o644, link, 1_650_000_000
        return t

    layer = tar_bytes([
        (ti("data", tarfile.DIRTYPE), None),
        (ti("data/big"), _content(1, BIG)),
        (ti("data/big2", tarfile.LNKTYPE, "data/big"), None),
        (ti("data/small"), b"small file\n"),
    ])
    lay = OciLayout(tmp_path / "lazy-oci")
    mdesc, _, _ = lay.image([layer])
    lay.add(mdesc, ref="1", name="lazy:1")
    lay.write_index()
    cli("import", tmp_path / "lazy-oci")
    return root


class Opener:
    def __init__(self, root: Path, tmp: Path):
        self.store = Store.open(root)
        self.tmp = tmp
        self.opened: list[OverlayFS] = []

    def make(self, name: str = "c") -> OverlayFS:
        with self.store.env.read() as txn:
            img = resolve(txn, self.store.env, "lazy:1")
        upper, work = self.tmp / f"{name}-upper", self.tmp / f"{name}-work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        ofs = OverlayFS(MergedLowers(StoreLayers(self.store, img.diff_ids)), upper, work, LAZY)
        self.opened.append(ofs)
        return ofs

    def close(self) -> None:
        for o in self.opened:
            o.close()
        self.store.close()


@pytest.fixture
def opener(big_image: Path, tmp_path: Path):
    o = Opener(big_image, tmp_path)
    yield o
    o.close()
    assert_clean(big_image)


def _upper(ofs: OverlayFS, rel: str) -> str:
    return f"/proc/self/fd/{ofs.upper_fd}/{rel}"


def _xattrs(ofs: OverlayFS, rel: str) -> set[bytes]:
    return {os.fsencode(n) for n in os.listxattr(_upper(ofs, rel))}


def test_first_write_copies_only_the_unit_it_touches(opener: Opener, monkeypatch):
    ofs = opener.make()
    ino = ofs.getattr(b"/data/big")["st_ino"]
    reads = _count_lower_reads(ofs, monkeypatch)
    fh = ofs.open(b"/data/big", os.O_WRONLY)
    assert reads == []  # the open copies nothing
    off = 3 * MiB + 7
    assert ofs.write(fh, b"X", off) == 1
    ofs.release(fh)
    # one unit was filled from the lowers: the one around the byte
    assert reads == [(b"/data/big", 3 * MiB, UNIT)]
    st = os.stat(_upper(ofs, "data/big"))
    assert st.st_size == BIG and st.st_blocks * 512 <= 2 * UNIT
    xs = _xattrs(ofs, "data/big")
    assert LAZY_XATTR in xs and ORIGIN_XATTR in xs and METACOPY_XATTR not in xs
    want = bytearray(_content(1, BIG))
    want[off] = ord("X")
    assert _read_all(ofs, b"/data/big") == want
    # the hard link is the same inode with the same content
    assert _read_all(ofs, b"/data/big2") == want
    assert ofs.getattr(b"/data/big")["st_ino"] == ofs.getattr(b"/data/big2")["st_ino"] == ino
    assert os.stat(_upper(ofs, "data/big2")).st_ino == st.st_ino
    # a "remount" (a new OverlayFS on the same upper) reads the same
    assert _read_all(opener.make(), b"/data/big") == want


def test_small_files_are_copied_whole(opener: Opener):
    ofs = opener.make()
    fh = ofs.open(b"/data/small", os.O_WRONLY)
    ofs.write(fh, b"S", 0)
    ofs.release(fh)
    assert _read_all(ofs, b"/data/small") == b"Small file\n"
    assert LAZY_XATTR not in _xattrs(ofs, "data/small")
    assert LAZY_MIN > len(b"small file\n")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_writes_and_truncates_match_a_model(opener: Opener, seed: int):
    ofs = opener.make()
    rng = random.Random(seed)
    model = bytearray(_content(1, BIG))
    fh = ofs.open(b"/data/big", os.O_RDWR)
    for step in range(40):
        op = rng.random()
        if op < 0.75:
            size = rng.choice([1, 100, 4096, UNIT, UNIT + 1, 700_000])
            off = rng.randrange(0, len(model) + 2 * UNIT)
            data = rng.randbytes(size)
            assert ofs.write(fh, data, off) == size
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + size] = data
        elif op < 0.9:
            n = rng.randrange(0, len(model) + UNIT)
            ofs.ftruncate(fh, n)
            model = model[:n] + bytearray(max(0, n - len(model)))
        else:
            n = rng.randrange(0, len(model) + UNIT)
            ofs.truncate(b"/data/big", n)
            model = model[:n] + bytearray(max(0, n - len(model)))
        if step % 8 == 7:
            assert _read_all(ofs, b"/data/big") == model, f"step {step}"
            off = rng.randrange(0, len(model) + 1)
            assert ofs.read(fh, 333_333, off) == model[off:off + 333_333]
    ofs.release(fh)
    assert _read_all(ofs, b"/data/big") == model
    assert ofs.getattr(b"/data/big")["st_size"] == len(model)
    assert _read_all(opener.make(), b"/data/big") == model


def test_the_mark_goes_once_every_unit_is_filled(opener: Opener):
    ofs = opener.make()
    fh = ofs.open(b"/data/big", os.O_WRONLY)
    for off in range(0, BIG, UNIT):
        ofs.write(fh, b"Z", off + 5)
    ofs.release(fh)
    assert LAZY_XATTR not in _xattrs(ofs, "data/big")
    want = bytearray(_content(1, BIG))
    for off in range(0, BIG, UNIT):
        want[off + 5] = ord("Z")
    assert _read_all(ofs, b"/data/big") == want
    assert os.stat(_upper(ofs, "data/big")).st_blocks * 512 >= BIG  # a whole file now
    with open(_upper(ofs, "data/big"), "rb") as f:
        assert f.read() == want


def test_metacopy_then_write_then_rename(opener: Opener):
    ofs = opener.make()
    ofs.chmod(b"/data/big", 0o600)  # metadata only, in the kernel's format
    assert METACOPY_XATTR in _xattrs(ofs, "data/big")
    r = ofs.open(b"/data/big", os.O_RDONLY)  # opened before the write: follows it
    fh = ofs.open(b"/data/big", os.O_WRONLY)
    ofs.write(fh, b"hello", MiB)
    ofs.release(fh)
    xs = _xattrs(ofs, "data/big")
    assert LAZY_XATTR in xs and METACOPY_XATTR not in xs
    want = bytearray(_content(1, BIG))
    want[MiB:MiB + 5] = b"hello"
    assert ofs.read(r, 10, MiB - 2) == bytes(want[MiB - 2:MiB + 8])
    ofs.release(r)
    assert stat.S_IMODE(ofs.getattr(b"/data/big")["st_mode"]) == 0o600
    ofs.rename(b"/data/big", b"/moved")  # the mark names its lower file absolutely
    ofs.rename(b"/data", b"/dir2")
    assert _read_all(ofs, b"/moved") == want
    assert _read_all(ofs, b"/dir2/big2") == want
    assert _read_all(opener.make(), b"/moved") == want


def test_o_trunc_drops_the_mark(opener: Opener):
    ofs = opener.make()
    fh = ofs.open(b"/data/big", os.O_WRONLY)
    ofs.write(fh, b"x", 10)
    ofs.release(fh)
    fh = ofs.open(b"/data/big", os.O_WRONLY | os.O_TRUNC)
    ofs.write(fh, b"new", 0)
    ofs.release(fh)
    assert LAZY_XATTR not in _xattrs(ofs, "data/big")
    assert _read_all(ofs, b"/data/big") == b"new"


def test_commit_writes_the_merged_content(opener: Opener, cli, big_image: Path, tmp_path: Path):
    """``layerstore commit`` of a container whose upper has a lazy file."""
    out = cli("create", "lazy:1", "--name", "c1").stdout.strip()
    cdir = next(p for p in (big_image / "containers").iterdir() if p.name.startswith(out[:12]))
    ofs = OverlayFS(opener.make().lowers, cdir / "upper", cdir / "work", LAZY)
    opener.opened.append(ofs)
    fh = ofs.open(b"/data/big", os.O_WRONLY)
    ofs.write(fh, b"committed", 2 * MiB + 3)
    ofs.release(fh)
    assert LAZY_XATTR in _xattrs(ofs, "data/big")
    cli("commit", "c1", "lazy:2")
    cli("create", "lazy:2", "--name", "c2")
    want = bytearray(_content(1, BIG))
    want[2 * MiB + 3:2 * MiB + 12] = b"committed"
    exported = tmp_path / "exp"
    cli("export", "lazy:2", exported)
    # the top layer of lazy:2 carries the whole file, without our mark
    import json
    idx = json.loads((exported / "index.json").read_text())
    man = json.loads((exported / "blobs/sha256" / idx["manifests"][0]["digest"].split(":")[1]).read_text())
    top = exported / "blobs/sha256" / man["layers"][-1]["digest"].split(":")[1]
    with tarfile.open(top) as tf:
        m = tf.getmember("data/big")
        assert not any("layerstore" in k for k in m.pax_headers)
        assert tf.extractfile(m).read() == want


# --- through the mount -------------------------------------------------------------------


@contextlib.contextmanager
def mounted(cli, name: str, mp: Path, *args: str):
    """``layerstore mount NAME MP ARGS``; always unmounted at the end (also when the
    daemon was killed); yields the daemon's pid."""
    cli("mount", name, mp, *args, timeout=60)
    try:
        assert os.path.ismount(mp)
        ps = {c["name"]: c for c in json.loads(cli("ps", "--json").stdout)}
        state = json.loads((Path(ps[name]["upper"]).parent / "mount.json").read_text())
        yield state["pid"]
    finally:
        p = cli("umount", name, check=False, timeout=60)
        assert p.returncode == 0, p.stderr
        assert not os.path.ismount(mp)


def test_mount_lazy_write_and_read_back(big_image: Path, cli, mnt: Path):
    cli("create", "lazy:1", "--name", "m1")
    mp = mnt
    want = bytearray(_content(1, BIG))
    with mounted(cli, "m1", mp, "--copy-up", "lazy"):
        with open(mp / "data/big", "r+b") as f:
            f.seek(4 * MiB + 1)
            f.write(b"through fuse")
        want[4 * MiB + 1:4 * MiB + 13] = b"through fuse"
        assert (mp / "data/big").read_bytes() == want
        assert (mp / "data/big2").read_bytes() == want
    with mounted(cli, "m1", mp, "--copy-up", "lazy"):
        assert (mp / "data/big").read_bytes() == want
    assert_clean(big_image)


def test_kill_during_lazy_writes(big_image: Path, cli, mnt: Path):
    """kill -9 of the daemon while a client writes at random places: after a remount
    the file holds every write that was acknowledged (the one in flight, or not), and
    the lower data everywhere else."""
    mp = mnt
    rng = random.Random(7)
    original = _content(1, BIG)
    written = 0  # trials in which some write was acknowledged before the kill
    for trial in range(20):
        name = f"k{trial}"
        cli("create", "lazy:1", "--name", name)
        model = bytearray(_content(1, BIG))
        inflight: list[tuple[int, bytes]] = []
        with mounted(cli, name, mp, "--copy-up", "lazy") as pid:
            stop = threading.Event()

            def writer() -> None:
                try:
                    fd = os.open(mp / "data/big", os.O_WRONLY)
                except OSError:
                    return
                try:
                    while not stop.is_set():
                        off = rng.randrange(0, BIG - 70_000)
                        data = rng.randbytes(rng.choice([1, 4096, 70_000]))
                        inflight[:] = [(off, data)]
                        n = os.pwrite(fd, data, off)
                        # the kernel may split a write into several requests: a kill
                        # between them makes it short (the rest was not written)
                        model[off:off + n] = data[:n]
                        inflight[:] = [(off + n, data[n:])] if n < len(data) else []
                        if n < len(data):
                            return
                except OSError:
                    pass
                finally:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(rng.uniform(0.01, 0.25))
            os.kill(pid, signal.SIGKILL)
            stop.set()
            t.join(10)
            assert not t.is_alive()
        with mounted(cli, name, mp, "--copy-up", "lazy"):
            got = (mp / "data/big").read_bytes()
        # the write in flight may be there, absent, or in part (like a plain file's
        # write cut by a crash); everything else is exactly the model
        lo, hi = (inflight[0][0], inflight[0][0] + len(inflight[0][1])) if inflight else (0, 0)
        assert len(got) == BIG
        assert got[:lo] == model[:lo] and got[hi:] == model[hi:], f"trial {trial}"
        if inflight:
            new = inflight[0][1]
            assert all(g in (m, n) for g, m, n in zip(got[lo:hi], model[lo:hi], new)), trial
        written += model != original
        cli("rm", name)
    assert written >= 10  # the kills landed while writes went on
    assert_clean(big_image)


def test_materialize_then_kernel_overlayfs_reads_the_upper(big_image: Path, cli, mnt: Path,
                                                           tmp_path: Path):
    """``layerstore materialize``: lazy and metacopy files get their whole data; kernel
    overlayfs (without metacopy=on) over the image's layers then shows the same files."""
    from helpers_mount import extract_as_overlay_lower

    cli("create", "lazy:1", "--name", "mat")
    want = bytearray(_content(1, BIG))
    with mounted(cli, "mat", mnt, "--copy-up", "lazy"):
        with open(mnt / "data/big", "r+b") as f:
            f.seek(MiB)
            f.write(b"lazy write")
        want[MiB:MiB + 10] = b"lazy write"
        os.chmod(mnt / "data/small", 0o600)  # metacopy
        p = cli("materialize", "mat", check=False)
        assert p.returncode != 0 and "mounted" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    ps = {c["name"]: c for c in json.loads(cli("ps", "--json").stdout)}
    upper = Path(ps["mat"]["upper"])
    assert LAZY_XATTR in {os.fsencode(n) for n in os.listxattr(upper / "data/big")}
    assert cli("materialize", "mat").stdout.strip() == "2 files filled"
    for rel in ("data/big", "data/small"):
        xs = {os.fsencode(n) for n in os.listxattr(upper / rel)}
        assert LAZY_XATTR not in xs and METACOPY_XATTR not in xs
    assert (upper / "data/big").read_bytes() == want
    assert cli("materialize", "mat").stdout.strip() == "0 files filled"
    # kernel overlayfs over the image's layer and this upper
    exported = tmp_path / "exp"
    cli("export", "lazy:1", exported)
    idx = json.loads((exported / "index.json").read_text())
    man = json.loads((exported / "blobs/sha256" / idx["manifests"][0]["digest"].split(":")[1]).read_text())
    lower = tmp_path / "klower"
    extract_as_overlay_lower(exported / "blobs/sha256" / man["layers"][0]["digest"].split(":")[1], lower)
    kmnt, kwork = tmp_path / "kmnt", tmp_path / "kwork"
    kmnt.mkdir()
    kwork.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={kwork}", str(kmnt)], check=True)
    try:
        assert (kmnt / "data/big").read_bytes() == want
        assert (kmnt / "data/big2").read_bytes() == want
        assert (kmnt / "data/small").read_bytes() == b"small file\n"
        assert stat.S_IMODE(os.stat(kmnt / "data/small").st_mode) == 0o600
    finally:
        subprocess.run(["umount", str(kmnt)], check=True)
    assert_clean(big_image)
