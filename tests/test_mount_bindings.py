"""The mount on each FUSE transport (``LAYERSTORE_FUSE``, ``layerstore/fuse/binding.py``):
mfusepy on libfuse's high-level API, pyfuse3 on the low-level one, and the protocol
spoken on /dev/fuse directly (``wire.py``; these two under ``lowlevel.py``, which keeps
its own inode table), through the CLI and ``layerstore-overlay``, always unmounted.
What the inode table must get right: hard links are one inode (a write or chmod through
one name shows through the other), a renamed directory's children are reached under the
new name, an unlinked open file stays usable, and the daemon is the binding asked for.
What wire.py takes over from the kernel must hold on all three: setuid/setgid cleared
for callers without CAP_FSETID, listings right after changes (the kernel keeps them).
The other mount tests run on whichever binding ``LAYERSTORE_FUSE`` names (CI runs them
on the default, wire.py)."""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean
from helpers_images import dir_, reg, tar_bytes
from test_mount_rw import MOUNT_TIMEOUT, errno_of, pytestmark, upper_of  # noqa: F401  (fuse; root)
from test_overlay_compat import SCRIPT_PATH, wait_gone

from layerstore.fuse.daemon import is_mounted

BINDINGS = ["mfusepy", "pyfuse3", "wire"]
#: a file the daemon of each binding has mapped (``/proc/PID/maps``)
LIBRARY_OF = {"mfusepy": "libfuse3.so", "pyfuse3": "pyfuse3/__init__"}
#: what the daemon of each binding says it runs on (``mount.json``)
NAME_OF = {"mfusepy": "mfusepy on libfuse3", "pyfuse3": "pyfuse3 on libfuse3",
           "wire": "the FUSE protocol on /dev/fuse"}


@pytest.fixture(params=BINDINGS)
def binding(request) -> str:
    if request.param == "pyfuse3" and importlib.util.find_spec("pyfuse3") is None:
        pytest.skip("pyfuse3 is not installed (pip install 'layerstore[pyfuse3]')")
    return request.param  # type: ignore[no-any-return]


def _cli(cli, binding: str):
    def run(*args, **kw):
        return cli(*args, env={"LAYERSTORE_FUSE": binding}, **kw)
    return run


def _state(root: Path, name: str, cli) -> dict:
    cid = next(c for c in json.loads(cli("ps", "--json").stdout) if c["name"] == name)["id"]
    return json.loads((root / "containers" / cid / "mount.json").read_text())


def _mount(cli, binding: str, root: Path, name: str, mp: Path, *args: str) -> None:
    _cli(cli, binding)("mount", name, mp, *args, timeout=MOUNT_TIMEOUT)
    assert os.path.ismount(mp)
    state = _state(root, name, cli)
    assert state["fuse"].startswith(NAME_OF[binding]), state
    maps = Path(f"/proc/{state['pid']}/maps").read_text()
    if binding in LIBRARY_OF:
        assert LIBRARY_OF[binding] in maps, f"the daemon does not run on {binding}"
    if binding != "pyfuse3":
        assert "pyfuse3" not in maps


