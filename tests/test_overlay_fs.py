"""The writable overlay (``layerstore.overlay.fs.OverlayFS``) without FUSE: the demo image
from the store as lowers, an upper and a work directory in tmp.

1. A table of cases asserting errno, and the upper format: whiteouts, opaque
   directories, copy-up of data and metadata, O_TRUNC, hard links, rename of lower
   directories, a hostile upper (symlinked parents) that must not be written through.
2. The same operation script on kernel overlayfs (same layers extracted as lowers, its
   own upper/work, ``redirect_dir=on`` so that lower directories can be renamed) and on
   ours: the same errno sequence and results, the same merged tree, an equivalent upper.
3. The store is untouched by all of it (``check`` clean, the image exports the same).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import assert_clean, run_cli
from helpers_images import OciLayout, diff_manifests, tar_bytes, tree_manifest
from helpers_mount import extract_as_overlay_lower
from helpers_overlay import count_lower_reads as _count_lower_reads
from helpers_overlay import read_all as _read_all

from layerstore.oci.sample import write_demo_layout
from layerstore.overlay.fs import FULL, LAZY, META, OverlayFS
from layerstore.overlay.lower import MergedLowers, StoreLayers
from layerstore.overlay.upper import METACOPY_XATTR, OPAQUE_XATTR, ORIGIN_XATTR, REDIRECT_XATTR
from layerstore.store import Store
from layerstore.store.images import resolve
from layerstore.store.records import DIR, join_vpath

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (trusted.* xattrs, mknod, chown)")
META_MTIME = 1_650_000_000


# --- fixtures --------------------------------------------------------------------------


def _meta_layout(path: Path) -> None:
    """A one-layer image with owners, setuid, xattrs, hard links, a symlink and a FIFO."""

    def ti(name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0,
           link: str = "", xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:
        t = tarfile.TarInfo(name)
        t.type, t.mode, t.uid, t.gid, t.linkname, t.mtime = type_, mode, uid, gid, link, META_MTIME
        if xattrs:
            t.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        return t

    layer = tar_bytes([
        (ti("data", tarfile.DIRTYPE, 0o750, 1000, 1000, xattrs={"user.dir": "d"}), None),
        (ti("data/f.txt", tarfile.REGTYPE, 0o4755, 1000, 1001,
            xattrs={"user.color": "blue", "trusted.t": "tv"}), b"metadata file\n"),
        (ti("data/h1", tarfile.REGTYPE, 0o644), b"linked\n"),
        (ti("data/h2", tarfile.LNKTYPE, 0o644, link="data/h1"), None),
        (ti("data/sl", tarfile.SYMTYPE, 0o777, 1000, 1000, link="f.txt"), None),
        (ti("data/p", tarfile.FIFOTYPE, 0o640, 1000, 1000), None),
        (ti("data/sub", tarfile.DIRTYPE, 0o755), None),
        (ti("data/sub/deep", tarfile.REGTYPE, 0o600, 5, 5), b"deep\n"),
    ])
    lay = OciLayout(path)
    mdesc, _, _ = lay.image([layer])
    lay.add(mdesc, ref="1", name="meta:1")
    lay.write_index()


@pytest.fixture
def images(tmp_path: Path, cli, root: Path) -> Path:
    """The store with demo:base, demo:app and meta:1 imported; returns the store root."""
    write_demo_layout(tmp_path / "demo-oci")
    cli("import", tmp_path / "demo-oci")
    _meta_layout(tmp_path / "meta-oci")
    cli("import", tmp_path / "meta-oci")
    return root


class Overlays:
    """Opens OverlayFS instances over images of one store; closes everything at the end."""

    def __init__(self, root: Path, tmp: Path):
        self.root = root
        self.store = Store.open(root)
        self.tmp = tmp
        self.opened: list[OverlayFS] = []

    def make(self, ref: str = "demo:app", name: str = "c", copy_up: str = FULL) -> OverlayFS:
        with self.store.env.read() as txn:
            img = resolve(txn, self.store.env, ref)
        upper, work = self.tmp / f"{name}-upper", self.tmp / f"{name}-work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        ofs = OverlayFS(MergedLowers(StoreLayers(self.store, img.diff_ids)), upper, work, copy_up)
        self.opened.append(ofs)
        return ofs

    def close(self) -> None:
        for o in self.opened:
            o.close()
        self.opened.clear()
        if self.store is not None:
            self.store.close()
            self.store = None


@pytest.fixture
def overlays(images: Path, tmp_path: Path):
    o = Overlays(images, tmp_path)
    yield o
    o.close()
    assert_clean(images)


@pytest.fixture
def ofs(overlays: Overlays) -> OverlayFS:
    return overlays.make()


def upper_of(ofs: OverlayFS, rel: str) -> Path:
    """Host path of an upper entry (tests only: the overlay itself never builds these)."""
    return Path(f"/proc/self/fd/{ofs.upper_fd}") / rel


# --- one executor per side, one step language ------------------------------------------


def ours(ofs: OverlayFS, op: str, *a: Any) -> Any:
    """One script step on our overlay; returns the step's result (None if none)."""
    if op == "stat":
        st = ofs.getattr(a[0])
        return (stat.filemode(st["st_mode"]), st["st_uid"], st["st_gid"],
                st["st_size"] if not stat.S_ISDIR(st["st_mode"]) else None)
    if op == "read":
        return _read_all(ofs, a[0])
    if op in ("write", "append"):
        flags = os.O_WRONLY | (os.O_APPEND if op == "append" else 0)
        fh = ofs.open(a[0], flags)
        try:
            off = a[1] if op == "write" else ofs.fgetattr(fh)["st_size"]
            ofs.write(fh, a[-1], off)
        finally:
            ofs.release(fh)
        return None
    if op == "open_trunc":
        ofs.release(ofs.open(a[0], os.O_WRONLY | os.O_TRUNC))
        return None
    if op == "create":  # owned by the caller, root, as the FUSE adapter passes it
        ofs.release(ofs.create(a[0], a[1], os.O_WRONLY, uid=0, gid=0))
        return None
    if op == "mkdir":
        ofs.mkdir(a[0], a[1], uid=0, gid=0)
        return None  # (its attributes: "stat" steps compare those)
    if op in ("symlink", "link", "mknod", "rename"):
        getattr(ofs, op)(*a)
        return None
    if op == "listdir":
        return [n for n, _ in ofs.readdir(a[0])]
    if op == "listxattr":
        return sorted(ofs.listxattr(a[0]))
    if op == "utime":
        return ofs.utimens(a[0], a[1])
    return getattr(ofs, op)(*a)


