"""``layerstore-overlay``, the fuse-overlayfs-compatible entry point, through real mounts
(every mount is unmounted and every daemon gone at the end of each test):

- directory lowers in kernel format (demo:app's layers extracted, plus a layer with hard
  links, symlinks, xattrs, devices, a FIFO, whiteouts and an opaque directory): the
  operation script of tests/test_overlay_fs.py gives the same errno per step and the same
  tree as kernel overlayfs over the same lowers; then kernel overlayfs over the same
  lowers and *our* upper shows that tree again (the upper is in kernel format);
- ``mount -t fuse.layerstore-overlay SRC MNT -o ...`` (mount(8) -> mount.fuse3), and
  ``umount MNT`` ends the daemon;
- ``image:NAME:TAG`` and ``layer:sha256:...`` lowers from ``-o root=STORE``, alone and
  mixed with a directory, equal the same layers as directories;
- the lower formats only fuse-overlayfs knows (``.wh.`` names, ``user.overlay.opaque``,
  ``user.fuseoverlayfs.opaque``, ``.wh..wh..opq``), compared with fuse-overlayfs itself;
- bad input: one line on stderr, non-zero exit, nothing mounted;
- no symlink in a lower is followed by the daemon (``DirLayers`` directly).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sysconfig
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers_images import diff_manifests, tree_manifest
from test_mount_rw import pytestmark  # noqa: F401  (fuse; root and /dev/fuse)
from test_overlay_fs import _norm_times, kernel, kernel_dirs, script_mismatches

from layerstore.overlay.dirlower import DirLayers
from layerstore.overlay.lower import MergedLowers

TIMEOUT = 60
SCRIPT_PATH = Path(sysconfig.get_path("scripts")) / "layerstore-overlay"


# --- helpers ----------------------------------------------------------------------------


def daemons_of(mp: Path) -> list[int]:
    """Pids of layerstore-overlay processes serving ``mp`` (by their command line)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
                st = (d / "stat").read_bytes().rpartition(b")")[2].split()[0]
            except OSError:
                continue
            if st != b"Z" and any(a.endswith(b"layerstore-overlay") for a in argv) \
                    and os.fsencode(mp) in argv:
                out.append(int(d.name))
    return out


def wait_gone(mp: Path, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemons_of(mp):
            return True
        time.sleep(0.05)
    return False


def run(*argv: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT,
                       check=False)
    if check:
        assert p.returncode == 0, f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture
def mounts():
    """``mounts(mp)`` registers a mountpoint: unmounted (lazily if need be) at the end, and
    its daemons must be gone."""
    mps: list[Path] = []
    yield mps.append
    for mp in reversed(mps):
        if os.path.ismount(mp):
            subprocess.run(["umount", str(mp)], capture_output=True, check=False)
        if os.path.ismount(mp):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True, check=False)
        if not wait_gone(mp):
            for pid in daemons_of(mp):
                os.kill(pid, 9)
            pytest.fail(f"daemon of {mp} did not exit after umount")


@contextmanager
def ours(mounts, mp: Path, opts: str, *extra: str):
    """``layerstore-overlay -o OPTS MP``, unmounted at the end."""
    mounts(mp)
    run(SCRIPT_PATH, "-o", opts, *extra, mp)
    assert os.path.ismount(mp)
    try:
        yield mp
    finally:
        run("umount", mp)
        assert wait_gone(mp)


@contextmanager
def kernel_overlay(mounts, mp: Path, opts: str):
    mounts(mp)
    run("mount", "-t", "overlay", "overlay", "-o", opts, mp)
    try:
        yield mp
    finally:
        run("umount", mp)


def dirs(tmp_path: Path, *names: str) -> list[Path]:
    out = [tmp_path / n for n in names]
    for d in out:
        d.mkdir()
    return out