def test_links_renames_and_open_unlinked(demo, cli, root: Path, mnt: Path, binding: str):
    cli("create", "demo:app", "--name", "c1")
    _mount(cli, binding, root, "c1", mnt)
    try:
        # hard links of a lower file: one inode; data and attributes through either name
        os.link(mnt / "etc/passwd", mnt / "tmp/pw")
        a, b = os.stat(mnt / "etc/passwd"), os.stat(mnt / "tmp/pw")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        before = (mnt / "etc/passwd").read_bytes()  # cached by the kernel under one name
        with open(mnt / "tmp/pw", "ab") as f:
            f.write(b"via-link\n")
        assert (mnt / "etc/passwd").read_bytes() == before + b"via-link\n"
        os.chmod(mnt / "etc/passwd", 0o600)
        assert stat.S_IMODE(os.stat(mnt / "tmp/pw").st_mode) == 0o600
        os.truncate(mnt / "tmp/pw", 4)
        assert os.stat(mnt / "etc/passwd").st_size == 4
        assert (mnt / "etc/passwd").read_bytes() == before[:4]
        # hard link of a new file, then unlink of the first name
        (mnt / "tmp/n1").write_bytes(b"one")
        os.link(mnt / "tmp/n1", mnt / "tmp/n2")
        (mnt / "tmp/n2").write_bytes(b"two")
        assert (mnt / "tmp/n1").read_bytes() == b"two"
        os.unlink(mnt / "tmp/n1")
        assert os.stat(mnt / "tmp/n2").st_nlink == 1
        assert (mnt / "tmp/n2").read_bytes() == b"two"

        # rename of a lower directory, then its children under the new name
        files = sorted(os.listdir(mnt / "app"))
        hello = (mnt / "app/hello.sh").read_bytes()
        ino = os.stat(mnt / "app/hello.sh").st_ino
        os.rename(mnt / "app", mnt / "app2")
        assert errno_of(os.stat, mnt / "app/hello.sh") == errno.ENOENT
        assert sorted(os.listdir(mnt / "app2")) == files
        assert (mnt / "app2/hello.sh").read_bytes() == hello
        assert os.stat(mnt / "app2/hello.sh").st_ino == ino
        (mnt / "app2/new").write_bytes(b"new")
        # a new directory tree, renamed twice, and moved into another directory
        os.makedirs(mnt / "d1/sub/deep")
        (mnt / "d1/sub/deep/f").write_bytes(b"deep")
        os.rename(mnt / "d1", mnt / "d2")
        os.rename(mnt / "d2/sub", mnt / "app2/sub")
        assert (mnt / "app2/sub/deep/f").read_bytes() == b"deep"
        assert os.listdir(mnt / "d2") == []
        # a directory renamed over an empty one
        os.mkdir(mnt / "d3")
        os.rename(mnt / "app2/sub", mnt / "d3")
        assert (mnt / "d3/deep/f").read_bytes() == b"deep"
        assert not (mnt / "app2/sub").exists()

        # unlink of an open file: fstat, read and write go on through the fd
        fd = os.open(mnt / "tmp/n2", os.O_RDWR)
        try:
            os.unlink(mnt / "tmp/n2")
            assert not (mnt / "tmp/n2").exists()
            assert os.fstat(fd).st_nlink == 0
            assert os.pread(fd, 3, 0) == b"two"
            os.pwrite(fd, b"more", 3)
            assert os.pread(fd, 10, 0) == b"twomore"
            assert os.fstat(fd).st_size == 7
        finally:
            os.close(fd)
        # and a lower file opened for reading, then unlinked
        fd = os.open(mnt / "etc/group", os.O_RDONLY)
        try:
            data = (mnt / "etc/group").read_bytes()
            os.unlink(mnt / "etc/group")
            assert os.pread(fd, len(data) + 1, 0) == data
            assert os.fstat(fd).st_size == len(data)
        finally:
            os.close(fd)
        # the same name made again is a new file
        (mnt / "etc/group").write_bytes(b"new group\n")
        assert (mnt / "etc/group").read_bytes() == b"new group\n"
    finally:
        _cli(cli, binding)("umount", "c1")
    # what the mount wrote is in the upper after the daemon exits
    _mount(cli, binding, root, "c1", mnt)
    try:
        assert (mnt / "d3/deep/f").read_bytes() == b"deep"
        assert (mnt / "app2/new").read_bytes() == b"new"
        assert os.stat(mnt / "etc/passwd").st_nlink == 2
    finally:
        _cli(cli, binding)("umount", "c1")
    assert_clean(root)


def test_read_only_mount(demo, cli, root: Path, mnt: Path, binding: str):
    cli("create", "demo:app", "--name", "c1")
    _mount(cli, binding, root, "c1", mnt, "--read-only")
    try:
        names = sorted(os.listdir(mnt))
        assert "etc" in names and "app" in names
        assert (mnt / "etc/passwd").read_bytes().startswith(b"root:")
        assert errno_of(os.open, mnt / "etc/passwd", os.O_WRONLY) == errno.EROFS
        assert errno_of(os.mkdir, mnt / "x") == errno.EROFS
        for dirpath, dirnames, filenames in os.walk(mnt):
            for n in filenames:
                os.lstat(os.path.join(dirpath, n))
    finally:
        _cli(cli, binding)("umount", "c1")