def kernel(mnt: Path, op: str, *a: Any) -> Any:
    """The same step through a kernel overlayfs mount with os calls."""
    base = os.fsencode(mnt)

    def p(v: bytes) -> bytes:
        return base + v if v != b"/" else base

    if op == "stat":
        st = os.lstat(p(a[0]))
        return (stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None)
    if op == "read":
        with open(p(a[0]), "rb") as f:
            return f.read()
    if op in ("write", "append"):
        fd = os.open(p(a[0]), os.O_WRONLY | (os.O_APPEND if op == "append" else 0))
        try:
            if op == "write":
                os.pwrite(fd, a[-1], a[1])
            else:
                os.write(fd, a[-1])
        finally:
            os.close(fd)
        return None
    if op == "open_trunc":
        os.close(os.open(p(a[0]), os.O_WRONLY | os.O_TRUNC))
        return None
    if op == "create":
        os.close(os.open(p(a[0]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, a[1]))
        return None
    if op == "listdir":
        return sorted(os.listdir(p(a[0])))
    if op == "listxattr":
        return sorted(os.fsencode(n) for n in os.listxattr(p(a[0]), follow_symlinks=False))
    if op == "getxattr":
        return os.getxattr(p(a[0]), a[1], follow_symlinks=False)
    if op == "setxattr":
        return os.setxattr(p(a[0]), a[1], a[2], a[3], follow_symlinks=False)
    if op == "removexattr":
        return os.removexattr(p(a[0]), a[1], follow_symlinks=False)
    if op == "utime":
        return os.utime(p(a[0]), ns=a[1], follow_symlinks=False)
    if op == "readlink":
        return os.readlink(p(a[0]))
    if op in ("rename", "link"):
        return getattr(os, op)(p(a[0]), p(a[1]))
    if op == "symlink":
        return os.symlink(a[0], p(a[1]))
    if op in ("mkdir", "chmod"):
        return getattr(os, op)(p(a[0]), a[1])
    if op == "chown":
        return os.chown(p(a[0]), a[1], a[2])
    if op == "mknod":
        return os.mknod(p(a[0]), a[1], a[2])
    if op == "truncate":
        return os.truncate(p(a[0]), a[1])
    return getattr(os, op)(p(a[0]))  # unlink, rmdir


def run_step(fn, *args: Any) -> tuple[int, Any]:
    try:
        out = fn(*args)
    except OSError as exc:
        assert exc.errno, exc
        return exc.errno, None
    if isinstance(out, list):
        out = [os.fsencode(x) for x in out]
    elif isinstance(out, str):
        out = os.fsencode(out)
    return 0, out


def kernel_dirs(cli: Any, tmp_path: Path) -> tuple[list[str], Path, Path, Path]:
    """demo:app's layers extracted as kernel overlayfs lowers (bottom first), and a new
    upper, work dir and mountpoint for the kernel side of a comparison."""
    lowers = []
    for i, tar in enumerate(_export_layers(cli, "demo:app", tmp_path / "exported")):
        d = tmp_path / f"lower{i}"
        extract_as_overlay_lower(tar, d)
        lowers.append(str(d))
    ku, kw, kmnt = tmp_path / "k-upper", tmp_path / "k-work", tmp_path / "k-mnt"
    for d in (ku, kw, kmnt):
        d.mkdir()
    return lowers, ku, kw, kmnt


def script_mismatches(kmnt: Path, other: Any, target: Any) -> list[str]:
    """Run SCRIPT step by step on the kernel mount and on ``target`` (through the step
    runner ``other``); the steps whose errno or result differ, described."""
    out = []
    for step in SCRIPT:
        k = run_step(kernel, kmnt, *step)
        o = run_step(other, target, *step)
        if k != o:
            out.append(f"{step[:2]}: kernel {os.strerror(k[0]) if k[0] else k[1]!r:.80} "
                       f"ours {os.strerror(o[0]) if o[0] else o[1]!r:.80}")
    return out


def errno_of(ofs: OverlayFS, steps: list[tuple]) -> int:
    """Run steps on ours; every step but the last must succeed; the last's errno (0 = ok)."""
    for step in steps[:-1]:
        e, _ = run_step(ours, ofs, *step)
        assert e == 0, (step, os.strerror(e))
    return run_step(ours, ofs, *steps[-1])[0]


@needs_root
def test_a_whiteout_with_nothing_below_is_made_over(ofs: OverlayFS):
    """An upper whiteout that hides nothing (left by another lower set, say), in an
    upper-only directory: a create, mkdir or symlink there replaces it as the kernel
    does (the new directory opaque), and a name that is there is EEXIST. A create
    with no lower entry below tries the file at once, and looks at the name only on
    EEXIST (session 17); this is that path."""
    ofs.mkdir(b"/new", 0o755)
    for name in ("f", "d", "l"):
        os.mknod(upper_of(ofs, f"new/{name}"), stat.S_IFCHR | 0o000, 0)
    assert ofs.readdir(b"/new") == []
    fh = ofs.create(b"/new/f", 0o640)
    ofs.write(fh, b"x", 0)
    ofs.release(fh)
    ofs.mkdir(b"/new/d", 0o700)
    ofs.symlink(b"f", b"/new/l")
    assert stat.S_ISREG(os.lstat(upper_of(ofs, "new/f")).st_mode)
    assert upper_of(ofs, "new/f").read_bytes() == b"x"
    assert stat.S_IMODE(ofs.getattr(b"/new/f")["st_mode"]) == 0o640
    assert os.getxattr(upper_of(ofs, "new/d"), OPAQUE_XATTR) == b"y"
    assert os.readlink(upper_of(ofs, "new/l")) == "f"
    assert [n for n, _ in ofs.readdir(b"/new")] == [b"d", b"f", b"l"]
    for call in (lambda: ofs.create(b"/new/f", 0o644), lambda: ofs.mkdir(b"/new/f", 0o755),
                 lambda: ofs.symlink(b"x", b"/new/d")):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EEXIST
    assert os.listdir(ofs.work_fd) == []  # the whiteouts went there, and were removed


# --- 1. table of cases -----------------------------------------------------------------

CASES = [
    ("getattr missing", [("stat", b"/nope")], errno.ENOENT),
    ("whited out in a lower layer", [("stat", b"/etc/motd")], errno.ENOENT),
    ("hidden by a lower opaque dir", [("stat", b"/var/cache/demo")], errno.ENOENT),
    ("path through a file", [("stat", b"/etc/passwd/x")], errno.ENOTDIR),
    ("open missing", [("read", b"/nope")], errno.ENOENT),
    ("create over a lower file (O_EXCL)", [("create", b"/etc/passwd", 0o644)], errno.EEXIST),
    ("create twice (O_EXCL)", [("create", b"/tmp/x", 0o644), ("create", b"/tmp/x", 0o644)], errno.EEXIST),
    ("create where the parent is missing", [("create", b"/nodir/x", 0o644)], errno.ENOENT),
    ("mknod of a 0/0 character device (a whiteout's form)",
     [("mknod", b"/tmp/wh", stat.S_IFCHR | 0o644, 0)], errno.EPERM),
    ("create under a file", [("create", b"/etc/passwd/x", 0o644)], errno.ENOTDIR),
    ("create over a lower whiteout", [("create", b"/etc/motd", 0o600)], 0),
    ("mkdir over a lower dir", [("mkdir", b"/etc", 0o755)], errno.EEXIST),
    ("mkdir under a missing dir", [("mkdir", b"/a/b", 0o755)], errno.ENOENT),
    ("rmdir a merged dir with lower children", [("rmdir", b"/usr")], errno.ENOTEMPTY),
    ("rmdir a lower dir with an upper child", [("create", b"/var/cache/n", 0o644),
                                               ("rmdir", b"/var/cache")], errno.ENOTEMPTY),
    ("rmdir once the lower children are gone", [("unlink", b"/app/hello.sh"), ("rmdir", b"/app")], 0),
    ("rmdir an empty lower dir (opaque in a lower layer)", [("rmdir", b"/var/cache")], 0),
    ("rmdir a file", [("rmdir", b"/etc/passwd")], errno.ENOTDIR),
    ("rmdir the root", [("rmdir", b"/")], errno.EBUSY),
    ("unlink a dir", [("unlink", b"/usr")], errno.EISDIR),
    ("unlink twice", [("unlink", b"/etc/group"), ("unlink", b"/etc/group")], errno.ENOENT),
    ("open a dir for writing", [("write", b"/etc", 0, b"x")], errno.EISDIR),
    ("truncate a dir", [("truncate", b"/etc", 0)], errno.EISDIR),
    ("rename a file over a dir", [("rename", b"/etc/passwd", b"/tmp")], errno.EISDIR),
    ("rename a dir over a file", [("rename", b"/tmp", b"/etc/passwd")], errno.ENOTDIR),
    ("rename a dir over a non-empty merged dir", [("rename", b"/tmp", b"/etc")], errno.ENOTEMPTY),
    ("rename a dir into itself", [("rename", b"/usr", b"/usr/share/x")], errno.EINVAL),
    ("rename missing", [("rename", b"/nope", b"/tmp/x")], errno.ENOENT),
    ("rename into a missing dir", [("rename", b"/etc/passwd", b"/nope/x")], errno.ENOENT),
    ("rename a dir over an empty lower dir", [("rename", b"/app-data", b"/root")], 0),
    ("link a dir", [("link", b"/etc", b"/tmp/x")], errno.EPERM),
    ("link over an existing name", [("link", b"/etc/passwd", b"/etc/group")], errno.EEXIST),
    ("readlink of a file", [("readlink", b"/etc/passwd")], errno.EINVAL),
    ("getxattr missing", [("getxattr", b"/etc/passwd", b"user.none")], errno.ENODATA),
    ("setxattr XATTR_CREATE twice", [("setxattr", b"/etc/passwd", b"user.a", b"1", 0),
                                     ("setxattr", b"/etc/passwd", b"user.a", b"2", os.XATTR_CREATE)],
     errno.EEXIST),
    ("the real opaque mark is hidden", [("getxattr", b"/var/cache", OPAQUE_XATTR)], errno.ENODATA),
    ("removexattr missing on a lower file", [("removexattr", b"/etc/passwd", b"user.x")], errno.ENODATA),
    ("vpath with ..", [("stat", b"/etc/../etc")], errno.EINVAL),
]


@needs_root
@pytest.mark.parametrize("name,steps,want", CASES, ids=[c[0] for c in CASES])
def test_errno_table(ofs: OverlayFS, name: str, steps: list[tuple], want: int):
    got = errno_of(ofs, steps)
    assert got == want, f"{name}: {os.strerror(got) if got else 'ok'} != {os.strerror(want) if want else 'ok'}"


def _walk_upper(ofs: OverlayFS) -> dict[str, os.stat_result]:
    base = upper_of(ofs, "")
    out = {}
    for d, dirs, files in os.walk(base):
        for n in dirs + files:
            full = os.path.join(d, n)
            out[os.path.relpath(full, base)] = os.lstat(full)
    return out


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@needs_root
def test_unlink_and_rmdir_leave_kernel_format(ofs: OverlayFS):
    ofs.unlink(b"/etc/group")
    st = os.lstat(upper_of(ofs, "etc/group"))
    assert _is_whiteout(st) and stat.S_IMODE(st.st_mode) == 0
    assert [n for n, _ in ofs.readdir(b"/etc")] == [b"os-release", b"passwd"]
    # a file only in the upper leaves nothing
    ofs.release(ofs.create(b"/etc/new", 0o644))
    ofs.unlink(b"/etc/new")
    assert not os.path.lexists(upper_of(ofs, "etc/new"))
    # rmdir + mkdir of a lower dir: an opaque dir, lower children gone for good
    ofs.unlink(b"/app/hello.sh")
    ofs.rmdir(b"/app")
    assert _is_whiteout(os.lstat(upper_of(ofs, "app")))
    assert b"app" not in [n for n, _ in ofs.readdir(b"/")]
    ofs.mkdir(b"/app", 0o711)
    assert os.getxattr(upper_of(ofs, "app"), OPAQUE_XATTR) == b"y"
    assert ofs.readdir(b"/app") == []
    with pytest.raises(OSError) as exc:
        ofs.getxattr(b"/app", OPAQUE_XATTR)  # overlayfs' own mark is hidden
    assert exc.value.errno == errno.ENODATA and ofs.listxattr(b"/app") == []
    ofs.setxattr(b"/app", OPAQUE_XATTR, b"n")  # the container's is stored escaped
    assert os.getxattr(upper_of(ofs, "app"), b"trusted.overlay.overlay.opaque") == b"n"
    assert os.getxattr(upper_of(ofs, "app"), OPAQUE_XATTR) == b"y"
    assert ofs.listxattr(b"/app") == [OPAQUE_XATTR] and ofs.getxattr(b"/app", OPAQUE_XATTR) == b"n"
    assert stat.S_IMODE(ofs.getattr(b"/app")["st_mode"]) == 0o711
    with pytest.raises(OSError) as exc:
        ofs.getattr(b"/app/hello.sh")
    assert exc.value.errno == errno.ENOENT
    # readdir never shows whiteouts anywhere
    for vpath in (b"/", b"/etc", b"/app"):
        for n, st2 in ofs.readdir(vpath):
            assert not n.startswith(b".wh.")
            assert not (stat.S_ISCHR(st2["st_mode"]) and st2.get("st_rdev", 1) == 0)
    # no temporary left in work
    assert os.listdir(f"/proc/self/fd/{ofs.work_fd}") == []


@needs_root
def test_copy_up_keeps_metadata(overlays: Overlays):
    ofs = overlays.make("meta:1")
    before = ofs.getattr(b"/data/f.txt")
    dir_before = ofs.getattr(b"/data")
    ofs.setxattr(b"/data/f.txt", b"user.new", b"1")  # a metadata change copies up
    up = os.lstat(upper_of(ofs, "data/f.txt"))
    assert stat.S_IMODE(up.st_mode) == 0o4755 and (up.st_uid, up.st_gid) == (1000, 1001)
    assert up.st_mtime_ns == before["st_mtime"] == META_MTIME * 10**9
    assert os.getxattr(upper_of(ofs, "data/f.txt"), "user.color") == b"blue"
    assert os.getxattr(upper_of(ofs, "data/f.txt"), "trusted.t") == b"tv"
    assert Path(upper_of(ofs, "data/f.txt")).read_bytes() == b"metadata file\n"
    # the parent directory was copied up with its metadata, not made opaque
    pd = os.lstat(upper_of(ofs, "data"))
    assert stat.S_IMODE(pd.st_mode) == 0o750 and pd.st_uid == 1000
    assert os.getxattr(upper_of(ofs, "data"), "user.dir") == b"d"
    with pytest.raises(OSError):
        os.getxattr(upper_of(ofs, "data"), OPAQUE_XATTR)
    assert ofs.getattr(b"/data")["st_ino"] == dir_before["st_ino"]  # merged dir keeps its ino
    assert sorted(ofs.listxattr(b"/data/f.txt")) == [b"trusted.t", b"user.color", b"user.new"]
    assert [n for n, _ in ofs.readdir(b"/data")] == [b"f.txt", b"h1", b"h2", b"p", b"sl", b"sub"]
    # symlink and FIFO copy-up (chown) keep their kind and target
    ofs.chown(b"/data/sl", 7, 8)
    assert os.readlink(upper_of(ofs, "data/sl")) == "f.txt" and os.lstat(upper_of(ofs, "data/sl")).st_uid == 7
    ofs.chmod(b"/data/p", 0o600)
    st = os.lstat(upper_of(ofs, "data/p"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 1000
    # utimens in ns
    ofs.utimens(b"/data/sub/deep", (1, 1_234_567_891_234_567_891))
    assert ofs.getattr(b"/data/sub/deep")["st_mtime"] == 1_234_567_891_234_567_891
    assert ofs.getattr(b"/data/sub/deep")["st_uid"] == 5


@needs_root
def test_o_trunc_copies_no_data_and_writes_copy_up(ofs: OverlayFS, monkeypatch):
    reads = _count_lower_reads(ofs, monkeypatch)
    fh = ofs.open(b"/app-data/blob.bin", os.O_WRONLY | os.O_TRUNC)
    assert reads == []
    ofs.write(fh, b"new", 0)
    ofs.release(fh)
    assert _read_all(ofs, b"/app-data/blob.bin") == b"new"
    assert os.lstat(upper_of(ofs, "app-data/blob.bin")).st_size == 3
    # a write in the middle copies the whole file first
    fh = ofs.open(b"/etc/passwd", os.O_RDWR)
    ofs.write(fh, b"ROOT", 0)
    ofs.release(fh)
    assert _read_all(ofs, b"/etc/passwd") == b"ROOT:x:0:0:root:/root:/bin/sh\n"
    # truncate to 0 copies nothing either
    reads.clear()
    ofs.truncate(b"/etc/os-release", 0)
    assert reads == [] and ofs.getattr(b"/etc/os-release")["st_size"] == 0


@needs_root
def test_hard_link_of_a_lower_file(ofs: OverlayFS):
    ofs.link(b"/etc/passwd", b"/tmp/pw")
    a, b = ofs.getattr(b"/etc/passwd"), ofs.getattr(b"/tmp/pw")
    assert a["st_ino"] == b["st_ino"] and a["st_nlink"] == b["st_nlink"] == 2
    assert _read_all(ofs, b"/tmp/pw") == _read_all(ofs, b"/etc/passwd") == b"root:x:0:0:root:/root:/bin/sh\n"
    fh = ofs.open(b"/tmp/pw", os.O_WRONLY | os.O_APPEND)
    ofs.write(fh, b"x\n", 30)
    ofs.release(fh)
    assert _read_all(ofs, b"/etc/passwd").endswith(b"x\n")
    # unlinking the lower name leaves a whiteout and the other link keeps the data
    ofs.unlink(b"/etc/passwd")
    assert _is_whiteout(os.lstat(upper_of(ofs, "etc/passwd")))
    assert ofs.getattr(b"/tmp/pw")["st_nlink"] == 1


BLOB = b"/app-data/blob.bin"


@needs_root
@pytest.mark.parametrize("op", ["chmod", "chown", "utimens", "setxattr", "removexattr"])
def test_metacopy_copies_metadata_only(overlays: Overlays, monkeypatch, op: str):
    ofs = overlays.make("demo:app", copy_up=META)
    before = ofs.getattr(BLOB)
    data = _read_all(ofs, BLOB)
    reads = _count_lower_reads(ofs, monkeypatch)
    if op == "removexattr":
        ofs.setxattr(BLOB, b"user.x", b"1")
        reads.clear()
    {"chmod": lambda: ofs.chmod(BLOB, 0o600), "chown": lambda: ofs.chown(BLOB, 7, 8),
     "utimens": lambda: ofs.utimens(BLOB, (1, 2)), "setxattr": lambda: ofs.setxattr(BLOB, b"user.x", b"1"),
     "removexattr": lambda: ofs.removexattr(BLOB, b"user.x")}[op]()
    assert reads == []
    up = upper_of(ofs, "app-data/blob.bin")
    st = os.lstat(up)
    assert st.st_size == len(data) and st.st_blocks <= 8  # sparse (an xattr block at most)
    assert os.getxattr(up, METACOPY_XATTR) == b""
    after = ofs.getattr(BLOB)
    for k in ("st_ino", "st_size", "st_blocks", "st_nlink"):
        assert after[k] == before[k], k
    assert _read_all(ofs, BLOB) == data
    # the first write puts the data into that same upper inode, then drops the mark
    fh = ofs.open(BLOB, os.O_WRONLY)
    ofs.write(fh, b"X", 5)
    assert ofs.fgetattr(fh)["st_ino"] == before["st_ino"]
    ofs.release(fh)
    assert os.lstat(up).st_ino == st.st_ino
    assert METACOPY_XATTR not in [os.fsencode(n) for n in os.listxattr(up)]
    assert _read_all(ofs, BLOB) == data[:5] + b"X" + data[6:]
    assert Path(up).read_bytes() == data[:5] + b"X" + data[6:]
    assert ofs.getattr(BLOB)["st_ino"] == before["st_ino"]


@needs_root
def test_metacopy_rename_link_and_truncate(overlays: Overlays, monkeypatch):
    ofs = overlays.make("demo:app", "m", copy_up=META)
    ino = ofs.getattr(BLOB)["st_ino"]
    data = _read_all(ofs, BLOB)
    reads = _count_lower_reads(ofs, monkeypatch)
    ofs.rename(BLOB, b"/tmp/moved")  # no data copied: the upper records where it is
    ofs.link(b"/tmp/moved", b"/linked")
    assert reads == []
    assert os.getxattr(upper_of(ofs, "tmp/moved"), REDIRECT_XATTR) == BLOB
    for v in (b"/tmp/moved", b"/linked"):
        assert _read_all(ofs, v) == data
        assert ofs.getattr(v)["st_ino"] == ino and ofs.getattr(v)["st_nlink"] == 2
    # after a remount too
    overlays.close()
    overlays.store = Store.open(overlays.root)
    ofs = overlays.make("demo:app", "m", copy_up=META)
    assert _read_all(ofs, b"/linked") == data and ofs.getattr(b"/linked")["st_ino"] == ino
    fh = ofs.open(b"/linked", os.O_RDWR | os.O_APPEND)
    ofs.write(fh, b"tail", len(data))
    ofs.release(fh)
    assert _read_all(ofs, b"/tmp/moved") == data + b"tail"
    # truncation of a metacopy file: to 0 copies nothing, to a length copies the data
    ofs.chmod(b"/etc/passwd", 0o600)
    ofs.chmod(b"/etc/group", 0o600)
    reads = _count_lower_reads(ofs, monkeypatch)
    ofs.truncate(b"/etc/passwd", 0)
    fh = ofs.open(b"/etc/group", os.O_WRONLY | os.O_TRUNC)
    ofs.release(fh)
    assert reads == []
    assert _read_all(ofs, b"/etc/passwd") == b"" and _read_all(ofs, b"/etc/group") == b""
    ofs.chmod(b"/etc/os-release", 0o600)
    text = _read_all(ofs, b"/etc/os-release")
    ofs.truncate(b"/etc/os-release", 4)
    assert _read_all(ofs, b"/etc/os-release") == text[:4]
    for rel in ("etc/passwd", "etc/group", "etc/os-release"):
        assert METACOPY_XATTR not in [os.fsencode(n) for n in os.listxattr(upper_of(ofs, rel))]


@needs_root
@pytest.mark.parametrize("copy_up", [FULL, META])
def test_lower_hard_links_stay_one_inode(overlays: Overlays, copy_up: str):
    ofs = overlays.make("meta:1", copy_up=copy_up)
    ino = ofs.getattr(b"/data/h1")["st_ino"]
    ofs.chmod(b"/data/h2", 0o600)  # copies both names up, as one upper inode
    for v in (b"/data/h1", b"/data/h2"):
        st = ofs.getattr(v)
        assert (st["st_ino"], st["st_nlink"], stat.S_IMODE(st["st_mode"])) == (ino, 2, 0o600)
    assert os.lstat(upper_of(ofs, "data/h1")).st_ino == os.lstat(upper_of(ofs, "data/h2")).st_ino
    fh = ofs.open(b"/data/h1", os.O_WRONLY | os.O_APPEND)
    ofs.write(fh, b"more\n", 7)
    ofs.release(fh)
    assert _read_all(ofs, b"/data/h2") == b"linked\nmore\n"
    dirs = {d: ofs.getattr(b"/data" + d)["st_ino"] for d in (b"", b"/sub")}
    ofs.rename(b"/data", b"/moved")  # the directory rename keeps them linked too
    assert ofs.getattr(b"/moved/h1")["st_ino"] == ofs.getattr(b"/moved/h2")["st_ino"] == ino
    # and the directories, copied up whole, keep their inode numbers
    assert {d: ofs.getattr(b"/moved" + d)["st_ino"] for d in dirs} == dirs
    assert {n: st["st_ino"] for n, st in ofs.readdir(b"/moved") if n == b"sub"} == {b"sub": dirs[b"/sub"]}


def test_a_hard_links_count_comes_from_its_layer_record(overlays: Overlays, monkeypatch,
                                                        cli, root: Path):
    """An import records each layer's hard-link groups (``LayerRecord.links``), so a
    mount gives a hard link its count without walking the layer (a first lookup of
    one walked all of it: ~36 ms for 5,000 entries, more for bigger images). A record
    from before session 17 has none: the walk still answers. And ``check`` finds a
    record whose groups are not its entries'."""
    import layerstore.overlay.lower as lower_mod
    from layerstore.store.records import LayerRecord

    store = overlays.store
    with store.env.read() as txn:
        img = resolve(txn, store.env, "meta:1")
        key = bytes.fromhex(img.diff_ids[0].split(":", 1)[1])
        rec = LayerRecord.decode(txn.get(key, db=store.env.db("layers")))
    assert rec.links is not None and sorted(rec.links.values()) == [[b"/data/h1", b"/data/h2"]]

    def no_walk(*args: Any) -> Any:
        raise AssertionError("the layer was walked")

    monkeypatch.setattr(lower_mod, "walk", no_walk)
    ofs = overlays.make("meta:1", name="recorded")
    assert ofs.getattr(b"/data/h2")["st_nlink"] == 2
    assert ofs.getattr(b"/data/f.txt")["st_nlink"] == 1
    monkeypatch.undo()

    # a record as written before: no groups (the walk finds them)
    old = LayerRecord.decode(rec.encode())
    old.links = None
    assert len(msgpack_unpack(old.encode())) == len(msgpack_unpack(rec.encode())) - 1
    layers_db = store.env.db("layers")
    store.env.write(lambda txn: txn.put(key, old.encode(), db=layers_db))
    ofs = overlays.make("meta:1", name="walked")
    assert ofs.getattr(b"/data/h2")["st_nlink"] == 2
    cli("check")

    # a record whose groups are wrong is damage
    bad = LayerRecord.decode(rec.encode())
    bad.links = {next(iter(rec.links)): [b"/data/h1"]}
    store.env.write(lambda txn: txn.put(key, bad.encode(), db=layers_db))
    got = run_cli("check", root=root, check=False)
    assert got.returncode != 0 and "hard links" in got.stdout + got.stderr
    store.env.write(lambda txn: txn.put(key, rec.encode(), db=layers_db))


@pytest.mark.parametrize("ref", ["demo:app", "demo:base", "meta:1"])
def test_a_listing_merges_its_children_as_lookups_do(overlays: Overlays, ref: str):
    """``MergedLowers.listdir`` merges each child from the layers' listings (one decode
    of each entry, session 17); a lookup of each path in a view that listed nothing
    gives the same nodes: entry, inode number, link count, directory layers."""
    with overlays.store.env.read() as txn:
        img = resolve(txn, overlays.store.env, ref)
    listed = MergedLowers(StoreLayers(overlays.store, img.diff_ids))
    looked = MergedLowers(StoreLayers(overlays.store, img.diff_ids))
    dirs, seen = [b"/"], 0
    while dirs:
        d = dirs.pop()
        for name, node in listed.listdir(d):
            path = join_vpath(d, name)
            other = looked.resolve(path)
            assert other is not None, path
            assert (node.vpath, node.entry, node.ino, node.nlink, node.layer, node.dir_layers) \
                == (other.vpath, other.entry, other.ino, other.nlink, other.layer,
                    other.dir_layers), path
            assert listed.resolve(path) is node  # the listing's node is the one kept
            seen += 1
            if node.entry.type == DIR:
                dirs.append(path)
    assert seen > 5


def msgpack_unpack(data: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@needs_root
@pytest.mark.parametrize("copy_up", [FULL, META])
def test_read_handle_follows_a_copy_up(overlays: Overlays, copy_up: str):
    """An fd opened for reading before another fd copies the file up reads the copy,
    as with kernel overlayfs."""
    ofs = overlays.make("demo:app", copy_up=copy_up)
    r = ofs.open(b"/etc/passwd", os.O_RDONLY)
    ofs.chmod(b"/etc/passwd", 0o600)
    w = ofs.open(b"/etc/passwd", os.O_WRONLY)
    ofs.write(w, b"ROOT", 0)
    ofs.release(w)
    assert ofs.read(r, 4, 0) == b"ROOT"
    assert ofs.fgetattr(r)["st_ino"] == ofs.getattr(b"/etc/passwd")["st_ino"]
    ofs.release(r)


@needs_root
@pytest.mark.parametrize("how", ["truncate", "o_trunc"])
def test_read_handle_follows_truncation_of_a_metacopy_file(overlays: Overlays, how: str):
    ofs = overlays.make("demo:app", copy_up=META)
    ofs.chmod(b"/etc/passwd", 0o644)  # metacopy
    r = ofs.open(b"/etc/passwd", os.O_RDONLY)
    if how == "truncate":
        ofs.truncate(b"/etc/passwd", 0)
    else:
        w = ofs.open(b"/etc/passwd", os.O_WRONLY | os.O_TRUNC)
        ofs.write(w, b"NEW\n", 0)
        ofs.release(w)
    assert ofs.read(r, 100, 0) == (b"" if how == "truncate" else b"NEW\n")
    assert ofs.fgetattr(r)["st_size"] == (0 if how == "truncate" else 4)
    ofs.release(r)


@needs_root
def test_new_entries_keep_setuid_and_links_keep_their_owner(ofs: OverlayFS):
    """A chown clears setuid/setgid: the owner goes first, then the mode; a hard link
    into a setgid directory changes nothing of the inode it links."""
    fh = ofs.create(b"/tmp/x", stat.S_IFREG | 0o6755, uid=1000, gid=4242)
    ofs.release(fh)
    ofs.mknod(b"/tmp/n", stat.S_IFREG | 0o4755, uid=1000, gid=1000)
    assert stat.S_IMODE(ofs.getattr(b"/tmp/x")["st_mode"]) == 0o6755
    assert stat.S_IMODE(ofs.getattr(b"/tmp/n")["st_mode"]) == 0o4755
    ofs.mkdir(b"/sg", 0o2775, uid=0, gid=4242)
    ofs.chown(b"/etc/passwd", 7, 8)
    ofs.chmod(b"/etc/passwd", 0o4755)
    ofs.link(b"/etc/passwd", b"/sg/pw")
    st = ofs.getattr(b"/etc/passwd")
    assert (st["st_uid"], st["st_gid"], stat.S_IMODE(st["st_mode"])) == (7, 8, 0o4755)


@needs_root
def test_commit_tar_keeps_the_containers_own_xattrs(ofs: OverlayFS):
    import io

    from layerstore.oci.commit import write_upper_tar

    ofs.setxattr(b"/etc/passwd", b"trusted.layerstore.mine", b"v")
    ofs.setxattr(b"/etc/passwd", b"trusted.overlay.mine", b"w")
    buf = io.BytesIO()
    write_upper_tar(Path(os.readlink(f"/proc/self/fd/{ofs.upper_fd}")), buf, ofs.lowers)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        m = tf.getmember("etc/passwd")
    assert m.pax_headers["SCHILY.xattr.trusted.layerstore.mine"] == "v"
    assert m.pax_headers["SCHILY.xattr.trusted.overlay.mine"] == "w"
    assert not any("origin" in k or "metacopy" in k for k in m.pax_headers)


@needs_root
@pytest.mark.parametrize("copy_up", [FULL, META])
def test_st_ino_stable_across_copy_up_and_remount(overlays: Overlays, copy_up: str):
    paths = [b"/etc/passwd", b"/bin/sh", b"/etc", b"/app-data/blob.bin"]
    ofs = overlays.make("demo:app", "i", copy_up=copy_up)
    inos = {v: ofs.getattr(v)["st_ino"] for v in paths}
    for v in paths:
        ofs.utimens(v, (1, 1))
    fh = ofs.open(b"/etc/passwd", os.O_WRONLY)
    ofs.write(fh, b"x", 0)
    ofs.release(fh)
    ofs.rename(b"/app-data/blob.bin", b"/blob")
    assert {v: ofs.getattr(v if v != BLOB else b"/blob")["st_ino"] for v in paths} == inos
    overlays.close()
    overlays.store = Store.open(overlays.root)
    ofs = overlays.make("demo:app", "i", copy_up=copy_up)
    assert {v: ofs.getattr(v if v != BLOB else b"/blob")["st_ino"] for v in paths} == inos


@needs_root
def test_rename_lower_and_merged_directories(overlays: Overlays):
    ofs = overlays.make("meta:1")
    ofs.release(ofs.create(b"/data/sub/upper-only", 0o644))
    ofs.unlink(b"/data/f.txt")
    tree_before = {n: _read_all(ofs, b"/data/" + n) for n in (b"h1", b"h2", b"sub/deep")}
    ofs.rename(b"/data", b"/moved")
    with pytest.raises(OSError) as exc:
        ofs.getattr(b"/data")
    assert exc.value.errno == errno.ENOENT
    assert [n for n, _ in ofs.readdir(b"/moved")] == [b"h1", b"h2", b"p", b"sl", b"sub"]
    assert [n for n, _ in ofs.readdir(b"/moved/sub")] == [b"deep", b"upper-only"]
    for n, content in tree_before.items():
        assert _read_all(ofs, b"/moved/" + n) == content
    # lower hard links inside the tree stay one inode
    assert ofs.getattr(b"/moved/h1")["st_ino"] == ofs.getattr(b"/moved/h2")["st_ino"]
    assert ofs.readlink(b"/moved/sl") == b"f.txt"
    assert ofs.getattr(b"/moved")["st_uid"] == 1000
    # upper: a whiteout at the old path, a self-contained opaque dir, no whiteouts inside
    assert _is_whiteout(os.lstat(upper_of(ofs, "data")))
    assert os.getxattr(upper_of(ofs, "moved"), OPAQUE_XATTR) == b"y"
    inside = [k for k, st in _walk_upper(ofs).items() if k.startswith("moved/") and _is_whiteout(st)]
    assert inside == []
    # and back over the whiteout: the directory swaps with it, the old path disappears
    ofs.rename(b"/moved", b"/data")
    assert [n for n, _ in ofs.readdir(b"/data")] == [b"h1", b"h2", b"p", b"sl", b"sub"]
    assert not os.path.lexists(upper_of(ofs, "moved"))
    # a lower dir of the demo image, across parents
    demo = overlays.make("demo:app", "demo")
    demo.rename(b"/usr/share", b"/tmp/share")
    assert [n for n, _ in demo.readdir(b"/tmp/share")] == [b"doc"]
    assert len(_read_all(demo, b"/tmp/share/doc/README")) == 64 << 10
    assert [n for n, _ in demo.readdir(b"/usr")] == [b"bin"] + sorted(
        n for n, _ in demo.readdir(b"/usr") if n not in (b"bin", b"share"))


@needs_root
def test_hostile_upper_never_writes_outside(overlays: Overlays, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("outside\n")
    ofs = overlays.make()
    upper = upper_of(ofs, "")
    os.symlink(outside, upper / "etc")  # the container replaced /etc by a symlink
    os.mkdir(upper / "usr")
    os.symlink(outside, upper / "usr" / "share")  # and a deeper one
    os.symlink(outside / "passwd", upper / "app-data")  # a symlink to a file
    steps = [
        ("create", b"/etc/new", 0o644), ("write", b"/etc/passwd", 0, b"pwned"),
        ("truncate", b"/etc/passwd", 0), ("chmod", b"/etc/passwd", 0o777),
        ("chown", b"/etc/passwd", 1, 1), ("setxattr", b"/etc/passwd", b"user.x", b"1", 0),
        ("unlink", b"/etc/passwd"), ("mkdir", b"/etc/d", 0o755), ("rmdir", b"/etc"),
        ("rename", b"/etc/passwd", b"/tmp/p"), ("rename", b"/tmp", b"/etc/tmp"),
        ("link", b"/etc/passwd", b"/tmp/l"), ("symlink", b"x", b"/etc/s"),
        ("mknod", b"/etc/f", stat.S_IFIFO | 0o644, 0), ("utime", b"/etc/passwd", (1, 1)),
        ("create", b"/usr/share/x", 0o644), ("unlink", b"/usr/share/doc/README"),
        ("write", b"/app-data", 0, b"pwned"), ("truncate", b"/app-data", 0),
        ("chmod", b"/app-data", 0o777), ("setxattr", b"/app-data", b"user.x", b"1", 0),
        ("chown", b"/app-data", 1, 1),
    ]
    before = tree_manifest(outside)
    results = {}
    for step in steps:
        results[step[:2]] = run_step(ours, ofs, *step)[0]
    assert tree_manifest(outside) == before, results
    # the symlinks are symlinks in the view, walking through them fails
    assert stat.S_ISLNK(ofs.getattr(b"/etc")["st_mode"])
    assert results[("create", b"/etc/new")] == errno.ENOTDIR
    assert results[("create", b"/usr/share/x")] == errno.ENOTDIR
    # removing the symlink itself is allowed and only removes the link
    ofs.unlink(b"/app-data")
    assert (outside / "passwd").read_text() == "outside\n"


# --- 2. the same script on kernel overlayfs --------------------------------------------

SCRIPT: list[tuple] = [
    ("append", b"/etc/passwd", b"user:x:1000:1000::/home/user:/bin/sh\n"),
    ("create", b"/etc/new", 0o640),
    ("create", b"/etc/new", 0o640),
    ("unlink", b"/etc/motd"),
    ("create", b"/etc/motd", 0o600),
    ("write", b"/etc/motd", 0, b"motd is back\n"),
    ("unlink", b"/etc/os-release"),
    ("unlink", b"/etc/os-release"),
    ("mkdir", b"/etc", 0o755),
    ("rmdir", b"/usr/share"),
    ("rmdir", b"/etc/passwd"),
    ("unlink", b"/usr"),
    ("read", b"/nonexistent"),
    ("read", b"/etc/passwd/x"),
    ("create", b"/nodir/x", 0o644),
    ("create", b"/etc/passwd/x", 0o644),
    ("write", b"/etc", 0, b"x"),
    ("unlink", b"/usr/share/doc/README"),
    ("rmdir", b"/usr/share/doc"),
    ("mkdir", b"/usr/share/doc", 0o700),
    ("create", b"/usr/share/doc/new", 0o644),
    ("write", b"/usr/share/doc/new", 0, b"fresh\n"),
    ("listdir", b"/usr/share/doc"),
    ("rmdir", b"/var/cache"),
    ("mkdir", b"/var/cache", 0o755),
    ("rename", b"/app", b"/app2"),
    ("read", b"/app/hello.sh"),
    ("write", b"/app2/hello.sh", 10, b"XX"),
    ("read", b"/app2/hello.sh"),
    ("open_trunc", b"/etc/group"),
    ("write", b"/etc/group", 0, b"g:x:5:\n"),
    ("rename", b"/etc/passwd", b"/usr"),
    ("rename", b"/etc", b"/etc/sub"),
    ("rename", b"/root", b"/etc/passwd"),
    ("rename", b"/tmp", b"/usr"),
    ("rename", b"/etc/new", b"/etc/group"),
    ("symlink", b"../etc/passwd", b"/tmp/link"),
    ("readlink", b"/tmp/link"),
    ("readlink", b"/usr/bin/sh"),
    ("readlink", b"/etc/passwd"),
    ("link", b"/app-data/blob.bin", b"/tmp/blob-link"),
    ("link", b"/app-data", b"/tmp/dirlink"),
    ("link", b"/etc/passwd", b"/tmp/link"),
    ("chmod", b"/etc/group", 0o600),
    ("chown", b"/app-data", 1000, 1000),
    ("chown", b"/app2/hello.sh", 1000, 1001),
    ("utime", b"/etc/group", (1_600_000_000_123_456_789, 1_600_000_000_987_654_321)),
    ("truncate", b"/app-data/blob.bin", 1000),
    ("stat", b"/tmp/blob-link"),
    ("setxattr", b"/etc/passwd", b"user.test", b"v1", 0),
    ("setxattr", b"/etc/passwd", b"user.test", b"v2", os.XATTR_CREATE),
    ("getxattr", b"/etc/passwd", b"user.test"),
    ("getxattr", b"/etc/passwd", b"user.none"),
    ("listxattr", b"/etc/passwd"),
    ("setxattr", b"/etc/passwd", b"user.keep", b"k", 0),
    ("removexattr", b"/etc/passwd", b"user.test"),
    ("setxattr", b"/app2", b"user.dir", b"d", 0),
    ("getxattr", b"/usr/share/doc", OPAQUE_XATTR),
    ("setxattr", b"/var", OPAQUE_XATTR, b"y", 0),
    ("listxattr", b"/usr/share/doc"),
    ("mknod", b"/tmp/fifo", stat.S_IFIFO | 0o644, 0),
    ("mknod", b"/tmp/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
    ("mkdir", b"/tmp/d1", 0o755),
    ("rename", b"/root", b"/tmp/d1"),
    ("rename", b"/etc", b"/etc2"),
    ("read", b"/etc2/passwd"),
    ("listdir", b"/etc2"),
    ("stat", b"/etc"),
    ("mkdir", b"/etc", 0o750),
    ("listdir", b"/etc"),
    ("rename", b"/tmp/d1", b"/usr/share/doc"),
    ("rename", b"/tmp/fifo", b"/var/cache/fifo"),
    ("rename", b"/usr/bin/sh", b"/var/sh"),
    ("rmdir", b"/"),
    ("unlink", b"/var/sh"),
    ("listdir", b"/usr/bin"),
    ("stat", b"/etc2/group"),
    ("rename", b"/app2/hello.sh", b"/app2/hello2.sh"),
    ("rename", b"/app2", b"/var/cache/app"),
    ("listdir", b"/var/cache/app"),
    ("rmdir", b"/var/cache/app"),
    # a setgid directory: what is made in it takes its group, directories stay setgid
    ("mkdir", b"/sg", 0o755),
    ("chown", b"/sg", 0, 1234),
    ("chmod", b"/sg", 0o2775),
    ("create", b"/sg/f", 0o644),
    ("mkdir", b"/sg/d", 0o755),
    ("stat", b"/sg/f"),
    ("stat", b"/sg/d"),
]




def _export_layers(cli, ref: str, out: Path) -> list[Path]:
    cli("export", ref, out)
    index = json.loads((out / "index.json").read_text())
    blobs = out / "blobs/sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    return [blobs / layer["digest"].split(":")[1] for layer in manifest["layers"]]


def ours_manifest(ofs: OverlayFS) -> dict[bytes, dict[str, Any]]:
    """Our merged tree in the form of ``tree_manifest(..., dir_mtimes=False)``."""
    out: dict[bytes, dict[str, Any]] = {}
    inodes: dict[int, list[bytes]] = {}

    def visit(vpath: bytes, rel: bytes) -> None:
        st = ofs.getattr(vpath)
        mode = st["st_mode"]
        d: dict[str, Any] = {
            "type": stat.filemode(mode)[0], "mode": oct(stat.S_IMODE(mode)),
            "uid": st["st_uid"], "gid": st["st_gid"], "mtime_ns": st["st_mtime"],
            "xattrs": {n: ofs.getxattr(vpath, n) for n in ofs.listxattr(vpath)},
        }
        if stat.S_ISDIR(mode):
            del d["mtime_ns"]
        elif stat.S_ISREG(mode):
            data = _read_all(ofs, vpath)
            assert len(data) == st["st_size"], vpath
            d["size"] = st["st_size"]
            d["sha256"] = "sha256:" + hashlib.sha256(data).hexdigest()
        elif stat.S_ISLNK(mode):
            d["target"] = ofs.readlink(vpath)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            d["rdev"] = (os.major(st["st_rdev"]), os.minor(st["st_rdev"]))
        if not stat.S_ISDIR(mode) and st["st_nlink"] > 1:
            inodes.setdefault(st["st_ino"], []).append(rel)
        out[rel] = d
        if stat.S_ISDIR(mode):
            for name, _ in ofs.readdir(vpath):
                visit((vpath if vpath != b"/" else b"") + b"/" + name, name if rel == b"." else rel + b"/" + name)

    visit(b"/", b".")
    for paths in inodes.values():
        for p in paths:
            out[p]["links"] = sorted(paths)
    return out


IGNORED_UPPER_XATTRS = {b"trusted.overlay.origin", b"trusted.overlay.impure",
                        b"trusted.overlay.redirect", b"trusted.overlay.uuid", ORIGIN_XATTR}


def upper_manifest(upper: Path, t0: int) -> tuple[dict[bytes, dict[str, Any]], set[bytes]]:
    """An upper directory for comparison (times set during the script become "new",
    kernel bookkeeping xattrs dropped) and the set of directories with a redirect."""
    m = tree_manifest(upper, dir_mtimes=False)
    redirects = set()
    for rel, d in m.items():
        if b"trusted.overlay.redirect" in d["xattrs"]:
            redirects.add(rel)
        d["xattrs"] = {k: v for k, v in d["xattrs"].items() if k not in IGNORED_UPPER_XATTRS}
        if d.get("mtime_ns", 0) >= t0:
            d["mtime_ns"] = "new"
    return m, redirects


def upper_differences(kernel_upper: Path, ours_upper: Path, t0: int,
                      drop_root: bool = False) -> tuple[list[str], set[bytes]]:
    """Kernel overlayfs' upper against ours after the same script: they must be equal
    except below directories the kernel renamed with a redirect, which it leaves merged
    with their old lower path where ours holds a full copy (opaque instead of
    redirected). Returns the differences and the directories the kernel redirected (with
    metacopy it redirects files it renamed or linked too: so do we, and those are not
    counted). ``drop_root``: the upper roots were made by different code."""
    k_up, redirects = upper_manifest(kernel_upper, t0)
    o_up, _ = upper_manifest(ours_upper, t0)
    for m in (k_up, o_up):
        if drop_root:
            m.pop(b".", None)
        for rel in list(m):
            if any(rel.startswith(r + b"/") for r in redirects):
                del m[rel]
            elif rel in redirects:
                m[rel]["xattrs"].pop(OPAQUE_XATTR, None)
    return diff_manifests(k_up, o_up), {r for r in redirects if k_up[r]["type"] == "d"}


def _norm_times(m: dict[bytes, dict[str, Any]], t0: int) -> dict[bytes, dict[str, Any]]:
    for d in m.values():
        if d.get("mtime_ns", 0) >= t0:
            d["mtime_ns"] = "new"
    return m


@pytest.mark.skipif(not IS_ROOT, reason="mounting overlayfs needs root")
@pytest.mark.parametrize("copy_up,metacopy", [(FULL, "off"), (META, "on")])
def test_same_as_kernel_overlayfs(overlays: Overlays, cli, tmp_path: Path, images: Path,
                                  copy_up: str, metacopy: str):
    """The script on ours and on kernel overlayfs: full copy-up against the kernel's
    default, metadata-only copy-up against ``metacopy=on``."""
    lowers, ku, kw, kmnt = kernel_dirs(cli, tmp_path)
    ofs = overlays.make("demo:app", "ours", copy_up)
    export_before = _export_layers(cli, "demo:app", tmp_path / "export-before")
    t0 = (int(os.stat(tmp_path).st_mtime_ns) // 10**9 - 2) * 10**9
    old_umask = os.umask(0)  # modes as given on both sides (FUSE passes the caller's)
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(reversed(lowers))},upperdir={ku},workdir={kw},"
                        + f"redirect_dir=on,index=off,metacopy={metacopy}", str(kmnt)], check=True)
        try:
            mismatches = script_mismatches(kmnt, ours, ofs)
            assert not mismatches, "steps differ:\n" + "\n".join(mismatches)
            kernel_tree = _norm_times(tree_manifest(kmnt, dir_mtimes=False), t0)
        finally:
            subprocess.run(["umount", str(kmnt)], check=True)
    finally:
        os.umask(old_umask)
    ours_tree = _norm_times(ours_manifest(ofs), t0)
    d = diff_manifests(kernel_tree, ours_tree)
    assert not d, "merged trees differ (first: kernel, second: ours):\n" + "\n".join(d[:40])

    d, redirected = upper_differences(ku, tmp_path / "ours-upper", t0)
    assert not d, "uppers differ (first: kernel, second: ours):\n" + "\n".join(d[:40])
    assert redirected == {b"etc2", b"tmp/d1", b"var/cache/app"}

    # 3. the store is untouched
    overlays.close()
    assert_clean(images)
    export_after = _export_layers(cli, "demo:app", tmp_path / "export-after")
    assert [p.name for p in export_before] == [p.name for p in export_after]
    for a, b in zip(export_before, export_after):
        assert a.read_bytes() == b.read_bytes()


def test_making_an_existing_name_copies_nothing_up(overlays: Overlays):
    """EEXIST for a name the lowers have, under a directory only the lowers have, leaves
    the upper as it was (kernel overlayfs copies nothing up for a failed create)."""
    ofs = overlays.make("meta:1")
    for make in (lambda: ofs.mkdir(b"/data/sub/deep", 0o755),
                 lambda: ofs.create(b"/data/sub/deep", 0o644),
                 lambda: ofs.symlink(b"x", b"/data/sub/deep"),
                 lambda: ofs.mkdir(b"/data/sub", 0o755)):
        with pytest.raises(OSError) as exc:
            make()
        assert exc.value.errno == errno.EEXIST
    assert os.listdir(upper_of(ofs, "")) == []


@pytest.mark.parametrize("copy_up", [FULL, META, LAZY])
def test_a_change_that_copies_up_returns_what_getattr_gives(overlays: Overlays, copy_up: str):
    """chmod, chown and utimens of a lower file or directory return the attributes
    afterwards, which the mount hands to the kernel instead of a second getattr
    (``binding.remember_attrs``); they must be what ``getattr`` gives, also for a file
    with hard links and for a change to an upper entry (None there: no shortcut)."""
    changes = [
        (b"/data/f.txt", lambda o, p: o.chmod(p, 0o640)),
        (b"/data/sub", lambda o, p: o.utimens(p, (10**18, 2 * 10**18))),
        (b"/data/sub/deep", lambda o, p: o.chown(p, 7, 8)),
        (b"/data/h1", lambda o, p: o.chmod(p, 0o600)),  # a lower hard link
    ]
    ofs = overlays.make("meta:1", copy_up=copy_up)
    for vpath, change in changes:
        st = change(ofs, vpath)
        assert st == ofs.getattr(vpath), vpath
        assert change(ofs, vpath) is None  # upper now: the caller asks getattr
    assert ofs.getattr(b"/data/h2")["st_nlink"] == 2


def test_xattrs_of_an_upper_file_from_one_lookup(ofs: OverlayFS):
    """getxattr/listxattr of an upper file answer from the names its lookup listed (no
    second walk): a name it has not got is ENODATA, one set since is found, and the
    overlay's own marks stay hidden."""
    fh = ofs.create(b"/new", 0o644)
    ofs.release(fh)
    ofs.chmod(b"/etc/passwd", 0o600)  # metacopy: the upper file has overlay marks
    for vpath in (b"/new", b"/etc/passwd"):
        for name in (b"security.capability", b"user.nothing"):
            with pytest.raises(OSError) as exc:
                ofs.getxattr(vpath, name)
            assert exc.value.errno == errno.ENODATA
        assert not any(n.startswith(b"trusted.overlay.") for n in ofs.listxattr(vpath))
        ofs.setxattr(vpath, b"user.a", b"1")
        ofs.setxattr(vpath, b"user.b", b"2")
        assert ofs.getxattr(vpath, b"user.b") == b"2"
        assert sorted(n for n in ofs.listxattr(vpath) if n.startswith(b"user.")) == [
            b"user.a", b"user.b"]
        with pytest.raises(OSError) as exc:
            ofs.getxattr(vpath, METACOPY_XATTR)
        assert exc.value.errno == errno.ENODATA


def test_changes_moves_with_every_change_and_only_then(ofs: OverlayFS):
    """``OverlayFS.changes`` (what the mount's listings check before they hand the
    kernel attributes made earlier) takes a new value after each call that may change
    the view, and keeps it across calls that only look."""
    seen = [ofs.changes]

    def changed() -> bool:
        seen.append(ofs.changes)
        return seen[-1] != seen[-2]

    ofs.getattr(b"/etc/passwd"), ofs.readdir(b"/etc"), ofs.listxattr(b"/etc/passwd")
    ofs.release(ofs.open(b"/etc/passwd", os.O_RDONLY))  # reading changes nothing
    assert not changed()
    ofs.release(ofs.open(b"/etc/passwd", os.O_WRONLY))  # a copy-up
    assert changed()
    fh = ofs.create(b"/n", 0o644)
    assert changed()
    ofs.write(fh, b"x", 0)
    assert changed()
    ofs.ftruncate(fh, 0)
    assert changed()
    ofs.fgetattr(fh), ofs.read(fh, 1, 0)
    assert not changed()
    ofs.release(fh)
    for call in (lambda: ofs.chmod(b"/n", 0o600), lambda: ofs.utimens(b"/n", None),
                 lambda: ofs.setxattr(b"/n", b"user.x", b"1"),
                 lambda: ofs.removexattr(b"/n", b"user.x"), lambda: ofs.truncate(b"/n", 3),
                 lambda: ofs.link(b"/n", b"/n2"), lambda: ofs.rename(b"/n2", b"/n3"),
                 lambda: ofs.unlink(b"/n3"), lambda: ofs.mkdir(b"/d", 0o755),
                 lambda: ofs.rmdir(b"/d"), lambda: ofs.symlink(b"t", b"/s")):
        call()
        assert changed()
    with pytest.raises(OSError):
        ofs.rmdir(b"/nothing")
    changed()  # a failed call may count: no more is promised
    ofs.readlink(b"/s")
    assert not changed()


def test_walks_follow_renamed_and_removed_directories(ofs: OverlayFS):
    """The overlay keeps the upper directories its walks met (``OverlayFS._dirs``): after
    a directory is renamed, replaced or removed, paths through it resolve anew, and the
    cache holds at most ``DIRS_KEPT`` open directories."""
    from layerstore.overlay.fs import DIRS_KEPT

    ofs.mkdir(b"/a", 0o755)
    ofs.mkdir(b"/a/b", 0o755)
    ofs.release(ofs.create(b"/a/b/f", 0o644))
    assert ofs.getattr(b"/a/b/f")["st_size"] == 0  # /a and /a/b are walked and kept
    ofs.rename(b"/a", b"/c")
    for gone in (b"/a/b/f", b"/a/b", b"/a"):
        with pytest.raises(OSError) as exc:
            ofs.getattr(gone)
        assert exc.value.errno == errno.ENOENT
    assert ofs.exists(b"/c/b/f")
    ofs.mkdir(b"/a", 0o700)  # a new directory at the old path
    assert [n for n, _ in ofs.readdir(b"/a")] == []
    with pytest.raises(OSError) as exc:
        ofs.release(ofs.create(b"/a/b/f", 0o644))
    assert exc.value.errno == errno.ENOENT
    # an empty directory renamed over another: the name now walks into the moved one
    ofs.mkdir(b"/d", 0o755)
    ofs.mkdir(b"/d/e", 0o755)
    assert ofs.getattr(b"/d/e")["st_nlink"] == 2
    ofs.rename(b"/c/b", b"/d/e")
    assert ofs.exists(b"/d/e/f") and not ofs.exists(b"/c/b")
    # removed and made again: the new directory, empty
    ofs.release(ofs.create(b"/d/e/g", 0o644))
    ofs.unlink(b"/d/e/f")
    ofs.unlink(b"/d/e/g")
    ofs.rmdir(b"/d/e")
    ofs.mkdir(b"/d/e", 0o750)
    assert [n for n, _ in ofs.readdir(b"/d/e")] == []
    assert stat.S_IMODE(ofs.getattr(b"/d/e")["st_mode"]) == 0o750
    # a lower directory renamed becomes opaque: what is below it shows as before
    ofs.getattr(b"/usr/share/doc/README")
    ofs.rename(b"/usr/share", b"/share")
    assert [n for n, _ in ofs.readdir(b"/share")] == [b"doc"]
    assert not ofs.exists(b"/usr/share/doc/README")
    # more directories than are kept: answers stay right, fds stay bounded
    before = len(os.listdir("/proc/self/fd"))
    for i in range(DIRS_KEPT + 40):
        ofs.mkdir(b"/many%d" % i, 0o755)
        ofs.mkdir(b"/many%d/in" % i, 0o755)
        ofs.release(ofs.create(b"/many%d/in/x" % i, 0o644))
    for i in range(DIRS_KEPT + 40):
        assert ofs.getattr(b"/many%d/in/x" % i)["st_size"] == 0
    assert len(os.listdir("/proc/self/fd")) <= before + DIRS_KEPT + 2


def test_renaming_a_tree_keeps_a_deleted_hard_link_deleted(overlays: Overlays, cli,
                                                           tmp_path: Path):
    """A lower hard link with names in two directories of a renamed tree, one name
    deleted first: the tree's copy-up links the other names it meets, and a directory
    it has already made opaque must not be walked as the merged one it was (the walk
    cache held it so until the rename ended: a review found the deleted name back)."""
    def ti(name: str, type_: bytes, link: str = "") -> tarfile.TarInfo:
        t = tarfile.TarInfo(name)
        t.type, t.mode, t.linkname, t.mtime = type_, 0o755, link, META_MTIME
        return t

    layer = tar_bytes([(ti("d", tarfile.DIRTYPE), None), (ti("d/a", tarfile.DIRTYPE), None),
                       (ti("d/b", tarfile.DIRTYPE), None), (ti("d/a/g", tarfile.REGTYPE), b"abc"),
                       (ti("d/b/f", tarfile.LNKTYPE, link="d/a/g"), None)])
    lay = OciLayout(tmp_path / "links-oci")
    mdesc, _, _ = lay.image([layer])
    lay.add(mdesc, ref="1", name="links:1")
    lay.write_index()
    cli("import", tmp_path / "links-oci")
    for copy_up in (FULL, META):
        ofs = overlays.make("links:1", f"links-{copy_up}", copy_up)
        ofs.unlink(b"/d/a/g")
        assert ofs.getattr(b"/d/b/f")["st_size"] == 3
        ofs.rename(b"/d", b"/e")
        assert not ofs.exists(b"/e/a/g")
        assert [n for n, _ in ofs.readdir(b"/e/a")] == []
        assert _read_all(ofs, b"/e/b/f") == b"abc"


def test_upper_and_work_on_different_filesystems_is_exdev(overlays: Overlays, tmp_path: Path):
    """As kernel overlayfs requires: EXDEV, not a crash, and no fd left open."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    work = Path(tempfile.mkdtemp(dir=shm))
    upper = tmp_path / "x-upper"
    upper.mkdir()
    before = len(os.listdir("/proc/self/fd"))
    try:
        with overlays.store.env.read() as txn:
            img = resolve(txn, overlays.store.env, "demo:app")
        with pytest.raises(OSError) as exc:
            OverlayFS(MergedLowers(StoreLayers(overlays.store, img.diff_ids)), upper, work)
        assert exc.value.errno == errno.EXDEV
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.rmdir(work)


def test_wire_warm_up_leaves_no_trace(ofs: OverlayFS):
    """wire.py runs a few LOOKUP/GETATTR/GETXATTR through its handlers before INIT is
    answered (the first requests of a fresh daemon were slower): every lookup is
    forgotten again and nothing in the view changes."""
    from layerstore.fuse import lowlevel, wire

    if lowlevel.pyfuse3 is not wire:
        pytest.skip("the adapter runs on another transport here")
    ops = lowlevel.LowLevelOperations(ofs)
    session = wire._Session.__new__(wire._Session)
    session.ops = ops
    session.lister = wire._Lister(ops)
    session.flags = 0
    before = ofs.changes
    names = ops.warm_names()
    assert names and all(b"/" not in n for n in names)
    session._warm_up()
    assert list(ops.table.nodes) == [lowlevel.ROOT] and not ops.table.child
    assert ofs.changes == before
    assert sorted(os.listdir(f"/proc/self/fd/{ofs.upper_fd}")) == []


class _Ctx:
    """A request's caller, for the low-level adapter's methods (root)."""
    uid, gid, pid, umask = 0, 0, os.getpid(), 0o022


def _ll_getxattr(ops: Any, ino: int, name: bytes) -> bytes | int:
    """getxattr through the low-level adapter: the value, or the errno it answered."""
    import trio

    from layerstore.fuse import lowlevel

    async def get() -> bytes | int:
        try:
            return await ops.getxattr(ino, name, _Ctx())  # type: ignore[no-any-return]
        except lowlevel.pyfuse3.FUSEError as exc:
            return int(exc.errno)

    return trio.run(get)


def test_a_new_files_attribute_names_come_with_its_create(ofs: OverlayFS, monkeypatch):
    """The kernel asks for security.capability before the first write to a new file.
    lowlevel.py answers it without a walk or a listing (a new file has none until a
    setxattr, which is a change); an ACL the upper gave the file (its directory's
    default ACL) is found, and a capability set after the create is read."""
    import struct

    import trio

    from layerstore.fuse import lowlevel

    ops = lowlevel.LowLevelOperations(ofs)
    ofs.mkdir(b"/tmp/acl", 0o755)
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (
        (0x01, 7, 0xFFFFFFFF), (0x02, 6, 1234), (0x04, 5, 0xFFFFFFFF),
        (0x10, 7, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)))
    ofs.setxattr(b"/tmp/acl", b"system.posix_acl_default", acl)

    async def create(name: bytes) -> int:
        tmp = await ops.lookup(lowlevel.ROOT, b"tmp")
        parent = await ops.lookup(tmp.st_ino, b"acl")
        fi, entry = await ops.create(parent.st_ino, name, 0o100644, os.O_WRONLY, _Ctx())
        await ops.release(fi.fh)
        return int(entry.st_ino)

    ino = trio.run(create, b"new")
    walks = []
    find = ofs._find
    monkeypatch.setattr(ofs, "_find", lambda vpath: walks.append(vpath) or find(vpath))
    assert _ll_getxattr(ops, ino, b"security.capability") == errno.ENODATA
    assert walks == []
    inherited = os.getxattr(f"/proc/self/fd/{ofs.upper_fd}/tmp/acl/new", "system.posix_acl_access")
    assert _ll_getxattr(ops, ino, b"system.posix_acl_access") == inherited
    # a capability set on a new file, the kernel's question right after is answered by it
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_bind_service
    ino2 = trio.run(create, b"new2")
    trio.run(ops.setxattr, ino2, b"security.capability", cap, _Ctx())
    assert _ll_getxattr(ops, ino2, b"security.capability") == cap


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_a_copy_up_by_open_walks_to_the_file_once(overlays, copy_up: str, monkeypatch):
    """An open for writing of a lower file copies it up and opens the copy without a
    second walk to it (the copy-up knows what a lookup would find); the handle still
    reports the lower inode number, and writes land in the upper file."""
    ofs = overlays.make("demo:app", copy_up=copy_up)
    lower_ino = ofs.getattr(b"/etc/group")["st_ino"]
    walks = []
    find = ofs._find
    monkeypatch.setattr(ofs, "_find", lambda vpath: walks.append(vpath) or find(vpath))
    fh = ofs.open(b"/etc/group", os.O_WRONLY)
    try:
        assert walks.count(b"/etc/group") == 1
        assert ofs.fgetattr(fh)["st_ino"] == lower_ino
        ofs.write(fh, b"X", 0)
    finally:
        ofs.release(fh)
    assert ofs.getattr(b"/etc/group")["st_ino"] == lower_ino
    fh = ofs.open(b"/etc/group", os.O_RDONLY)
    try:
        assert ofs.read(fh, 1, 0) == b"X"
    finally:
        ofs.release(fh)


def test_a_copy_ups_attribute_names_come_with_its_open(overlays, monkeypatch):
    """An open for writing copies a lower file up and reads the copy's attribute names:
    the kernel's security.capability before the first write is answered from them
    without a walk, and the attributes the lower file had are found."""
    import trio

    from layerstore.fuse import lowlevel

    ofs = overlays.make("meta:1", copy_up=FULL)
    ops = lowlevel.LowLevelOperations(ofs)

    async def open_for_writing() -> int:
        data = await ops.lookup(lowlevel.ROOT, b"data")
        f = await ops.lookup(data.st_ino, b"f.txt")
        fi = await ops.open(f.st_ino, os.O_WRONLY, _Ctx())
        await ops.release(fi.fh)
        return int(f.st_ino)

    ino = trio.run(open_for_writing)
    walks = []
    find = ofs._find
    monkeypatch.setattr(ofs, "_find", lambda vpath: walks.append(vpath) or find(vpath))
    assert _ll_getxattr(ops, ino, b"security.capability") == errno.ENODATA
    assert walks == []
    assert _ll_getxattr(ops, ino, b"user.color") == b"blue"


def test_lookups_and_listings_hand_over_attribute_names(overlays, monkeypatch):
    """`ls -l` asks for security.selinux of every entry it lists, and a chown asks for
    security.capability: the xattr names a lookup or a listing had at hand (a lower
    entry's record, an upper file's listed names) answer those misses without a walk,
    and a name the entry has is still read."""
    import trio

    from layerstore.fuse import lowlevel

    ofs = overlays.make("meta:1", copy_up=FULL)
    ops = lowlevel.LowLevelOperations(ofs)
    fh = ofs.create(b"/data/new", 0o644)  # an upper file among the lower ones
    ofs.release(fh)
    ofs.setxattr(b"/data/new", b"user.mine", b"1")

    async def lookup(name: bytes) -> int:
        data = await ops.lookup(lowlevel.ROOT, b"data")
        return int((await ops.lookup(data.st_ino, name)).st_ino)

    walks = []
    find = ofs._find
    monkeypatch.setattr(ofs, "_find", lambda vpath: walks.append(vpath) or find(vpath))
    for how in ("lookup", "listing"):
        ops._xattr_names.clear()
        if how == "lookup":
            inos = {n: trio.run(lookup, n) for n in (b"f.txt", b"new")}
        else:
            inos = {n: st["st_ino"] for n, st in ops._listdir(b"/data") if n in (b"f.txt", b"new")}
        walks.clear()
        for name in (b"f.txt", b"new"):
            assert _ll_getxattr(ops, inos[name], b"security.selinux") == errno.ENODATA, how
        assert walks == [], how
        assert _ll_getxattr(ops, inos[b"f.txt"], b"user.color") == b"blue", how
        assert _ll_getxattr(ops, inos[b"new"], b"user.mine") == b"1", how


class _RenameInFlight:
    """A RENAME through the low-level adapter, in a thread of its own, held after its
    overlay call (and ``then()``) and before it updates the table (the window in which
    a path made from the table names what the rename moved): requests made meanwhile
    see it running. It goes on once the request's call of overlay method
    ``release_after`` has returned or raised (so that call is made in the window,
    whatever the machine's speed), or at the end of the ``with``."""

    def __init__(self, ops: Any, parent: int, old: bytes, new: bytes, release_after: str,
                 then: Callable[[], Any] | None = None):
        import threading

        import trio

        self.ops, self.renamed, self.go = ops, threading.Event(), threading.Event()
        self.method, self.real_method = release_after, getattr(ops.fs, release_after)
        real = ops.fs.rename

        def rename(*args: Any, **kwargs: Any) -> Any:
            try:
                return real(*args, **kwargs)
            finally:
                if then is not None:  # something else that happens in the window
                    then()
                self.renamed.set()
                self.go.wait(10)

        async def run() -> None:
            await ops.rename(parent, old, parent, new, 0, _Ctx())

        def thread() -> None:
            ops.fs.rename = rename
            try:
                trio.run(run)
            finally:
                del ops.fs.rename

        self.thread = threading.Thread(target=thread)

    def __enter__(self) -> Self:
        method = self.real_method

        def released(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                self.go.set()

        self.thread.start()
        assert self.renamed.wait(10)
        assert self.ops._renaming == 1
        setattr(self.ops.fs, self.method, released)
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self.thread.join(10)
        delattr(self.ops.fs, self.method)


def _adapter(overlays: Overlays, copy_up: str) -> tuple[Any, OverlayFS, Any]:
    """A low-level adapter over meta:1, and a function that looks up a path's node."""
    import trio

    from layerstore.fuse import lowlevel

    ofs = overlays.make("meta:1", copy_up=copy_up)
    ops = lowlevel.LowLevelOperations(ofs)

    def node(*names: bytes) -> int:
        async def walk() -> int:
            ino = lowlevel.ROOT
            for name in names:
                ino = (await ops.lookup(ino, name)).st_ino
            return int(ino)
        return trio.run(walk)

    return ops, ofs, node


def _ll(ops: Any, method: str, *args: Any) -> Any:
    """An adapter method's result, or the errno it answered."""
    import trio

    from layerstore.fuse import lowlevel

    async def call() -> Any:
        try:
            return await getattr(ops, method)(*args)
        except lowlevel.pyfuse3.FUSEError as exc:
            return int(exc.errno)

    return trio.run(call)


def _setattr_args(mode: int | None = None, size: int | None = None,
                  mtime_ns: int | None = None) -> tuple[Any, Any]:
    from layerstore.fuse import wire

    attr = wire.EntryAttributes()
    valid = 0
    if mode is not None:
        attr.st_mode, valid = stat.S_IFREG | mode, valid | wire.FATTR_MODE
    if size is not None:
        attr.st_size, valid = size, valid | wire.FATTR_SIZE
    if mtime_ns is not None:
        attr.st_mtime_ns, valid = mtime_ns, valid | wire.FATTR_MTIME
    return attr, wire.SetattrFields(valid)


@pytest.mark.parametrize("copy_up", [FULL, META])
@pytest.mark.parametrize("request_", ["open O_TRUNC", "chmod", "truncate", "setxattr", "link"])
def test_a_request_on_a_file_renamed_over_never_touches_the_new_one(overlays, copy_up: str,
                                                                     request_: str):
    """A request on node X (``data/f.txt``) made while a RENAME puts another file over
    X's only name: its path, made from the table before the rename updates it, names
    the other file. The request gets ENOENT (X has no name now) and the other file keeps
    its data, mode and attributes (before, an O_TRUNC open truncated it)."""
    ops, ofs, node = _adapter(overlays, copy_up)
    data, x = node(b"data"), node(b"data", b"f.txt")
    fh = ofs.create(b"/data/other", 0o640)
    ofs.write(fh, b"keep me\n", 0)
    ofs.release(fh)
    ofs.setxattr(b"/data/other", b"user.k", b"v")
    other = ofs.getattr(b"/data/other")
    args = {
        "open O_TRUNC": ("open", x, os.O_WRONLY | os.O_TRUNC, _Ctx()),
        "chmod": ("setattr", x, *_setattr_args(mode=0o600), None, _Ctx()),
        "truncate": ("setattr", x, *_setattr_args(size=0), None, _Ctx()),
        "setxattr": ("setxattr", x, b"user.k", b"changed", _Ctx()),
        "link": ("link", x, data, b"newlink", _Ctx()),
    }[request_]
    method = {"open O_TRUNC": "open", "chmod": "chmod", "truncate": "truncate",
              "setxattr": "setxattr", "link": "link"}[request_]
    with _RenameInFlight(ops, data, b"other", b"f.txt", method):
        answer = _ll(ops, *args)
    assert answer == errno.ENOENT
    assert _read_all(ofs, b"/data/f.txt") == b"keep me\n"
    keys = ("st_ino", "st_mode", "st_size", "st_nlink", "st_mtime")
    assert {k: ofs.getattr(b"/data/f.txt")[k] for k in keys} == {k: other[k] for k in keys}
    assert ofs.getxattr(b"/data/f.txt", b"user.k") == b"v"
    assert not ofs.exists(b"/data/newlink")


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_a_request_follows_its_file_through_a_rename(overlays, copy_up: str):
    """The other cases of the same window. A node with another name (``h1`` and ``h2``,
    one file) whose ``h1`` a rename replaces is opened through ``h2``, and the attribute
    names kept for it are its own (a review found another file's were). A node whose
    own name is being renamed is changed at its new name, not answered ENOENT."""
    ops, ofs, node = _adapter(overlays, copy_up)
    data, linked = node(b"data"), node(b"data", b"h1")
    assert node(b"data", b"h2") == linked
    ofs.setxattr(b"/data/h2", b"user.n", b"1")
    fh = ofs.create(b"/data/other", 0o644)
    ofs.write(fh, b"other\n", 0)
    ofs.release(fh)
    with _RenameInFlight(ops, data, b"other", b"h1", "open"):
        fi = _ll(ops, "open", linked, os.O_WRONLY, _Ctx())
    assert not isinstance(fi, int), fi
    ofs.write(fi.fh, b"L", 0)
    _ll(ops, "release", fi.fh)
    assert _read_all(ofs, b"/data/h2") == b"Linked\n"
    assert _read_all(ofs, b"/data/h1") == b"other\n"
    assert _ll_getxattr(ops, linked, b"user.n") == b"1"

    moved = node(b"data", b"sub", b"deep")
    with _RenameInFlight(ops, node(b"data", b"sub"), b"deep", b"deeper", "chmod"):
        entry = _ll(ops, "setattr", moved, *_setattr_args(mode=0o640), None, _Ctx())
    assert not isinstance(entry, int), entry
    assert stat.S_IMODE(ofs.getattr(b"/data/sub/deeper")["st_mode"]) == 0o640
    assert ofs.getattr(b"/data/sub/deeper")["st_ino"] == moved


@pytest.mark.parametrize("copy_up", [FULL, META, LAZY])
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_a_call_for_one_object_never_changes_another(overlays, copy_up: str, where: str):
    """The FUSE adapter makes a node's path from its table, then calls the overlay with
    the session's lock released; a rename over that name in between makes the path name
    another file. Each call that takes the node's ``st_ino`` checks it under the overlay's
    lock before it changes anything: another object's ``st_ino`` gets ENOENT
    (``OtherFileError``) and leaves the upper, the data and the attributes as they were."""
    from layerstore.errors import OtherFileError

    ofs = overlays.make("meta:1", copy_up=copy_up)
    if where == "upper":
        ofs.chmod(b"/data/f.txt", 0o4755)  # copied up (metadata only in meta and lazy)
    path, link = b"/data/f.txt", b"/data/sl"
    other = ofs.getattr(b"/data/sub/deep")["st_ino"]
    st0 = ofs.getattr(path)
    upper_before = sorted(str(p.relative_to(upper_of(ofs, ""))) for p in upper_of(ofs, "").rglob("*"))
    calls = {
        "open O_TRUNC": lambda ino: ofs.open(path, os.O_WRONLY | os.O_TRUNC, ino=ino),
        "open for writing": lambda ino: ofs.open(path, os.O_RDWR, ino=ino),
        "open for reading": lambda ino: ofs.open(path, os.O_RDONLY, ino=ino),
        "truncate": lambda ino: ofs.truncate(path, 3, ino=ino),
        "chmod": lambda ino: ofs.chmod(path, 0o600, ino=ino),
        "chown": lambda ino: ofs.chown(path, 7, 7, ino=ino),
        "utimens": lambda ino: ofs.utimens(path, (1, 2), ino=ino),
        "setxattr": lambda ino: ofs.setxattr(path, b"user.new", b"v", ino=ino),
        "removexattr": lambda ino: ofs.removexattr(path, b"user.color", ino=ino),
        "getxattr": lambda ino: ofs.getxattr(path, b"user.color", ino=ino),
        "listxattr": lambda ino: ofs.listxattr(path, ino=ino),
        "getattr": lambda ino: ofs.getattr(path, ino=ino),
        "link": lambda ino: ofs.link(path, b"/data/newlink", ino=ino),
        "readlink": lambda ino: ofs.readlink(link, ino=ino),
    }
    for what, call in calls.items():
        with pytest.raises(OtherFileError) as info:
            call(other)
        assert info.value.errno == errno.ENOENT, what
    assert ofs.getattr(path) == st0
    assert _read_all(ofs, path) == b"metadata file\n"
    assert ofs.getxattr(path, b"user.color") == b"blue"
    assert not ofs.exists(b"/data/newlink")
    assert sorted(str(p.relative_to(upper_of(ofs, ""))) for p in upper_of(ofs, "").rglob("*")) \
        == upper_before
    # the object's own number: the call is made
    ino = st0["st_ino"]
    assert ofs.readlink(link, ino=ofs.getattr(link)["st_ino"]) == b"f.txt"
    assert ofs.getxattr(path, b"user.color", ino=ino) == b"blue"
    ofs.chmod(path, 0o600, ino=ino)
    fh = ofs.open(path, os.O_WRONLY | os.O_TRUNC, ino=ino)
    ofs.release(fh)
    st = ofs.getattr(path, ino=ino)
    assert (st["st_ino"], stat.S_IMODE(st["st_mode"]), st["st_size"]) == (ino, 0o600, 0)


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_a_call_in_one_directory_never_changes_another(overlays, copy_up: str):
    """The same for the calls that make, remove, rename or look up an entry: the path
    is made from the directory node's path, and each call checks, under the overlay's
    lock, that the directory is the one meant (``parent_ino``, ``readdir``'s ``ino``).
    Another directory's number gets ENOENT and nothing changes."""
    from layerstore.errors import OtherFileError

    ofs = overlays.make("meta:1", copy_up=copy_up)
    wrong = ofs.getattr(b"/data/sub")["st_ino"]  # /data is what the paths below are in
    ofs.mkdir(b"/data/empty", 0o755)
    before = sorted(str(p.relative_to(upper_of(ofs, ""))) for p in upper_of(ofs, "").rglob("*"))
    listing = ofs.readdir(b"/data")
    calls = {
        "create": lambda: ofs.create(b"/data/new", 0o644, parent_ino=wrong),
        "mkdir": lambda: ofs.mkdir(b"/data/new", 0o755, parent_ino=wrong),
        "mknod": lambda: ofs.mknod(b"/data/new", stat.S_IFIFO | 0o644, parent_ino=wrong),
        "symlink": lambda: ofs.symlink(b"x", b"/data/new", parent_ino=wrong),
        "link": lambda: ofs.link(b"/data/f.txt", b"/data/new", parent_ino=wrong),
        "unlink": lambda: ofs.unlink(b"/data/f.txt", parent_ino=wrong),
        "rmdir": lambda: ofs.rmdir(b"/data/empty", parent_ino=wrong),
        "rename from": lambda: ofs.rename(b"/data/f.txt", b"/data/new", old_parent_ino=wrong),
        "rename to": lambda: ofs.rename(b"/data/f.txt", b"/data/new", new_parent_ino=wrong),
        "lookup": lambda: ofs.lookup_names(b"/data/f.txt", parent_ino=wrong),
        "readdir": lambda: ofs.readdir(b"/data", ino=wrong),
    }
    for what, call in calls.items():
        with pytest.raises(OtherFileError):
            call()
        assert not ofs.exists(b"/data/new"), what
    assert ofs.readdir(b"/data") == listing
    assert sorted(str(p.relative_to(upper_of(ofs, ""))) for p in upper_of(ofs, "").rglob("*")) \
        == before
    # the directory's own number: the calls are made
    data = ofs.getattr(b"/data")["st_ino"]
    assert ofs.lookup_names(b"/data/f.txt", parent_ino=data)[0] == ofs.getattr(b"/data/f.txt")
    assert [n for n, _ in ofs.readdir(b"/data", ino=data)] == [n for n, _ in listing]
    st = ofs.mkdir(b"/data/new", 0o750, parent_ino=data)
    assert st == ofs.getattr(b"/data/new") and stat.S_ISDIR(st["st_mode"])
    ofs.rename(b"/data/new", b"/data/sub/new", old_parent_ino=data, new_parent_ino=wrong)
    ofs.rmdir(b"/data/sub/new", parent_ino=wrong)
    ofs.unlink(b"/data/f.txt", parent_ino=data)
    assert not ofs.exists(b"/data/f.txt")


def _renamed_meanwhile(ops: Any, method: str, parent: int, old: bytes, new: bytes,
                       then: Callable[[], Any] | None = None) -> None:
    """Make the next overlay call ``method`` (made by a request whose path is made
    already) wait for a whole RENAME through the adapter, table update and all, and
    then for ``then()``: what a request whose overlay call waits for the lock sees."""
    import threading

    import trio

    real = getattr(ops.fs, method)
    fired = []

    def delayed(*args: Any, **kwargs: Any) -> Any:
        if fired:  # once
            return real(*args, **kwargs)
        fired.append(True)
        t = threading.Thread(target=trio.run, args=(ops.rename, parent, old, parent, new, 0,
                                                     _Ctx()))
        t.start()
        t.join(10)
        if then is not None:
            then()
        return real(*args, **kwargs)

    setattr(ops.fs, method, delayed)


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_a_request_in_a_directory_follows_it_through_a_rename(overlays, copy_up: str):
    """A directory (``data/sub``) renamed while requests on entries in it run, after
    they made their paths and before their overlay calls: they act in the directory
    they were made for, at its new name, even when another directory was made at the
    old one meanwhile (before, a create landed in that one, and a lookup or an unlink
    found nothing there)."""
    ops, ofs, node = _adapter(overlays, copy_up)
    data, sub = node(b"data"), node(b"data", b"sub")

    _renamed_meanwhile(ops, "create_stat", data, b"sub", b"sub2",
                       then=lambda: ofs.mkdir(b"/data/sub", 0o755))
    created = _ll(ops, "create", sub, b"new", stat.S_IFREG | 0o644, os.O_WRONLY, _Ctx())
    assert not isinstance(created, int), created
    _ll(ops, "release", created[0].fh)
    assert ofs.exists(b"/data/sub2/new") and not ofs.exists(b"/data/sub/new")

    _renamed_meanwhile(ops, "lookup_names", data, b"sub2", b"sub3")
    entry = _ll(ops, "lookup", sub, b"deep", _Ctx())
    assert not isinstance(entry, int), entry
    assert entry.st_ino == ofs.getattr(b"/data/sub3/deep")["st_ino"]

    _renamed_meanwhile(ops, "unlink", data, b"sub3", b"sub4")
    assert _ll(ops, "unlink", sub, b"deep", _Ctx()) is None
    assert not ofs.exists(b"/data/sub4/deep")
    assert ofs.exists(b"/data/sub4/new")

    # and through a rename in flight (overlay call made, table not yet updated)
    with _RenameInFlight(ops, data, b"sub4", b"sub5", "mkdir"):
        entry = _ll(ops, "mkdir", sub, b"made", 0o755, _Ctx())
    assert not isinstance(entry, int), entry
    assert entry.st_ino == ofs.getattr(b"/data/sub5/made")["st_ino"]


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_a_request_under_a_directory_swapped_for_a_symlink_follows_it(overlays, copy_up: str):
    """``mv sub sub2 && ln -s sub2 sub`` (a "current" link swapped in) while requests on
    entries below ``sub`` run: their stale paths now go through a symlink, ENOTDIR, and
    they look again at the directory's new name like after an ENOENT (a review found
    they answered ENOTDIR)."""
    ops, ofs, node = _adapter(overlays, copy_up)
    data, sub = node(b"data"), node(b"data", b"sub")
    ofs.mkdir(b"/data/sub/dd", 0o755)
    dd, deep = node(b"data", b"sub", b"dd"), node(b"data", b"sub", b"deep")
    ofs.setxattr(b"/data/sub/deep", b"user.k", b"v")

    _renamed_meanwhile(ops, "getxattr", data, b"sub", b"sub2",
                       then=lambda: ofs.symlink(b"sub2", b"/data/sub"))
    assert _ll_getxattr(ops, deep, b"user.k") == b"v"
    _renamed_meanwhile(ops, "create_stat", data, b"sub2", b"sub3",
                       then=lambda: ofs.symlink(b"sub3", b"/data/sub2"))
    created = _ll(ops, "create", dd, b"new", stat.S_IFREG | 0o644, os.O_WRONLY, _Ctx())
    assert not isinstance(created, int), created
    _ll(ops, "release", created[0].fh)
    assert ofs.exists(b"/data/sub3/dd/new")
    assert sub == ofs.getattr(b"/data/sub3")["st_ino"]


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_a_getattr_keeps_its_link_when_the_directory_moves(overlays, copy_up: str):
    """A GETATTR of ``sub/deep`` whose directory is renamed, and another ``sub/deep``
    made, between its path and its overlay call: it answers the node's attributes
    (at ``sub2/deep``), and keeps the node's link (a review found it answered ENOENT
    and dropped the link, so the next GETATTR failed too)."""
    ops, ofs, node = _adapter(overlays, copy_up)
    data, deep = node(b"data"), node(b"data", b"sub", b"deep")

    def replace() -> None:
        ofs.mkdir(b"/data/sub", 0o755)
        ofs.release(ofs.create(b"/data/sub/deep", 0o600))

    _renamed_meanwhile(ops, "lookup_names", data, b"sub", b"sub2", then=replace)
    for _ in range(2):
        entry = _ll(ops, "getattr", deep, _Ctx())
        assert not isinstance(entry, int), entry
        assert entry.st_ino == deep == ofs.getattr(b"/data/sub2/deep")["st_ino"]


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_an_ftruncate_in_the_window_goes_through_its_handle(overlays, copy_up: str):
    """An ftruncate (SETATTR of size and mtime with the file's handle) of a file whose
    only name a rename replaces meanwhile: truncated through its handle, answered as
    for an unlinked open file, and the file renamed there untouched (a review found it
    truncated, then answered ENOENT)."""
    ops, ofs, node = _adapter(overlays, copy_up)
    data, x = node(b"data"), node(b"data", b"f.txt")
    fi = _ll(ops, "open", x, os.O_RDWR, _Ctx())
    fh = ofs.create(b"/data/other", 0o644)
    ofs.write(fh, b"keep me\n", 0)
    ofs.release(fh)
    with _RenameInFlight(ops, data, b"other", b"f.txt", "utimens"):
        entry = _ll(ops, "setattr", x, *_setattr_args(size=2, mtime_ns=10**18), fi.fh, _Ctx())
    assert not isinstance(entry, int), entry
    assert entry.st_size == 2 and ofs.fgetattr(fi.fh)["st_size"] == 2
    assert _read_all(ofs, b"/data/f.txt") == b"keep me\n"
    _ll(ops, "release", fi.fh)


def test_rename_noreplace_is_checked_with_the_rename(ofs: OverlayFS):
    """RENAME_NOREPLACE is checked by the rename itself, under the overlay's lock (the
    adapter asked ``exists`` first, in a call of its own); rename says whether it moved
    anything (not for two names of one file)."""
    with pytest.raises(OSError) as info:
        ofs.rename(b"/etc/os-release", b"/etc/group", noreplace=True)
    assert info.value.errno == errno.EEXIST
    assert ofs.exists(b"/etc/os-release")
    assert ofs.rename(b"/etc/os-release", b"/etc/os-release.new", noreplace=True) is True
    assert ofs.rename(b"/etc/os-release.new", b"/etc/os-release.new") is False
    ofs.link(b"/etc/os-release.new", b"/etc/again")
    assert ofs.rename(b"/etc/again", b"/etc/os-release.new") is False
    assert ofs.exists(b"/etc/again")


@pytest.mark.parametrize("copy_up", [FULL, META])
def test_a_renamed_directory_keeps_its_number_when_another_tool_made_its_upper(
        overlays, copy_up: str):
    """A merged directory whose upper half kernel overlayfs made (no origin of ours:
    here made by hand, as overlayfs leaves it) keeps its inode number, and its merged
    subdirectories theirs, when it is renamed (a review found the number changed to
    the upper inode's, so the mount's node for it was lost)."""
    ofs = overlays.make("meta:1", copy_up=copy_up)
    before = {p: ofs.getattr(p)["st_ino"] for p in (b"/data", b"/data/sub", b"/data/sub/deep")}
    upper = upper_of(ofs, "")
    (upper / "data").mkdir()
    (upper / "data" / "sub").mkdir()
    (upper / "data" / "sub" / "mine").write_bytes(b"upper only\n")
    ofs.close()
    ofs = overlays.make("meta:1", copy_up=copy_up)  # the upper as another tool left it
    assert {p: ofs.getattr(p)["st_ino"] for p in before} == before
    ofs.rename(b"/data", b"/moved")
    after = {p: ofs.getattr(b"/moved" + p[len(b"/data"):])["st_ino"] for p in before}
    assert after == before
    assert _read_all(ofs, b"/moved/sub/mine") == b"upper only\n"
