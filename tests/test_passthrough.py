"""FUSE passthrough on wire.py (``wire._Passthrough``): an open file whose data is a
plain upper file is read and written by the kernel itself, without the daemon. What must
hold, through the mount: the kernel really does the I/O (writes go on while the daemon
is stopped, and with ``LAYERSTORE_FUSE_PASSTHROUGH=0`` they wait for it); no open ever
fails for the kernel's io-mode rules (a reader open on a lower file while a writer
copies it up, two opens and two names of one file, mmap); the daemon's listings do not
hand the kernel sizes older than a passthrough write; setuid/setgid are still cleared
for callers without CAP_FSETID; files still being copied up lazily stay with the daemon.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_mount_bindings import _as_user, _cached_mode, _state
from test_mount_rw import MOUNT_TIMEOUT, pytestmark, upper_of  # noqa: F401  (fuse; root)

WIRE = {"LAYERSTORE_FUSE": "wire"}


def _mount(cli, mp: Path, *args: str, env: dict[str, str] | None = None) -> None:
    cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mp, *args, env={**WIRE, **(env or {})}, timeout=MOUNT_TIMEOUT)
    assert os.path.ismount(mp)


def _write_while_stopped(root: Path, cli, fd: int, data: bytes) -> bool:
    """pwrite ``data`` at 0 through ``fd`` and read it back, in a thread, while the
    daemon is stopped (SIGSTOP); whether that finished within 2 s. The daemon is
    continued whatever happens."""
    pid = _state(root, "c1", cli)["pid"]
    done = threading.Event()

    def io() -> None:
        os.pwrite(fd, data, 0)
        assert os.pread(fd, len(data), 0) == data
        done.set()

    t = threading.Thread(target=io, daemon=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        t.start()
        finished = done.wait(2)
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(30)
    assert not t.is_alive()
    return finished


def test_writes_and_reads_need_no_daemon(demo, cli, root: Path, mnt: Path):
    _mount(cli, mnt)
    try:
        f = mnt / "tmp" / "new"
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"x")  # the first write asks the daemon about security.capability
            assert _write_while_stopped(root, cli, fd, b"p" * (1 << 20)), \
                "I/O on a plain upper file waited for the daemon"
        finally:
            os.close(fd)
        assert (upper_of(cli, "c1") / "tmp" / "new").read_bytes() == b"p" * (1 << 20)
        assert f.stat().st_size == 1 << 20
        # a lower file copied up by an open for writing is passed through as well (not
        # read through the mount before: until the daemon has seen that reader's
        # RELEASE, which the kernel sends after close returns, it would give the
        # writer a page-cache open, as the kernel's rules want)
        blob = mnt / "app-data" / "blob.bin"
        size = blob.stat().st_size
        fd = os.open(blob, os.O_RDWR)
        try:
            os.pwrite(fd, b"y", 0)
            assert _write_while_stopped(root, cli, fd, b"q" * 4096)
        finally:
            os.close(fd)
        up = (upper_of(cli, "c1") / "app-data" / "blob.bin").read_bytes()
        assert len(up) == size and up[:4096] == b"q" * 4096
        assert blob.read_bytes() == up
    finally:
        cli("umount", "c1")


def test_off_by_environment(demo, cli, root: Path, mnt: Path):
    """LAYERSTORE_FUSE_PASSTHROUGH=0: the daemon serves every read and write (and the
    check above can fail)."""
    _mount(cli, mnt, env={"LAYERSTORE_FUSE_PASSTHROUGH": "0"})
    try:
        fd = os.open(mnt / "tmp" / "new", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"x")
            assert not _write_while_stopped(root, cli, fd, b"p" * 4096)
        finally:
            os.close(fd)
    finally:
        cli("umount", "c1")


def test_opens_never_conflict(demo, cli, root: Path, mnt: Path):
    """The kernel fails an open (EIO) that mixes passthrough and its page cache on one
    inode, or two backing files: every mix of opens here must work and agree. (Without
    the file cache: a reader passed through to the cached copy of a lower file makes an
    open for writing fail with ETXTBSY, ``test_file_cache.py``.)"""
    _mount(cli, mnt, env={"LAYERSTORE_FILE_CACHE": "0"})
    try:
        blob = mnt / "app-data" / "blob.bin"
        lower = blob.read_bytes()
        # a reader of the lower file (page cache), then a writer that copies it up
        with open(blob, "rb") as r:
            assert r.read(8192) == lower[:8192]
            with open(blob, "r+b") as w:
                w.write(b"W" * 10)
                w.flush()
                r.seek(0)
                assert r.read(10) == b"W" * 10  # the reader follows the copy-up
            # a second writer while the reader is still open
            with open(blob, "r+b") as w2:
                w2.seek(10)
                w2.write(b"V")
        # all closed: now passthrough; two opens of one file, through two names
        os.link(blob, mnt / "tmp" / "blob-link")
        with open(blob, "rb") as r, open(mnt / "tmp" / "blob-link", "ab") as a:
            a.write(b"END")
            a.flush()
            assert os.pread(r.fileno(), 3, len(lower)) == b"END"
        expect = b"W" * 10 + b"V" + lower[11:] + b"END"
        assert blob.read_bytes() == expect
        assert (mnt / "tmp" / "blob-link").stat().st_size == len(expect)
        # a shared mapping writes the upper file
        with open(blob, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[0:4] = b"MMAP"
            m.flush()
        up = upper_of(cli, "c1") / "app-data" / "blob.bin"
        assert up.read_bytes()[:4] == b"MMAP"
        # truncation through a passthrough open, seen by the next open and stat
        with open(blob, "r+b") as f:
            f.truncate(100)
        assert blob.stat().st_size == 100 and blob.read_bytes() == b"MMAP" + expect[4:100]
        with open(blob, "wb") as f:  # O_TRUNC
            f.write(b"short")
        assert blob.read_bytes() == b"short"
    finally:
        cli("umount", "c1")


def test_listing_after_a_passthrough_write(demo, cli, root: Path, mnt: Path):
    """A listing read in pieces (READDIRPLUS carries attributes, which the kernel takes)
    must not give a size older than a write the daemon never saw."""
    _mount(cli, mnt)
    try:
        d = mnt / "tmp" / "many"
        d.mkdir()
        for i in range(2000):
            (d / f"f{i:04d}").write_bytes(b"")
        target = d / "zzzz"
        with open(target, "wb") as f:
            f.write(b"1")
            f.flush()
            with os.scandir(d) as it:
                first = next(it)  # the first piece of the listing
                assert first.name != "zzzz"
                f.write(b"2" * 9999)  # passthrough: the daemon is not told
                f.flush()
                rest = {e.name for e in it}
            assert "zzzz" in rest
        assert target.stat().st_size == 10000
        assert os.path.getsize(target) == len(target.read_bytes()) == 10000
    finally:
        cli("umount", "c1")


def test_setuid_cleared_when_set_while_open(demo, cli, root: Path, mnt: Path):
    """A file opened (passthrough) before it became setuid: a later write by a caller
    without CAP_FSETID still clears the bits (the kernel sends an empty SETATTR)."""
    _mount(cli, mnt, "--allow-other")
    try:
        f = mnt / "tmp" / "s"
        f.write_bytes(b"#!/bin/sh\n")
        os.chmod(f, 0o666)
        code = ("import os, sys\n"
                "fd = os.open('tmp/s', os.O_WRONLY | os.O_APPEND)\n"
                "os.write(fd, b'a')\n"
                "sys.stdin.readline()\n"  # the test makes it setuid meanwhile
                "os.write(fd, b'b')\n")
        script = ("import os, sys\n"
                  "os.chdir(sys.argv[1])\n"
                  "os.setgroups([]); os.setresgid(1234, 1234, 1234); "
                  "os.setresuid(1234, 1234, 1234)\n" + code)
        p = subprocess.Popen([sys.executable, "-c", script, str(mnt)], stdin=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while f.stat().st_size < 11 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.chmod(f, 0o6777)
            assert stat.S_IMODE(_cached_mode(f)) == 0o6777
            _, err = p.communicate("\n", timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, err
        assert f.read_bytes() == b"#!/bin/sh\nab"
        assert stat.S_IMODE(_cached_mode(f)) == 0o777
        assert stat.S_IMODE((upper_of(cli, "c1") / "tmp" / "s").stat().st_mode) == 0o777
        assert _as_user(mnt, "open('tmp/s', 'ab').write(b'c')\n").returncode == 0
    finally:
        cli("umount", "c1")


def test_lazy_copy_up_stays_with_the_daemon(demo, cli, root: Path, mnt: Path):
    """A file copied up lazily is not all in the upper file yet: its opens are served by
    the daemon, and what was not copied reads as the lower data, never as holes."""
    _mount(cli, mnt, "--copy-up", "lazy")
    try:
        blob = mnt / "app-data" / "blob.bin"
        lower = blob.read_bytes()
        mid = len(lower) // 2
        fd = os.open(blob, os.O_RDWR)
        try:
            os.pwrite(fd, b"Z", mid)
            assert not _write_while_stopped(root, cli, fd, b"L")  # the daemon's
            assert os.pread(fd, len(lower), 0) == b"L" + lower[1:mid] + b"Z" + lower[mid + 1:]
        finally:
            os.close(fd)
        assert blob.read_bytes() == b"L" + lower[1:mid] + b"Z" + lower[mid + 1:]
    finally:
        cli("umount", "c1")


def test_io_mode_rules(monkeypatch):
    """``_Passthrough``'s bookkeeping against the kernel's rules, without a mount: a
    node with cached-mode opens gets cached ones; one backing id per node while any
    passthrough open lives, closed after the last; a node that was passed through gets
    no keep_cache in cached mode until the kernel forgets it."""
    from layerstore.fuse import wire

    calls: list[tuple[int, int]] = []

    def ioctl(fd: int, req: int, arg: bytearray) -> int:
        if req == wire.DEV_IOC_BACKING_OPEN:
            calls.append(("open", wire.BACKING_MAP.unpack(arg)[0]))
            return 7
        calls.append(("close", int.from_bytes(arg, "little")))
        return 0

    monkeypatch.setattr(wire.fcntl, "ioctl", ioctl)
    pt = wire._Passthrough(-1)
    pt.enabled = True

    def out(nodeid: int, fh: int, backing: bool = True) -> tuple[int, int]:
        fi = wire.FileInfo(fh=fh, keep_cache=True,
                           backing=(lambda: 100 + fh) if backing else None)
        _, flags, backing_id = wire.OPEN_OUT.unpack(pt.open_out(nodeid, fi))
        return flags, backing_id

    cached = wire.FOPEN_KEEP_CACHE
    assert out(5, 1, backing=False) == (cached, 0)          # a lower file: page cache
    assert out(5, 2) == (cached, 0)                         # not while 1 is open
    pt.released(1)
    pt.released(2)
    assert out(5, 3) == (wire.FOPEN_PASSTHROUGH, 7)         # now it may
    assert out(5, 4, backing=False) == (wire.FOPEN_PASSTHROUGH, 7)  # the kernel insists
    assert calls == [("open", 103)]
    pt.released(3)
    assert calls == [("open", 103)]
    pt.released(4)
    assert calls == [("open", 103), ("close", 7)]
    assert out(5, 6, backing=False) == (0, 0)               # its page cache is old
    pt.released(6)
    pt.forgotten([5])
    assert out(5, 8, backing=False) == (cached, 0)
    pt.released(8)
    pt.released(99)  # unknown handles are ignored
    assert not pt.fhs and not pt.nodes and not pt.cached
    # turned off (the kernel refused one): nodes still passed through keep their rules
    assert out(5, 10) == (wire.FOPEN_PASSTHROUGH, 7)
    pt.enabled = False
    assert out(5, 11) == (wire.FOPEN_PASSTHROUGH, 7)
    assert out(6, 12) == (cached, 0)
    pt.released(10)
    pt.released(11)
    pt.released(12)
    pt.enabled = True
    # a read-only copy of a lower file's data (the store's file cache): no passthrough
    # begins while an open that may write is being made; while one is open, such an
    # open (or a truncate) is refused before the overlay copies anything up
    copy = os.open("/dev/null", os.O_RDONLY)
    try:
        def lower(fh: int) -> wire.FileInfo:
            return wire.FileInfo(fh=fh, keep_cache=True, backing=lambda: copy,
                                 lower_data=True)

        with pt.writer(9):
            _, flags, _ = wire.OPEN_OUT.unpack(pt.open_out(9, lower(20)))
            assert flags == cached
        pt.released(20)
        assert not pt.writers
        _, flags, bid = wire.OPEN_OUT.unpack(pt.open_out(9, lower(21)))
        assert (flags, bid) == (wire.FOPEN_PASSTHROUGH, 7)
        with pytest.raises(wire.FUSEError) as exc, pt.writer(9):  # after WRITER_WAIT
            pass
        assert exc.value.errno == errno.ETXTBSY
        with pt.writer(5):  # other nodes are not concerned
            pass
        pt.released(21)
        with pt.writer(9):  # the copy's last reader gone
            pass
        # the last reader's RELEASE comes after its close returned: a writer waits for
        # it (up to WRITER_WAIT), then gets in
        _, flags, bid = wire.OPEN_OUT.unpack(pt.open_out(9, lower(22)))
        assert flags == wire.FOPEN_PASSTHROUGH
        late = threading.Timer(0.05, pt.released, (22,))
        late.start()
        t0 = time.monotonic()
        with pt.writer(9):
            assert 0.03 < time.monotonic() - t0 < wire.WRITER_WAIT
        late.join()
        # while a writer waits, new readers wait too: readers that keep coming do not
        # shut it out
        _, flags, _ = wire.OPEN_OUT.unpack(pt.open_out(13, lower(30)))
        assert flags == wire.FOPEN_PASSTHROUGH
        got_in: list[float] = []

        def write() -> None:
            with pt.writer(13):
                got_in.append(time.monotonic())

        w = threading.Thread(target=write)
        t0 = time.monotonic()
        w.start()
        while 13 not in pt.waiting:
            time.sleep(0.001)
        late = threading.Timer(0.05, pt.released, (30,))
        late.start()
        pt.writer_first(13)  # a new reader of node 13
        waited = time.monotonic() - t0
        w.join()
        late.join()
        assert got_in and got_in[0] - t0 >= 0.04 and waited >= 0.04 and not pt.waiting
        # a copy the kernel refuses (ELOOP: a stacked file system) stops lower copies
        # only; upper files are still passed through
        def refuse(fd: int, req: int, arg: bytearray) -> int:
            if req == wire.DEV_IOC_BACKING_OPEN and wire.BACKING_MAP.unpack(arg)[0] == copy:
                raise OSError(errno.ELOOP, "stacked")
            return ioctl(fd, req, arg)

        monkeypatch.setattr(wire.fcntl, "ioctl", refuse)
        off: list[bool] = []
        pt.lower_off = lambda: off.append(True)
        _, flags, _ = wire.OPEN_OUT.unpack(pt.open_out(12, lower(23)))
        assert flags == cached and not pt.lower_enabled and pt.enabled and off == [True]
        pt.released(23)
        _, flags, _ = wire.OPEN_OUT.unpack(pt.open_out(12, lower(24)))
        assert flags == cached
        pt.released(24)
        assert out(11, 25) == (wire.FOPEN_PASSTHROUGH, 7)  # an upper file
    finally:
        os.close(copy)


def test_setuid_cleared_on_a_write_to_an_unlinked_file(demo, cli, root: Path, mnt: Path):
    """The empty SETATTR before a passthrough write names no handle: the bits are
    cleared through an open one (the file has no name to go by)."""
    _mount(cli, mnt, "--allow-other")
    try:
        p = _as_user(mnt, "import stat\n"
                          "fd = os.open('tmp/gone', os.O_RDWR | os.O_CREAT, 0o644)\n"
                          "os.fchmod(fd, 0o4755)\n"
                          "os.unlink('tmp/gone')\n"
                          "assert os.write(fd, b'data') == 4\n"
                          "mode = stat.S_IMODE(os.fstat(fd).st_mode)\n"
                          "assert mode == 0o755, oct(mode)\n"
                          "assert os.pread(fd, 4, 0) == b'data'\n")
        assert p.returncode == 0, p.stderr
    finally:
        cli("umount", "c1")
