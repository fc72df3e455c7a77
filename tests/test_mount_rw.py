"""Writable FUSE mounts through the CLI (``layerstore mount CONTAINER MNT``), always
unmounted: every operation through the mount, the upper on disk in kernel-overlayfs
format, persistence, independence of two containers, the store untouched, the operation
script of tests/test_overlay_fs.py on our mount and on kernel overlayfs (same errno per
step, same tree, equivalent uppers), and kill -9 of the daemon during a copy-up."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import random
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean
from helpers_images import diff_manifests, dir_, reg, tar_bytes, tree_manifest
from test_overlay_fs import (
    _export_layers,
    _norm_times,
    kernel,
    kernel_dirs,
    script_mismatches,
    upper_differences,
)

from layerstore.overlay.upper import OPAQUE_XATTR

IS_ROOT = os.geteuid() == 0
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not IS_ROOT or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
]
MOUNT_TIMEOUT = 60


# --- fixtures and helpers --------------------------------------------------------------


def mount(cli, ref: str, mp: Path) -> None:
    cli("mount", ref, mp, timeout=MOUNT_TIMEOUT)
    assert os.path.ismount(mp)


def container(cli, name: str) -> dict:
    return next(c for c in json.loads(cli("ps", "--json").stdout) if c["name"] == name)


def upper_of(cli, name: str) -> Path:
    return Path(container(cli, name)["upper"])


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


# --- every operation --------------------------------------------------------------------


def test_operations_through_the_mount(demo, cli, root: Path, mnt: Path):
    cli("create", "demo:app", "--name", "c1")
    up = upper_of(cli, "c1")
    old_umask = os.umask(0o022)
    mount(cli, "c1", mnt)
    try:
        # write / read / append / O_TRUNC / O_EXCL
        (mnt / "etc/new").write_bytes(b"hello\n")
        assert (mnt / "etc/new").read_bytes() == b"hello\n"
        assert (up / "etc/new").read_bytes() == b"hello\n"
        before = (mnt / "etc/passwd").read_bytes()
        with open(mnt / "etc/passwd", "ab") as f:
            f.write(b"user:x:1000:1000::/home/user:/bin/sh\n")
        assert (mnt / "etc/passwd").read_bytes() == before + b"user:x:1000:1000::/home/user:/bin/sh\n"
        fd = os.open(mnt / "etc/group", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"g:x:5:\n")
        os.close(fd)
        assert (mnt / "etc/group").read_bytes() == b"g:x:5:\n"
        assert errno_of(os.open, mnt / "etc/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
        assert errno_of(os.open, mnt / "etc/passwd", os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
        fd = os.open(mnt / "etc/excl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.close(fd)
        assert stat.S_IMODE(os.stat(mnt / "etc/excl").st_mode) == 0o640
        # errors
        assert errno_of(os.stat, mnt / "nope") == errno.ENOENT
        assert errno_of(os.open, mnt / "etc", os.O_WRONLY) == errno.EISDIR
        assert errno_of(os.stat, mnt / "etc/passwd/x") == errno.ENOTDIR

        # mkdir / rmdir; ENOTEMPTY judged on the merged view
        os.mkdir(mnt / "newdir", 0o750)
        assert stat.S_IMODE(os.stat(mnt / "newdir").st_mode) == 0o750
        os.rmdir(mnt / "newdir")
        assert not (up / "newdir").exists()
        assert errno_of(os.rmdir, mnt / "etc") == errno.ENOTEMPTY
        assert errno_of(os.rmdir, mnt / "usr/share") == errno.ENOTEMPTY
        os.unlink(mnt / "usr/share/doc/README")
        os.rmdir(mnt / "usr/share/doc")
        assert is_whiteout(up / "usr/share/doc")
        assert "doc" not in os.listdir(mnt / "usr/share")

        # unlink of a lower file: a 0/0 character device whiteout in the upper
        os.unlink(mnt / "etc/os-release")
        assert not (mnt / "etc/os-release").exists()
        assert is_whiteout(up / "etc/os-release")
        assert "os-release" not in os.listdir(mnt / "etc")
        assert errno_of(os.unlink, mnt / "etc/os-release") == errno.ENOENT

        # rename of a lower directory (no EXDEV)
        app_files = sorted(os.listdir(mnt / "app"))
        hello = (mnt / "app/hello.sh").read_bytes()
        os.rename(mnt / "app", mnt / "app2")
        assert not (mnt / "app").exists()
        assert sorted(os.listdir(mnt / "app2")) == app_files
        assert (mnt / "app2/hello.sh").read_bytes() == hello
        assert is_whiteout(up / "app")

        # symlink / readlink
        os.symlink("../etc/passwd", mnt / "tmp/link")
        assert os.readlink(mnt / "tmp/link") == "../etc/passwd"
        assert (mnt / "tmp/link").read_bytes() == (mnt / "etc/passwd").read_bytes()
        assert errno_of(os.readlink, mnt / "etc/passwd") == errno.EINVAL

        # hard link of a lower file: one inode, nlink 2, writes visible through both
        os.link(mnt / "app-data/blob.bin", mnt / "tmp/blob-link")
        a, b = os.stat(mnt / "app-data/blob.bin"), os.stat(mnt / "tmp/blob-link")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        with open(mnt / "tmp/blob-link", "r+b") as f:
            f.write(b"LINKED")
        assert (mnt / "app-data/blob.bin").read_bytes()[:6] == b"LINKED"
        assert errno_of(os.link, mnt / "app2", mnt / "tmp/dirlink") == errno.EPERM
        # attributes changed through one name show through the other at once (the
        # mount caches attributes; each name is its own kernel inode to libfuse)
        os.chmod(mnt / "tmp/blob-link", 0o640)
        os.truncate(mnt / "tmp/blob-link", 100)
        os.utime(mnt / "tmp/blob-link", ns=(5, 7_000_000_123))
        st = os.stat(mnt / "app-data/blob.bin")
        assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns) == (0o640, 100, 7_000_000_123)
        with open(mnt / "app-data/blob.bin", "ab") as f:
            f.write(b"+tail")
        assert os.stat(mnt / "tmp/blob-link").st_size == 105
        os.link(mnt / "tmp/blob-link", mnt / "tmp/third")
        assert os.stat(mnt / "app-data/blob.bin").st_nlink == 3
        os.unlink(mnt / "tmp/third")
        assert os.stat(mnt / "app-data/blob.bin").st_nlink == os.stat(mnt / "tmp/blob-link").st_nlink == 2
        os.close(os.open(mnt / "tmp/blob-link", os.O_WRONLY | os.O_TRUNC))  # truncated in open
        assert os.stat(mnt / "app-data/blob.bin").st_size == 0
        (mnt / "tmp/blob-link").write_bytes(b"x" * 105)

        # chmod / chown / utimensat with ns (both times, and mtime alone)
        os.chmod(mnt / "etc/passwd", 0o600)
        assert stat.S_IMODE(os.stat(mnt / "etc/passwd").st_mode) == 0o600
        os.chown(mnt / "etc/passwd", 1000, 1001)
        st = os.stat(mnt / "etc/passwd")
        assert (st.st_uid, st.st_gid) == (1000, 1001)
        os.chown(mnt / "etc/passwd", -1, 5)
        assert (os.stat(mnt / "etc/passwd").st_uid, os.stat(mnt / "etc/passwd").st_gid) == (1000, 5)
        os.utime(mnt / "etc/group", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
        st = os.stat(mnt / "etc/group")
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_600_000_000_123_456_789, 1_600_000_000_987_654_321)
        assert os.stat(up / "etc/group").st_mtime_ns == 1_600_000_000_987_654_321
        subprocess.run(["touch", "-m", "-d", "@1500000000.5", str(mnt / "etc/group")], check=True)
        st = os.stat(mnt / "etc/group")
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_600_000_000_123_456_789, 1_500_000_000_500_000_000)
        t = time.time_ns()
        os.utime(mnt / "etc/group")
        assert os.stat(mnt / "etc/group").st_mtime_ns >= t - 10**9
        os.utime(mnt / "usr/bin/sh", ns=(10**18, 10**18), follow_symlinks=False)
        assert os.lstat(mnt / "usr/bin/sh").st_mtime_ns == 10**18

        # truncate (path) and ftruncate (fh)
        os.truncate(mnt / "app-data/blob.bin", 1000)
        assert os.stat(mnt / "app-data/blob.bin").st_size == 1000
        assert os.stat(mnt / "tmp/blob-link").st_size == 1000
        with open(mnt / "etc/new", "r+b") as f:
            os.ftruncate(f.fileno(), 2)
            assert os.fstat(f.fileno()).st_size == 2
        assert (mnt / "etc/new").read_bytes() == b"he"
        assert errno_of(os.truncate, mnt / "etc", 0) == errno.EISDIR

        # xattrs (overlay's own are hidden and cannot be forged)
        p = mnt / "etc/passwd"
        os.setxattr(p, "user.test", b"v1")
        assert os.getxattr(p, "user.test") == b"v1"
        assert errno_of(os.setxattr, p, "user.test", b"v2", os.XATTR_CREATE) == errno.EEXIST
        os.setxattr(p, "user.keep", b"k")
        assert sorted(os.listxattr(p)) == ["user.keep", "user.test"]
        os.removexattr(p, "user.test")
        assert os.listxattr(p) == ["user.keep"]
        assert errno_of(os.getxattr, p, "user.none") == errno.ENODATA
        assert errno_of(os.getxattr, mnt / "var/cache", OPAQUE_XATTR) == errno.ENODATA
        os.setxattr(mnt / "var", OPAQUE_XATTR, b"y")
        assert os.listdir(mnt / "var") != []  # still merged: the container's xattr is escaped

        # mkfifo / mknod
        os.mkfifo(mnt / "tmp/fifo", 0o644)
        assert stat.S_ISFIFO(os.stat(mnt / "tmp/fifo").st_mode)
        assert stat.S_ISFIFO(os.stat(up / "tmp/fifo").st_mode)
        r = os.open(mnt / "tmp/fifo", os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(mnt / "tmp/fifo", os.O_WRONLY)
        os.write(w, b"through the fifo")
        assert os.read(r, 100) == b"through the fifo"
        os.close(w)
        os.close(r)
        os.mknod(mnt / "tmp/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.stat(mnt / "tmp/null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)

        # statfs: the upper's filesystem
        sv, su = os.statvfs(mnt), os.statvfs(up)
        assert sv.f_bsize == su.f_bsize and sv.f_blocks == su.f_blocks and sv.f_namemax == 255

        # access (the kernel checks permissions: default_permissions)
        assert os.access(mnt / "etc/passwd", os.W_OK)
        assert not os.access(mnt / "nope", os.F_OK)

        # an open file keeps working after unlink (and leaves nothing in the upper)
        os.mkdir(mnt / "tmp/od")
        fd = os.open(mnt / "tmp/od/open-unlinked", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"before ")
            os.unlink(mnt / "tmp/od/open-unlinked")
            assert not (mnt / "tmp/od/open-unlinked").exists()
            assert os.listdir(mnt / "tmp/od") == [] and os.listdir(up / "tmp/od") == []
            os.write(fd, b"after")
            assert os.pread(fd, 100, 0) == b"before after"
            assert os.fstat(fd).st_size == 12
            assert os.fstat(fd).st_nlink == 0
            os.ftruncate(fd, 6)
            assert os.fstat(fd).st_size == 6
        finally:
            os.close(fd)
        os.rmdir(mnt / "tmp/od")
        # a lower file opened for reading, and a file replaced by a rename while open
        with open(mnt / "etc/group", "rb") as f, open(mnt / "etc/excl", "rb") as g:
            os.unlink(mnt / "etc/group")
            os.rename(mnt / "etc/passwd", mnt / "etc/excl")
            assert f.read() == b"g:x:5:\n"
            assert g.read() == b""
            assert os.fstat(g.fileno()).st_size == 0
        assert not (mnt / "etc/group").exists()
        os.rename(mnt / "etc/excl", mnt / "etc/passwd")
        (mnt / "etc/excl").write_bytes(b"")
        assert not [n for n in os.listdir(up / "tmp") + os.listdir(up / "etc")
                    if n.startswith(".fuse_hidden")]

        # rename over an existing file; rename of a file into another directory
        os.rename(mnt / "etc/excl", mnt / "etc/new")
        assert not (mnt / "etc/excl").exists()
        os.rename(mnt / "etc/new", mnt / "app2/new")
        assert (mnt / "app2/new").exists()
        assert errno_of(os.rename, mnt / "etc", mnt / "etc/sub") == errno.EINVAL
        assert errno_of(os.rename, mnt / "tmp", mnt / "usr") == errno.ENOTEMPTY

        # readdir never shows whiteouts, opaque marks or .wh. names
        for dirpath, dirs, files in os.walk(mnt):
            for n in dirs + files:
                assert not n.startswith(".wh.") and not n.startswith(".fuse_hidden"), (dirpath, n)
    finally:
        os.umask(old_umask)
        cli("umount", mnt)
    assert not os.path.ismount(mnt)
    assert_clean(root)


def test_the_daemon_leaves_its_startup_objects_out_of_the_collector(demo, cli, root: Path,
                                                                    mnt: Path):
    """Once the mount is live the daemon freezes what it has made (``gc.freeze``): a
    full collection walking all of it came in the middle of a big copy-up and made it
    bimodal (``daemon._freeze_startup_objects``)."""
    cli("create", "demo:app", "--name", "gc1")
    cli("mount", "gc1", mnt, "--debug", timeout=MOUNT_TIMEOUT)
    try:
        assert os.path.ismount(mnt)
        (mnt / "etc/new").write_bytes(b"x")
    finally:
        cli("umount", mnt)
    text = (upper_of(cli, "gc1").parent / "daemon.log").read_text()
    frozen = re.search(r"the mount is live: (\d+) objects left out of the garbage collector",
                       text)
    assert frozen is not None, text[-2000:]
    assert int(frozen.group(1)) > 10_000  # the modules and the store, at least


def test_permissions_for_non_root_users(demo, cli, mnt: Path):
    """default_permissions: the kernel checks modes for a non-root caller, and what the
    caller creates is owned by the caller (fuse_get_context)."""
    cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mnt, "--allow-other", timeout=MOUNT_TIMEOUT)  # else only root sees it
    try:
        script = (
            "import os, errno, sys\n"
            "os.chdir(sys.argv[1])  # the tmp dirs above the mount are root's alone\n"
            "os.setgroups([]); os.setresgid(1234, 1234, 1234); os.setresuid(1234, 1234, 1234)\n"
            "m = '.'\n"
            "out = []\n"
            "def e(fn, *a):\n"
            "    try:\n"
            "        fn(*a)\n"
            "        return 0\n"
            "    except OSError as x:\n"
            "        return x.errno\n"
            "out.append(e(os.open, m + '/etc/passwd', os.O_WRONLY))\n"
            "out.append(e(os.unlink, m + '/etc/passwd'))\n"
            "out.append(e(os.mkdir, m + '/etc/d'))\n"
            "fd = os.open(m + '/tmp/mine', os.O_WRONLY | os.O_CREAT, 0o600); os.close(fd)\n"
            "os.mkdir(m + '/tmp/mydir'); os.symlink('x', m + '/tmp/mylink')\n"
            "out.append(e(os.chown, m + '/tmp/mine', 0, 0))\n"
            "print(' '.join(map(str, out)))\n"
        )
        p = subprocess.run([sys.executable, "-c", script, str(mnt)], capture_output=True, check=False,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == [str(errno.EACCES)] * 3 + [str(errno.EPERM)]
        for name in ("mine", "mydir", "mylink"):
            st = os.lstat(mnt / "tmp" / name)
            assert (st.st_uid, st.st_gid) == (1234, 1234), name
    finally:
        cli("umount", mnt)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A ``system.posix_acl_access`` value: (tag, perm, id) entries, version 2."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_acls_are_checked(demo, cli, mnt: Path):
    """POSIX ACLs work as on kernel overlayfs: an ACL that lets a user read a 0600 file
    lets that user read it (FUSE without FUSE_POSIX_ACL kept ACLs as plain xattrs and
    never checked them), a chmod moves the ACL's mask, and the ACL reaches the upper."""
    cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mnt, "--allow-other", timeout=MOUNT_TIMEOUT)
    try:
        f = mnt / "tmp" / "acl"
        f.write_bytes(b"secret")
        os.chmod(f, 0o600)
        undefined = 0xFFFFFFFF
        os.setxattr(f, "system.posix_acl_access", _acl(
            (0x01, 6, undefined), (0x02, 4, 1234), (0x04, 0, undefined),
            (0x10, 4, undefined), (0x20, 0, undefined)))
        script = ("import os, sys\n"
                  "os.chdir(sys.argv[1])  # the tmp dirs above the mount are root's alone\n"
                  "os.setgroups([]); os.setresgid(1234, 1234, 1234); os.setresuid(1234, 1234, 1234)\n"
                  "print(open('tmp/acl', 'rb').read().decode())\n")
        p = subprocess.run([sys.executable, "-c", script, str(mnt)], capture_output=True,
                           text=True, timeout=60, check=False)
        assert p.returncode == 0 and p.stdout.strip() == "secret", p.stderr
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o640  # group bits show the mask
        os.chmod(f, 0o600)  # the mask goes to ---: the user may not read any more
        p = subprocess.run([sys.executable, "-c", script, str(mnt)], capture_output=True,
                           text=True, timeout=60, check=False)
        assert p.returncode != 0 and "Permission denied" in p.stderr
        acl = os.getxattr(f, "system.posix_acl_access")
        assert struct.pack("<HHI", 0x10, 0, 0xFFFFFFFF) in acl
        up = upper_of(cli, "c1") / "tmp" / "acl"
        assert os.getxattr(up, "system.posix_acl_access") == acl
    finally:
        cli("umount", mnt)