def test_big_directories_list_whole(cli, root: Path, mnt: Path, tmp_path: Path,
                                    binding: str):
    """A listing longer than one READDIR(PLUS) reply (the kernel asks in 4 KiB pieces,
    and mfusepy's listings go out in offset mode, a piece per request) comes out whole,
    once, with the attributes ``lstat`` gives; a listing read again from the start
    shows the changes made since."""
    names = [f"entry-{i:04d}-" + "x" * (i % 97) for i in range(700)]
    members = [dir_("big")] + [reg(f"big/{n}", n.encode(), mode=0o600 + i % 64)
                               for i, n in enumerate(names)]
    layer = tmp_path / "bigdir.tar"
    layer.write_bytes(tar_bytes(members))
    cli("import", layer, "--tag", "bigdir:1")
    cli("create", "bigdir:1", "--name", "b")
    _mount(cli, binding, root, "b", mnt)
    try:
        big = mnt / "big"
        with os.scandir(big) as it:
            listed = {e.name: e.stat(follow_symlinks=False) for e in it}
        assert sorted(listed) == sorted(names)
        for i, n in enumerate(names):
            st = listed[n]
            assert stat.S_IMODE(st.st_mode) == 0o600 + i % 64
            assert st.st_size == len(n.encode())
            assert st.st_ino == os.lstat(big / n).st_ino
        os.chmod(big / names[3], 0o755)
        (big / "new-file").write_bytes(b"new")
        os.unlink(big / names[5])
        fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
        try:
            first = os.listdir(fd)
            os.unlink(big / names[6])
            again = os.listdir(fd)  # rewinds: a new listing
        finally:
            os.close(fd)
        want = sorted(set(names) - {names[5]} | {"new-file"})
        assert sorted(first) == want
        assert sorted(again) == sorted(set(want) - {names[6]})
        with os.scandir(big) as it:
            modes = {e.name: stat.S_IMODE(e.stat(follow_symlinks=False).st_mode) for e in it}
        assert modes[names[3]] == 0o755 and modes["new-file"] & 0o777
        # a change between two pieces of a listing: the later piece must not hand the
        # kernel the attributes the listing had (a deleted name shown as there for the
        # attribute timeout, a grown file as short)
        listed_names = sorted(os.listdir(big))
        gone, grown = listed_names[300], listed_names[400]
        with os.scandir(big) as it:
            next(it)  # the first piece only
            os.unlink(big / gone)
            with open(big / grown, "ab") as f:
                f.write(b"more" * 1000)
            rest = [e.name for e in it]
        assert grown in rest
        assert not os.path.lexists(big / gone)
        assert errno_of(os.lstat, big / gone) == errno.ENOENT
        assert os.lstat(big / grown).st_size == len(grown.encode()) + 4000
        assert (big / grown).read_bytes().endswith(b"more")
        grown2 = listed_names[500]  # a write alone (no name changed) in between
        with os.scandir(big) as it:
            next(it)
            with open(big / grown2, "ab") as f:
                f.write(b"more" * 1000)
            assert grown2 in [e.name for e in it]
        assert os.lstat(big / grown2).st_size == len(grown2.encode()) + 4000
        # two readers of one directory, and a name the first has read removed: a
        # listing started meanwhile does not move the first reader's place in its own
        # (on wire.py listings are per reader, not per directory)
        listed_names = os.listdir(big)
        with os.scandir(big) as it1:
            first = [next(it1).name]  # reads the first getdents batch
            os.unlink(big / first[0])
            assert first[0] not in os.listdir(big)  # the second reader, from the start
            rest = [e.name for e in it1]
        assert len(first + rest) == len(set(first + rest))
        assert set(first + rest) == set(listed_names)
        # the kernel caches symlink targets (FUSE_CAP_CACHE_SYMLINKS): a link made
        # again, or renamed over, reads its own target
        os.symlink("first", big / "link")
        assert os.readlink(big / "link") == "first"
        os.unlink(big / "link")
        os.symlink("second", big / "link")
        assert os.readlink(big / "link") == "second"
        os.symlink("third", big / "link2")
        os.rename(big / "link2", big / "link")
        assert os.readlink(big / "link") == "third"
    finally:
        _cli(cli, binding)("umount", "b")


