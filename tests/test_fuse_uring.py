"""FUSE over io_uring (``layerstore/fuse/uring.py``): when the kernel allows it
(``/sys/module/fuse/parameters/enable_uring``, kernel 6.14+), the mount serves its
requests through one io_uring queue per CPU, each served by a thread pinned to that
CPU; otherwise, and with ``LAYERSTORE_FUSE_URING=0``, through ``/dev/fuse``. Over
io_uring the mount passes the same tests as over ``/dev/fuse``: every operation through
the CLI mount, and the kernel-overlayfs comparison in both copy-up modes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest
import test_mount_rw as rw

from layerstore.fuse import uring

PARAM = Path(uring.ENABLE_PARAM)
pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
    pytest.mark.skipif(not PARAM.exists(),
                       reason="the kernel has no FUSE over io_uring (6.14+)"),
]


@pytest.fixture
def enable_uring():
    """Set the kernel's ``enable_uring`` (as given), and put it back afterwards."""
    before = PARAM.read_text().strip()

    def set_(on: bool) -> None:
        PARAM.write_text("Y" if on else "N")

    yield set_
    PARAM.write_text(before)


def daemon_pid(cli, name: str) -> int:
    cdir = rw.upper_of(cli, name).parent
    return int(json.loads((cdir / "mount.json").read_text())["pid"])