def test_persistence_two_containers_and_store_untouched(demo, cli, root: Path, mnt: Path,
                                                        tmp_path: Path):
    export_before = _export_layers(cli, "demo:app", tmp_path / "export-before")
    cli("create", "demo:app", "--name", "a")
    cli("create", "demo:app", "--name", "b")
    other = tmp_path / "mnt2"
    other.mkdir()
    mount(cli, "a", mnt)
    try:
        mount(cli, "b", other)
        try:
            (mnt / "etc/only-a").write_text("a\n")
            os.unlink(mnt / "etc/passwd")
            os.rename(mnt / "app", mnt / "app-a")
            (other / "etc/passwd").write_text("b's passwd\n")
            assert not (other / "etc/only-a").exists()
            assert not (other / "app-a").exists() and (other / "app/hello.sh").exists()
            assert not (mnt / "etc/passwd").exists()
            assert (other / "etc/passwd").read_text() == "b's passwd\n"
            # a second mount of a mounted container is refused
            third = tmp_path / "mnt3"
            third.mkdir()
            p = cli("mount", "a", third, check=False)
            assert p.returncode != 0 and "already mounted" in p.stderr
            assert not os.path.ismount(third)
            # rm refuses while mounted
            p = cli("rm", "b", check=False)
            assert p.returncode != 0 and "mounted" in p.stderr
        finally:
            cli("umount", "b")
    finally:
        cli("umount", mnt)
    want = tree_manifest(upper_of(cli, "a"))
    mount(cli, "a", mnt)
    try:
        assert (mnt / "etc/only-a").read_text() == "a\n"
        assert not (mnt / "etc/passwd").exists()
        assert (mnt / "app-a/hello.sh").exists() and not (mnt / "app").exists()
        ino = os.stat(mnt / "etc/only-a").st_ino
    finally:
        cli("umount", "a")
    assert tree_manifest(upper_of(cli, "a")) == want  # a mount without writes changes nothing
    mount(cli, "a", mnt)
    try:
        assert os.stat(mnt / "etc/only-a").st_ino == ino  # stable across remount
    finally:
        cli("umount", "a")
    assert_clean(root)
    export_after = _export_layers(cli, "demo:app", tmp_path / "export-after")
    assert [p.name for p in export_before] == [p.name for p in export_after]
    for x, y in zip(export_before, export_after):
        assert x.read_bytes() == y.read_bytes()
    cli("rm", "a", "b")