def test_overlay_command(tmp_path: Path, binding: str):
    lower, upper, work, mp = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mp):
        d.mkdir()
    (lower / "a").write_bytes(b"lower a")
    os.mkdir(lower / "dir")
    (lower / "dir/b").write_bytes(b"lower b")
    env = dict(os.environ, LAYERSTORE_FUSE=binding)
    p = subprocess.run([str(SCRIPT_PATH), "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                        str(mp)], capture_output=True, text=True, env=env, timeout=MOUNT_TIMEOUT)
    assert p.returncode == 0, p.stderr
    try:
        os.rename(mp / "dir", mp / "dir2")
        assert (mp / "dir2/b").read_bytes() == b"lower b"
        os.link(mp / "a", mp / "a2")
        (mp / "a2").write_bytes(b"upper")
        assert (mp / "a").read_bytes() == b"upper"
    finally:
        subprocess.run(["umount", str(mp)], capture_output=True, check=False)
        if os.path.ismount(mp):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True, check=False)
    assert wait_gone(mp)
    assert (upper / "a").read_bytes() == b"upper" and os.stat(upper / "a").st_nlink == 2


def test_sigterm_unmounts(demo, cli, root: Path, mnt: Path, binding: str):
    """SIGTERM to the daemon unmounts and ends it (the daemon must not stat its own
    mountpoint on the way out: that request would wait for itself). Watched through the
    mount table and /proc only: a stat of a hung mount would hang the test."""
    cli("create", "demo:app", "--name", "c1")
    _mount(cli, binding, root, "c1", mnt)
    pid = _state(root, "c1", cli)["pid"]
    assert "etc" in os.listdir(mnt)
    assert (mnt / "etc/passwd").read_bytes().startswith(b"root:")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (is_mounted(mnt) or _alive(pid)):
        time.sleep(0.05)
    hung = _alive(pid)
    if hung:
        os.kill(pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
    assert not hung, "the daemon did not exit on SIGTERM"
    assert not is_mounted(mnt)
    _cli(cli, binding)("umount", "c1", check=False)  # nothing left to do but the state


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def _cached_mode(path: Path) -> int:
    """``st_mode`` from statx(2) asking for the mode alone: FUSE answers it from the
    kernel's cached attributes unless the mode itself was invalidated."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    at_fdcwd, statx_mode = -100, 0x2
    if libc.statx(at_fdcwd, os.fsencode(path), 0, statx_mode, buf) != 0:
        raise OSError(ctypes.get_errno(), "statx", str(path))
    return struct.unpack_from("<H", buf.raw, 28)[0]  # stx_mode


def _as_user(mnt: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (Python, in the mount's root directory) as uid/gid 1234, with no
    capabilities: what the kernel does for a caller without CAP_FSETID."""
    script = ("import os, sys\n"
              "os.chdir(sys.argv[1])\n"
              "os.setgroups([]); os.setresgid(1234, 1234, 1234); os.setresuid(1234, 1234, 1234)\n"
              + code)
    return subprocess.run([sys.executable, "-c", script, str(mnt)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_setuid_and_setgid_are_cleared_as_the_kernel_does(demo, cli, root: Path, mnt: Path,
                                                          binding: str):
    """A write or truncate by a caller without CAP_FSETID clears setuid (and setgid with
    group execute); root's keep them; chown clears them for anyone. On wire.py the
    kernel leaves the truncate cases to the daemon (FUSE_HANDLE_KILLPRIV_V2)."""
    cli("create", "demo:app", "--name", "c1")
    _mount(cli, binding, root, "c1", mnt, "--allow-other")
    try:
        f = mnt / "tmp" / "suid"
        f.write_bytes(b"#!/bin/sh\n")
        cases = {
            "append": "open('tmp/suid', 'ab').write(b'x')\n",
            "truncate": "os.truncate('tmp/suid', 3)\n",
            "ftruncate": "fd = os.open('tmp/suid', os.O_WRONLY); os.ftruncate(fd, 2)\n",
            "open O_TRUNC": "os.close(os.open('tmp/suid', os.O_WRONLY | os.O_TRUNC))\n",
        }
        for what, code in cases.items():
            os.chmod(f, 0o6777)
            p = _as_user(mnt, code)
            assert p.returncode == 0, (what, p.stderr)
            # the mode the kernel itself has (what exec and permission checks use):
            # statx for the mode alone is answered from its cache
            assert stat.S_IMODE(_cached_mode(f)) == 0o777, what
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o777, what
            up = upper_of(cli, "c1") / "tmp" / "suid"
            assert stat.S_IMODE(os.stat(up).st_mode) == 0o777, what
        for what, op in (("write", lambda: f.open("ab").write(b"y")),
                         ("truncate", lambda: os.truncate(f, 1)),
                         ("open O_TRUNC", lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC)))):
            os.chmod(f, 0o6777)
            op()
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o6777, f"root's {what}"
        os.chmod(f, 0o6777)
        os.chown(f, 1, 1)
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o777
        # file capabilities go with any write, truncate or chown, also root's
        cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_bind_service
        for what, op in (("write", lambda: f.open("ab").write(b"z")),
                         ("truncate", lambda: os.truncate(f, 1)),
                         ("chown", lambda: os.chown(f, 0, 0))):
            os.setxattr(f, "security.capability", cap)
            op()
            assert "security.capability" not in os.listxattr(f), what
    finally:
        _cli(cli, binding)("umount", "c1")


def test_listings_follow_changes(demo, cli, root: Path, mnt: Path, binding: str):
    """Listings stay right after every kind of change, also where the kernel keeps them
    itself (wire.py: no OPENDIR, so listings are cached with the directory)."""
    cli("create", "demo:app", "--name", "c1")
    _mount(cli, binding, root, "c1", mnt)
    try:
        etc, tmp = mnt / "etc", mnt / "tmp"
        before = sorted(os.listdir(etc))
        assert sorted(os.listdir(etc)) == before  # twice: the second may come from a cache
        (etc / "new").write_bytes(b"1")
        assert sorted(os.listdir(etc)) == sorted([*before, "new"])
        with open(etc / "new", "ab") as fh:
            fh.write(b"2345")
        assert {e.name: e.stat(follow_symlinks=False).st_size
                for e in os.scandir(etc)}["new"] == 5
        os.rename(etc / "new", tmp / "moved")
        assert sorted(os.listdir(etc)) == before
        assert "moved" in os.listdir(tmp)
        os.unlink(etc / "passwd")  # a lower file: a whiteout
        assert "passwd" not in os.listdir(etc)
        os.mkdir(etc / "sub")
        assert "sub" in os.listdir(etc) and os.listdir(etc / "sub") == []
        (etc / "sub" / "a").write_bytes(b"")
        assert os.listdir(etc / "sub") == ["a"]
        os.unlink(etc / "sub" / "a")
        os.rmdir(etc / "sub")
        assert sorted(os.listdir(etc)) == sorted(set(before) - {"passwd"})
        os.rename(tmp, mnt / "tmp2")
        assert "moved" in os.listdir(mnt / "tmp2") and "tmp" not in os.listdir(mnt)
    finally:
        _cli(cli, binding)("umount", "c1")


def test_xattrs_after_misses(demo, cli, root: Path, mnt: Path, binding: str):
    """An attribute a file did not have, then has, then has not any more: never
    answered from what an earlier miss found (lowlevel.py keeps a node's attribute
    names after a miss, for `ls -l`'s security.selinux)."""
    cli("create", "demo:app", "--name", "c1")
    _mount(cli, binding, root, "c1", mnt)
    try:
        (mnt / "tmp" / "x").write_bytes(b"x")
        os.link(mnt / "tmp" / "x", mnt / "tmp" / "x2")
        for f, other in ((mnt / "etc" / "passwd", mnt / "etc" / "passwd"),
                         (mnt / "tmp" / "x", mnt / "tmp" / "x2")):
            assert errno_of(os.getxattr, f, "user.a") == errno.ENODATA
            assert errno_of(os.getxattr, f, "security.selinux") == errno.ENODATA
            os.setxattr(f, "user.a", b"1")
            assert os.getxattr(other, "user.a") == b"1"
            assert errno_of(os.getxattr, other, "user.b") == errno.ENODATA
            os.setxattr(other, "user.b", b"2")
            assert os.getxattr(f, "user.b") == b"2"
            os.removexattr(f, "user.a")
            assert errno_of(os.getxattr, other, "user.a") == errno.ENODATA
            assert sorted(os.listxattr(f)) == ["user.b"]
    finally:
        _cli(cli, binding)("umount", "c1")