def whiteout(p: Path) -> None:
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def extra_layer(top: Path) -> None:
    """A lower (kernel format) with what the demo layers lack: hard links, symlinks,
    xattrs, devices, a FIFO, setuid, whiteouts of a file and a directory, an opaque
    directory, a directory replacing a file."""
    (top / "extra/sub").mkdir(parents=True)
    (top / "extra/a").write_bytes(b"linked\n")
    os.link(top / "extra/a", top / "extra/sub/b")
    os.setxattr(top / "extra/a", "user.color", b"blue")
    os.setxattr(top / "extra", "user.dir", b"d")
    os.setxattr(top / "extra/a", "trusted.overlay.overlay.mine", b"escaped")
    os.symlink("a", top / "extra/rel-link")
    os.symlink("/etc/shadow", top / "extra/abs-link")
    os.symlink("../../..", top / "extra/up-link")
    os.mknod(top / "extra/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(top / "extra/fifo", 0o640)
    (top / "extra/plain").write_bytes(b"plain\n")
    (top / "extra/tree").mkdir()
    (top / "extra/tree/x").write_bytes(b"x\n")
    (top / "extra/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(top / "extra/suid", 0o4755)
    os.chown(top / "extra/sub/b", 1000, 1001)
    (top / "etc").mkdir()
    whiteout(top / "etc/group")  # a lower file (the script writes to it: ENOENT both)
    (top / "usr").mkdir()
    whiteout(top / "usr/bin")  # a lower directory
    (top / "var/cache").mkdir(parents=True)
    os.setxattr(top / "var/cache", "trusted.overlay.opaque", b"y")
    (top / "var/cache/fresh").write_bytes(b"opaque dir content\n")
    (top / "etc/os-release").mkdir()  # a directory where the lower has a file
    for p in (top, top / "extra", top / "extra/sub", top / "etc", top / "usr", top / "var",
              top / "var/cache"):
        os.utime(p, ns=(1_600_000_000 * 10**9,) * 2)


# --- the same as kernel overlayfs -------------------------------------------------------


def test_same_as_kernel_overlayfs(demo, cli, tmp_path: Path, mounts):
    lowers, ku, kw, kmnt = kernel_dirs(cli, tmp_path)
    top, ou, ow, omnt, kw2, kmnt2 = dirs(tmp_path, "top", "o-upper", "o-work", "o-mnt",
                                         "k-work2", "k-mnt2")
    extra_layer(top)
    stack = ":".join([str(top), *reversed(lowers)])
    t0 = (int(os.stat(tmp_path).st_mtime_ns) // 10**9 - 2) * 10**9
    old_umask = os.umask(0)  # modes as given on both sides
    try:
        with kernel_overlay(mounts, kmnt, f"lowerdir={stack},upperdir={ku},workdir={kw},"
                            "redirect_dir=on,index=off,metacopy=off"), \
                ours(mounts, omnt, f"lowerdir={stack},upperdir={ou},workdir={ow}"):
            before = diff_manifests(tree_manifest(kmnt, dir_mtimes=False),
                                    tree_manifest(omnt, dir_mtimes=False))
            assert not before, "lowers differ (kernel, ours):\n" + "\n".join(before[:40])
            assert (omnt / "extra/a").stat().st_ino == (omnt / "extra/sub/b").stat().st_ino
            assert (omnt / "extra/a").stat().st_nlink == 2
            mismatches = script_mismatches(kmnt, kernel, omnt)
            assert not mismatches, "steps differ:\n" + "\n".join(mismatches)
            # and a few steps on the extra layer
            for m in (kmnt, omnt):
                with open(m / "extra/plain", "ab") as f:
                    f.write(b"more\n")
                os.unlink(m / "extra/rel-link")
                os.unlink(m / "extra/sub/b")  # one name of a hard link
                os.rename(m / "extra/tree", m / "extra/tree2")
                os.setxattr(m / "extra/plain", "user.color", b"red")
                (m / "var/cache/fresh").unlink()
            kernel_tree = _norm_times(tree_manifest(kmnt, dir_mtimes=False), t0)
            ours_tree = _norm_times(tree_manifest(omnt, dir_mtimes=False), t0)
    finally:
        os.umask(old_umask)
    d = diff_manifests(kernel_tree, ours_tree)
    assert not d, "merged trees differ (kernel, ours):\n" + "\n".join(d[:40])
    assert (ou / "extra/plain").read_bytes() == b"plain\nmore\n"
    assert os.getxattr(ou / "extra/plain", "user.color") == b"red"
    for w in ("extra/rel-link", "extra/sub/b", "extra/tree", "var/cache/fresh"):
        st = os.lstat(ou / w)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, w

    # kernel overlayfs over the same lowers and our upper: the same tree again
    with kernel_overlay(mounts, kmnt2, f"lowerdir={stack},upperdir={ou},workdir={kw2},"
                        "redirect_dir=on,index=off,metacopy=off"):
        again = _norm_times(tree_manifest(kmnt2, dir_mtimes=False), t0)
    d = diff_manifests(ours_tree, again)
    assert not d, "kernel over our upper differs (ours, kernel):\n" + "\n".join(d[:40])


# --- mount -t fuse.layerstore-overlay ----------------------------------------------------


def test_mount_helper(tmp_path: Path, mounts):
    lo1, lo2, up, wk, mp = dirs(tmp_path, "lo1", "lo2", "up", "wk", "mnt")
    (lo2 / "old").write_bytes(b"old\n")
    (lo2 / "gone").write_bytes(b"gone\n")
    whiteout(lo1 / "gone")
    (lo1 / "new").write_bytes(b"new\n")
    helper = shutil.which("layerstore-overlay", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                          "/usr/bin:/sbin:/bin")
    assert helper, "layerstore-overlay is not on mount's PATH: run scripts/setup"
    mounts(mp)
    p = run("mount", "-t", "fuse.layerstore-overlay", "my-source", mp, "-o",
            f"rw,nodev,nosuid,lowerdir={lo1}:{lo2},upperdir={up},workdir={wk},squash_to_root")
    assert "squash_to_root" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    line = next(ln for ln in Path("/proc/self/mounts").read_text().splitlines()
                if ln.split()[1] == str(mp))
    source, _, fstype, flags = line.split()[:4]
    assert (source, fstype) == ("my-source", "fuse.layerstore-overlay")
    assert {"nodev", "nosuid"} <= set(flags.split(","))
    assert sorted(os.listdir(mp)) == ["new", "old"]
    (mp / "old").write_bytes(b"changed\n")
    (mp / "new").unlink()
    assert (up / "old").read_bytes() == b"changed\n"
    assert stat.S_ISCHR(os.lstat(up / "new").st_mode) and os.lstat(up / "new").st_rdev == 0
    assert (lo2 / "old").read_bytes() == b"old\n"
    pids = daemons_of(mp)
    assert len(pids) == 1, pids
    run("umount", mp)
    assert not os.path.ismount(mp)
    assert wait_gone(mp), f"daemon {pids} still running after umount"


# --- store lowers ------------------------------------------------------------------------


def test_image_and_layer_lowers(demo, cli, root: Path, tmp_path: Path, mounts):
    lowers, _, _, _ = kernel_dirs(cli, tmp_path)  # bottom first
    diff_ids = [la["DiffID"] for la in json.loads(cli("inspect", "demo:app").stdout)[0]["Layers"]]
    top, m1, m2, up, wk = dirs(tmp_path, "top", "m1", "m2", "up", "wk")
    (top / "etc").mkdir()
    (top / "etc/extra").write_bytes(b"from a directory\n")
    whiteout(top / "etc/passwd")
    app_layer = "layer:" + diff_ids[1]
    cases = [
        (f"image:demo:app,root={root}", ":".join(reversed(lowers))),
        (f"{top}:image:demo:app,root={root}", ":".join([str(top), *reversed(lowers)])),
        (f"{app_layer}:{lowers[0]},root={root}", ":".join(reversed(lowers))),
        (f"{app_layer},root={root}", lowers[1]),
    ]
    for store_stack, dir_stack in cases:
        with ours(mounts, m1, f"lowerdir={store_stack}"), \
                ours(mounts, m2, f"lowerdir={dir_stack}"):
            d = diff_manifests(tree_manifest(m2, dir_mtimes=False),
                               tree_manifest(m1, dir_mtimes=False))
            assert not d, f"{store_stack}: differs from {dir_stack}:\n" + "\n".join(d[:20])
            assert errno_of(lambda: (m1 / "new").write_bytes(b"x")) == errno.EROFS
    # writable, with LAYERSTORE_ROOT instead of -o root=
    mounts(m1)
    opts = f"lowerdir=image:demo:app,upperdir={up},workdir={wk}"
    p = subprocess.run([str(SCRIPT_PATH), "-o", opts, str(m1)], capture_output=True, text=True,
                       timeout=TIMEOUT, env=dict(os.environ, LAYERSTORE_ROOT=str(root)),
                       check=False)
    assert p.returncode == 0, p.stderr
    try:
        (m1 / "etc/motd").write_bytes(b"hi\n")
        assert (up / "etc/motd").read_bytes() == b"hi\n"
    finally:
        run("umount", m1)
    assert wait_gone(m1)


def errno_of(fn) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


# --- the lower formats of fuse-overlayfs --------------------------------------------------


def test_fuse_overlayfs_lower_formats(tmp_path: Path, mounts):
    fo = shutil.which("fuse-overlayfs")
    assert fo, "fuse-overlayfs is missing: run scripts/setup"
    l1, l2, m1, m2, u1, w1, u2, w2 = dirs(tmp_path, "l1", "l2", "m1", "m2", "u1", "w1", "u2",
                                          "w2")
    for i, marker in enumerate(["trusted.overlay.opaque", "user.overlay.opaque",
                                "user.fuseoverlayfs.opaque", ".wh..wh..opq", None]):
        (l2 / f"d{i}").mkdir()
        (l2 / f"d{i}/old").write_bytes(b"old\n")
        (l1 / f"d{i}").mkdir()
        (l1 / f"d{i}/new").write_bytes(b"new\n")
        if marker == ".wh..wh..opq":
            (l1 / f"d{i}" / marker).write_bytes(b"")
        elif marker:
            os.setxattr(l1 / f"d{i}", marker, b"y")
    for name in ("x", "y", "z", "kept"):
        (l2 / name).write_bytes(name.encode())
    whiteout(l1 / "x")
    (l1 / ".wh.y").write_bytes(b"")
    (l1 / ".wh.z").write_bytes(b"")
    (l1 / "z").write_bytes(b"z of l1\n")  # hidden by the .wh. beside it, as fuse-overlayfs does
    (l1 / ".wh.nothing").write_bytes(b"")
    for d in (l1, l2):
        os.utime(d, ns=(10**18, 10**18))
    mounts(m2)
    run(fo, "-o", f"lowerdir={l1}:{l2},upperdir={u2},workdir={w2}", m2)
    try:
        with ours(mounts, m1, f"lowerdir={l1}:{l2},upperdir={u1},workdir={w1}"):
            theirs = tree_manifest(m2, dir_mtimes=False)
            mine = tree_manifest(m1, dir_mtimes=False)
    finally:
        run("umount", m2)
    d = diff_manifests(theirs, mine)
    assert not d, "fuse-overlayfs and ours differ:\n" + "\n".join(d[:40])
    assert not [p for p in mine if p.startswith(b".wh.") or b"/.wh." in p]
    assert b"y" not in mine and b"z" not in mine and b"kept" in mine
    assert b"d4/old" in mine and b"d0/old" not in mine


# --- bad input ----------------------------------------------------------------------------


def test_bad_input(tmp_path: Path, root: Path, mounts):
    lo, up, wk, mp = dirs(tmp_path, "lo", "up", "wk", "mnt")
    shm = Path("/dev/shm") / f"layerstore-test-{os.getpid()}"
    shm.mkdir()
    mounts(mp)
    cases = {
        "missing lowerdir": (f"upperdir={up},workdir={wk}", mp),
        "lowerdir does not exist": (f"lowerdir={tmp_path}/nope:{lo}", mp),
        "upperdir does not exist": (f"lowerdir={lo},upperdir={tmp_path}/nope,workdir={wk}", mp),
        "workdir does not exist": (f"lowerdir={lo},upperdir={up},workdir={tmp_path}/nope", mp),
        "upperdir without workdir": (f"lowerdir={lo},upperdir={up}", mp),
        "different filesystems": (f"lowerdir={lo},upperdir={up},workdir={shm}", mp),
        "mountpoint missing": (f"lowerdir={lo},upperdir={up},workdir={wk}", tmp_path / "nope"),
        "no store": (f"lowerdir=image:demo:app,root={root}", mp),
        "bad layer": (f"lowerdir=layer:sha256:xyz,root={root}", mp),
        "image without tag": (f"lowerdir=image:demo,root={root}", mp),
    }
    try:
        for what, (opts, target) in cases.items():
            p = run(SCRIPT_PATH, "-o", opts, target, check=False)
            assert p.returncode != 0, what
            assert len(p.stderr.strip().splitlines()) == 1, (what, p.stderr)
            assert p.stderr.startswith("layerstore-overlay: "), (what, p.stderr)
            assert "Traceback" not in p.stderr
            assert not os.path.ismount(mp) and not daemons_of(mp), what
    finally:
        shm.rmdir()
    p = run(SCRIPT_PATH, check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1


# --- confinement -------------------------------------------------------------------------


def test_no_symlink_followed_out_of_a_lower(tmp_path: Path):
    lo, outside = dirs(tmp_path, "lo", "outside")
    (outside / "secret").write_bytes(b"secret\n")
    os.symlink(outside, lo / "dir-link")
    os.symlink(outside / "secret", lo / "file-link")
    (lo / "d").mkdir()
    os.symlink("../../outside", lo / "d/up")
    layers = DirLayers([lo])
    try:
        view = MergedLowers(layers)
        assert view.resolve(b"/dir-link/secret") is None
        assert view.resolve(b"/d/up/secret") is None
        assert [n for n, _ in view.listdir(b"/")] == [b"d", b"dir-link", b"file-link"]
        with pytest.raises(OSError) as exc:
            view.listdir(b"/dir-link")
        assert exc.value.errno == errno.ENOTDIR
        node = view.lookup(b"/file-link")
        assert node.entry.target == os.fsencode(outside / "secret")
        assert layers.list(0, b"/dir-link") == []
        # a file swapped for a symlink after lookup is not read through it
        (lo / "f").write_bytes(b"mine\n")
        f = view.lookup(b"/f")
        (lo / "f").unlink()
        os.symlink(outside / "secret", lo / "f")
        with pytest.raises(OSError) as exc:
            view.read(f, 0, 100)
        assert exc.value.errno == errno.EIO
    finally:
        layers.close()


def test_big_lower_files_are_passed_through(tmp_path: Path, mounts):
    """A file of 1 MiB or more in a lower directory is handed to the kernel itself
    (FUSE passthrough): it is read while the daemon is stopped. An open that would copy
    it up while such a reader is open is refused (ETXTBSY), the lower untouched; after
    the reader, the write goes to the upper."""
    lo, up, wk, mp = dirs(tmp_path, "lo", "up", "wk", "mnt")
    data = os.urandom(3 << 20)
    (lo / "big").write_bytes(data)
    with ours(mounts, mp, f"lowerdir={lo},upperdir={up},workdir={wk}"):
        (pid,) = daemons_of(mp)
        with open(mp / "big", "rb") as f:
            got: list[bytes] = []
            t = threading.Thread(target=lambda: got.append(os.pread(f.fileno(), len(data), 0)),
                                 daemon=True)
            os.kill(pid, signal.SIGSTOP)
            try:
                t.start()
                t.join(2)
            finally:
                os.kill(pid, signal.SIGCONT)
            t.join(30)
            assert got == [data], "the read waited for the daemon"
            with pytest.raises(OSError) as exc:
                os.open(mp / "big", os.O_WRONLY)
            assert exc.value.errno == errno.ETXTBSY
        deadline = time.monotonic() + 10
        while True:  # (the kernel sends the reader's RELEASE after close returns)
            try:
                fd = os.open(mp / "big", os.O_WRONLY)
                break
            except OSError as exc:
                if exc.errno != errno.ETXTBSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            os.pwrite(fd, b"NEW", 0)
        finally:
            os.close(fd)
        assert (mp / "big").read_bytes() == b"NEW" + data[3:]
    assert (lo / "big").read_bytes() == data
    assert (up / "big").read_bytes() == b"NEW" + data[3:]