# --- the operation script, on our mount and on kernel overlayfs --------------------------


@pytest.mark.parametrize("copy_up,metacopy", [("full", "off"), ("meta", "on")])
def test_same_as_kernel_overlayfs_through_fuse(demo, cli, root: Path, mnt: Path, tmp_path: Path,
                                               copy_up: str, metacopy: str):
    """The kernel script through the CLI mount and through kernel overlayfs: full copy-up
    against the kernel's default, metadata-only against ``metacopy=on``."""
    lowers, ku, kw, kmnt = kernel_dirs(cli, tmp_path)
    cli("create", "demo:app", "--name", "c1")
    ours_upper = upper_of(cli, "c1")
    t0 = (int(os.stat(tmp_path).st_mtime_ns) // 10**9 - 2) * 10**9
    old_umask = os.umask(0)  # modes as given on both sides
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(reversed(lowers))},upperdir={ku},workdir={kw},"
                        + f"redirect_dir=on,index=off,metacopy={metacopy}", str(kmnt)], check=True)
        try:
            cli("mount", "c1", mnt, "--copy-up", copy_up, timeout=MOUNT_TIMEOUT)
            try:
                mismatches = script_mismatches(kmnt, kernel, mnt)
                assert not mismatches, "steps differ:\n" + "\n".join(mismatches)
                kernel_tree = _norm_times(tree_manifest(kmnt, dir_mtimes=False), t0)
                ours_tree = _norm_times(tree_manifest(mnt, dir_mtimes=False), t0)
            finally:
                cli("umount", mnt)
        finally:
            subprocess.run(["umount", str(kmnt)], check=True)
    finally:
        os.umask(old_umask)
    d = diff_manifests(kernel_tree, ours_tree)
    assert not d, "merged trees differ (first: kernel, second: ours):\n" + "\n".join(d[:40])

    # the uppers (their roots are made by different code: mode of the directory we created)
    d, redirected = upper_differences(ku, ours_upper, t0, drop_root=True)
    assert not d, "uppers differ (first: kernel, second: ours):\n" + "\n".join(d[:40])
    assert redirected == {b"etc2", b"tmp/d1", b"var/cache/app"}
    assert_clean(root)