def uring_threads(pid: int) -> dict[str, set[int]]:
    """The daemon's io_uring queue threads: name -> the CPUs it may run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        if name.startswith("fuse-uring-"):
            out[name] = os.sched_getaffinity(int(tid))
    return out


def test_requests_go_over_one_pinned_queue_per_cpu(demo, cli, mnt: Path, enable_uring,
                                                   monkeypatch):
    enable_uring(True)
    # every read of blob.bin through the daemon (a second open would be passed through
    # to the store's file cache)
    monkeypatch.setenv("LAYERSTORE_FILE_CACHE", "0")
    cli("create", "demo:app", "--name", "u1")
    cli("mount", "u1", mnt, "--debug", timeout=rw.MOUNT_TIMEOUT)
    try:
        threads = uring_threads(daemon_pid(cli, "u1"))
        cpus = uring.possible_cpus()
        assert threads == {f"fuse-uring-{q}": {q} for q in range(cpus)}
        # requests from each CPU: each reaches its own queue; a lower file of 2 MiB read
        # in 1 MiB READs (helper threads answer those)
        blob = {}
        for cpu in range(cpus):
            os.sched_setaffinity(0, {cpu})
            (mnt / f"etc/from-cpu-{cpu}").write_bytes(b"x" * 5000)
            assert (mnt / f"etc/from-cpu-{cpu}").read_bytes() == b"x" * 5000
            with open(mnt / "app-data/blob.bin", "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                blob[cpu] = hashlib.sha256(f.read()).hexdigest()
            # after a streaming reader, the queue's thread is pinned again at its next
            # small request (``STREAM_HOLD`` later)
            time.sleep(5 * uring.STREAM_HOLD)
            (mnt / f"etc/after-reading-{cpu}").write_bytes(b"z")  # a LOOKUP and a CREATE
            assert uring_threads(daemon_pid(cli, "u1"))[f"fuse-uring-{cpu}"] == {cpu}
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        cli("umount", mnt)
    log = (rw.upper_of(cli, "u1").parent / "daemon.log").read_text()
    served = set(re.findall(r"io_uring queue (\d+): first request", log))
    assert served == {str(q) for q in range(cpus)}, log[-2000:]
    assert re.search(r"io_uring queue \d+: first large READ, to a helper", log), log[-2000:]
    for q in range(cpus):  # while the reader streamed, its queue ran on any CPU
        assert f"io_uring queue {q}: unpinned for a streaming reader" in log, log[-2000:]
        assert f"io_uring queue {q}: pinned again" in log, log[-2000:]
    # the same bytes as through /dev/fuse
    enable_uring(False)
    rw.mount(cli, "u1", mnt)
    try:
        assert uring_threads(daemon_pid(cli, "u1")) == {}
        with open(mnt / "app-data/blob.bin", "rb") as f:
            want = hashlib.sha256(f.read()).hexdigest()
    finally:
        cli("umount", mnt)
    assert set(blob.values()) == {want}


@pytest.mark.parametrize("how", ["kernel-off", "env-off"])
def test_dev_fuse_when_io_uring_is_off(demo, cli, mnt: Path, enable_uring, monkeypatch,
                                       how: str):
    enable_uring(how == "env-off")
    if how == "env-off":
        monkeypatch.setenv("LAYERSTORE_FUSE_URING", "0")
    cli("create", "demo:app", "--name", "u2")
    rw.mount(cli, "u2", mnt)
    try:
        assert uring_threads(daemon_pid(cli, "u2")) == {}
        (mnt / "etc/new").write_bytes(b"y")
        assert (mnt / "etc/new").read_bytes() == b"y"
    finally:
        cli("umount", mnt)


def test_operations_over_io_uring(demo, cli, root: Path, mnt: Path, enable_uring):
    enable_uring(True)
    rw.test_operations_through_the_mount(demo, cli, root, mnt)


@pytest.mark.parametrize("copy_up,metacopy", [("full", "off"), ("meta", "on")])
def test_same_as_kernel_overlayfs_over_io_uring(demo, cli, root: Path, mnt: Path,
                                                tmp_path: Path, enable_uring, copy_up: str,
                                                metacopy: str):
    enable_uring(True)
    rw.test_same_as_kernel_overlayfs_through_fuse(demo, cli, root, mnt, tmp_path, copy_up,
                                                  metacopy)


@pytest.mark.parametrize("which", ["refused", "readers"])
def test_writers_and_readers_of_a_lower_copy_over_io_uring(demo, cli, root: Path, mnt: Path,
                                                           enable_uring, which: str):
    """The file cache's writer rules over io_uring (``test_file_cache``): an open for
    writing that waits for the readers of a lower file's copy to close gets their
    RELEASEs, which come through the same queue (the queue's thread hands such an OPEN
    to a helper: before, it waited there for 0.2 s and was refused with ETXTBSY)."""
    import test_file_cache as fc

    enable_uring(True)
    if which == "refused":
        fc.test_a_copy_up_while_the_copy_is_read_is_refused(demo, cli, root, mnt)
    else:
        fc.test_readers_that_keep_coming_do_not_shut_a_writer_out(demo, cli, root, mnt)


@pytest.mark.parametrize("readers", [3, 5])
def test_a_writer_is_not_shut_out_when_readers_fill_the_queue(demo, cli, root: Path,
                                                              mnt: Path, enable_uring,
                                                              readers: int):
    """One CPU, one queue of four entries: an open for writing waits (in a helper) for
    the last reader of a lower file's copy to close, while ``readers`` new readers
    come and wait for it. Those may hold only all but one entry, so the RELEASE it
    waits for still comes in (a review found: with three readers every entry was
    held, and the writer got ETXTBSY every time)."""
    import errno
    import threading

    import test_file_cache as fc

    enable_uring(True)
    os.sched_setaffinity(0, {0})
    try:
        with fc._mounted(cli, mnt):
            blob = mnt / fc.BLOB
            fc._wait_cached(root, blob.read_bytes())
            results = []
            for _ in range(3):  # (a busy machine: a reader may miss the writer's window)
                holder = fc._retry(lambda: fc._opened_and_passed_through(root, cli, "c1",
                                                                         blob))
                got: dict = {}

                def writer(got: dict = got) -> None:
                    try:
                        os.close(os.open(blob, os.O_RDWR))
                        got["w"] = "ok"
                    except OSError as exc:
                        got["w"] = errno.errorcode[exc.errno]

                def reader(i: int, got: dict = got) -> None:
                    with open(blob, "rb") as f:
                        got[i] = len(f.read(10))

                w = threading.Thread(target=writer)
                w.start()
                time.sleep(0.03)
                rs = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
                for t in rs:
                    t.start()
                time.sleep(0.03)
                holder.close()
                for t in (w, *rs):
                    t.join(30)
                assert all(got.get(i) == 10 for i in range(readers)), got
                results.append(got["w"])
                if got["w"] == "ok":
                    break
            assert results[-1] == "ok", results
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