# --- kill -9 of the daemon during a copy-up -----------------------------------------------

BIG_SIZE = 64 << 20
TRIALS = 20
WRITER = (
    "import os, sys\n"
    "print('go', flush=True)\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY)\n"  # the copy-up happens here, in the daemon
    "os.pwrite(fd, b'NEW!', 0)\n"
    "os.close(fd)\n"
    "print('done', flush=True)\n"
)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _metacopy_written(path: Path) -> int | None:
    """Bytes of data an upper metacopy file holds (None: not a metacopy file)."""
    try:
        os.getxattr(path, "trusted.overlay.metacopy")
    except OSError:
        return None
    return path.stat().st_blocks * 512


@pytest.mark.parametrize("first", ["write", "chmod"])
def test_kill_during_copy_up(cli, root: Path, mnt: Path, tmp_path: Path, first: str):
    """kill -9 during the copy-up of a 64 MiB lower file, 20 times: the first write to
    the lower file (a full copy-up, built in work and renamed into place), or to a file
    a chmod copied up metadata-only (the data goes into the upper file in place, and the
    metacopy mark is dropped last)."""
    data = random.Random(7).randbytes(BIG_SIZE)
    old = hashlib.sha256(data).hexdigest()
    new = hashlib.sha256(b"NEW!" + data[4:]).hexdigest()
    layer = tmp_path / "big.tar"
    layer.write_bytes(tar_bytes([dir_("data"), reg("data/big", data)]))
    del data
    cli("import", layer, "--tag", "big:1")
    cli("create", "big:1", "--name", "k")
    info = container(cli, "k")
    up = Path(info["upper"])
    work = up.parent / "work"
    big = mnt / "data/big"

    def copy_up(delay: float | None) -> tuple[str, float]:
        """Start a write (so a copy-up) of the big file; kill -9 the daemon after
        ``delay`` seconds (None: let it finish). Returns the writer's output."""
        if first == "chmod":
            os.chmod(big, 0o640)
            assert _metacopy_written(up / "data/big") is not None
        state = json.loads((up.parent / "mount.json").read_text())
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(big)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            assert w.stdout is not None
            assert w.stdout.readline() == "go\n"
            t = time.monotonic()
            if delay is not None:
                time.sleep(delay)
                os.kill(state["pid"], signal.SIGKILL)
            out, _ = w.communicate(timeout=30)
            return out, time.monotonic() - t
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()

    start = time.monotonic()
    mount(cli, "k", mnt)
    try:
        out, full = copy_up(None)  # a copy-up left alone: how long it takes
        assert out == "done\n"
        assert _digest(big) == new
    finally:
        cli("umount", mnt)
    outcomes = []
    (up / "data/big").unlink()  # back to the lower file (no daemon runs)
    mount(cli, "k", mnt)
    try:
        for i in range(TRIALS):
            # mounted, and the big file is the lower one: write to it, kill the daemon
            out, _ = copy_up(full * (i + 0.5) / TRIALS * 1.2)
            killed = out != "done\n"
            p = cli("umount", "k", check=False, timeout=60)
            assert p.returncode == 0, p.stderr
            assert not os.path.ismount(mnt)
            # a copy-up cut short leaves its temporary file in work (removed at the next mount)
            mid = any(n.startswith("#layerstore-") for n in os.listdir(work))
            # nothing partial at its final name in the upper (but a metacopy file, which
            # still reads from the lower, may hold part of the data)
            ub = up / "data/big"
            if first == "chmod":
                written = _metacopy_written(ub)
                mid = written is not None and 0 < written
                assert not [n for n in os.listdir(work) if n.startswith("#layerstore-")]
            if ub.exists():
                assert ub.stat().st_size == BIG_SIZE, (i, ub.stat().st_size)
            assert sorted(os.listdir(up)) == ["data"]
            assert set(os.listdir(up / "data")) <= {"big"}
            # mounts again, shows the old or the new content, and left no temp files in work
            mount(cli, "k", mnt)
            got = _digest(big)
            assert got in (old, new), i
            assert not [n for n in os.listdir(work) if n.startswith("#layerstore-")]
            outcomes.append(("killed" if killed else "done", "mid-copy-up" if mid else "-",
                             "new" if got == new else "old"))
            if ub.exists():  # copied up: back to the lower file for the next trial
                cli("umount", "k")
                ub.unlink()
                mount(cli, "k", mnt)
    finally:
        if os.path.ismount(mnt):
            cli("umount", "k")
    elapsed = time.monotonic() - start
    print("kill -9 during copy-up:", outcomes, f"{elapsed:.1f}s")
    # the loop killed at least some copy-ups in flight
    assert any(m == "mid-copy-up" for _, m, _ in outcomes), outcomes
    assert elapsed < 120, elapsed
    assert_clean(root)
