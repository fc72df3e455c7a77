"""The store's file cache (``store/filecache.py``) and FUSE passthrough of lower files.

A lower file of 1 MiB or more that a mount opens is copied whole into
``ROOT/cache/files`` by the daemon's filler thread; later opens of it (in any mount of
the store) are passed through to that copy, so the kernel reads it without the daemon.
What must hold:

- a copy is linked under its name only whole, hashed again and synced; a failed or
  killed fill leaves nothing; the budget keeps the least recently opened files;
- through the mount (rw and read-only): the first read goes through the daemon, the
  next open is read by the kernel alone (reads go on while the daemon is stopped), and
  ``LAYERSTORE_FILE_CACHE=0`` turns it off;
- an open that would copy the file up while a reader holds the copy is refused with
  ETXTBSY; the copy is never written; once the readers are gone the write works;
- ``check`` re-hashes the cache, ``gc`` drops copies no layer has any more and
  ``gc --drop-file-cache`` empties it;
- a copy-up of a file that has a copy reads the copy, not the chunks.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3
import pytest
import test_mount_rw as rw

from layerstore.overlay.lower import MergedLowers, StoreLayers
from layerstore.store import Store
from layerstore.store.filecache import FileCache, cache_dir, parse_budget
from layerstore.store.images import resolve

MiB = 1 << 20
BLOB = "app-data/blob.bin"
SMALL = "etc/os-release"


def _digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def _writer(data: bytes):
    return lambda fd: os.pwrite(fd, data, 0)


# --- the cache itself (no mount) -------------------------------------------------------


def test_fill_open_budget_sweep_verify(tmp_path: Path):
    fc = FileCache(tmp_path, budget=5 * MiB // 2)
    a = os.urandom(2 * MiB - 5)
    da = _digest(a)
    assert fc.open(da, len(a)) is None
    assert fc.fill(da, len(a), _writer(a))
    assert not fc.fill(da, len(a), _writer(a))  # there already
    fd = fc.open(da, len(a))
    assert fd is not None
    try:
        assert os.pread(fd, len(a) + 1, 0) == a
        assert os.fstat(fd).st_mode & 0o777 == 0o444
    finally:
        os.close(fd)
    assert fc.open(da, len(a) + 1) is None  # another size: not this content
    # a copy that does not match its digest, or a writer that fails, links nothing
    b = os.urandom(MiB + 3)
    with pytest.raises(OSError, match="does not match"):
        fc.fill(_digest(b), len(b), _writer(b[:-1] + b"x"))
    with pytest.raises(ZeroDivisionError):
        fc.fill(_digest(b), len(b), lambda fd: 1 / 0)
    assert [p.name for p, _ in fc.entries()] == [da.hex()]
    assert not [p for p in cache_dir(tmp_path).rglob("*") if p.is_file()
                and p.name != da.hex()]
    # over the budget: the least recently opened copy goes
    old = time.time_ns() - 3600 * 10**9
    os.utime(fc.path(da), ns=(old, old))
    assert fc.fill(_digest(b), len(b), _writer(b))
    assert [p.name for p, _ in fc.entries()] == [_digest(b).hex()]
    assert fc.usage() == (1, len(b))
    # check's re-hash finds a changed copy
    assert fc.verify() == []
    p = fc.path(_digest(b))
    p.chmod(0o644)
    with open(p, "r+b") as f:
        f.write(b"!")
    assert len(fc.verify()) == 1
    # sweep: what ``live`` calls dead, then everything
    assert fc.sweep(lambda d: True) == (0, 0)
    assert fc.sweep() == (1, len(b))
    assert fc.usage() == (0, 0)


def test_filler_thread_and_off(tmp_path: Path):
    fc = FileCache(tmp_path, budget=8 * MiB)
    data = os.urandom(MiB)
    fc.want(_digest(data), len(data), _writer(data))
    assert fc.close()  # waits for the copy asked for
    assert fc.usage() == (1, MiB)
    off = FileCache(tmp_path / "off", budget=0)
    assert not off.enabled
    off.want(_digest(data), len(data), _writer(data))
    off.close()
    assert off.usage() == (0, 0)


def test_budget_values():
    assert parse_budget("8G") == 8 << 30
    assert parse_budget("512MiB") == 512 << 20
    assert parse_budget("1.5g") == 3 << 29
    assert parse_budget("0") == 0 and parse_budget("off") == 0
    assert parse_budget("4096") == 4096
    with pytest.raises(ValueError):
        parse_budget("lots")


# --- through the mount -----------------------------------------------------------------

def _pid(root: Path, cli, name: str) -> int:
    cid = next(c for c in json.loads(cli("ps", "--json").stdout) if c["name"] == name)["id"]
    return int(json.loads((root / "containers" / cid / "mount.json").read_text())["pid"])


def _wait_cached(root: Path, data: bytes, timeout: float = 30) -> Path:
    p = FileCache(root).path(_digest(data))
    end = time.monotonic() + timeout
    while not p.exists():
        assert time.monotonic() < end, "the file cache never got the file"
        time.sleep(0.05)
    return p


def _read_while_stopped(root: Path, cli, name: str, fd: int) -> bytes | None:
    """Read all of open file ``fd`` in a thread while the daemon is stopped (SIGSTOP),
    none of it from the page cache of the mount; the bytes if that finished within 2 s,
    else None. The daemon is continued whatever
    happens."""
    pid = _pid(root, cli, name)
    got: list[bytes] = []
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not from the FUSE page cache

    def io() -> None:
        got.append(os.pread(fd, os.fstat(fd).st_size + 1, 0))

    t = threading.Thread(target=io, daemon=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        t.start()
        t.join(2)
        finished = not t.is_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(30)
    assert not t.is_alive()
    return got[0] if finished else None


def _opened_and_passed_through(root: Path, cli, name: str, path: Path):
    """An open file of ``path`` that the kernel reads without the daemon (ETXTBSY if
    not: the kernel sends an earlier reader's RELEASE after its close returns, and
    until the daemon sees it a new open goes through the page cache)."""
    f = open(path, "rb")  # noqa: SIM115  (handed to the caller)
    try:
        passed = _read_while_stopped(root, cli, name, f.fileno()) is not None
    except BaseException:
        f.close()
        raise
    if not passed:
        f.close()
        raise OSError(errno.ETXTBSY, "not passed through yet")
    return f


def mounting(test):
    """The marks of a test that mounts (root and /dev/fuse)."""
    test = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                              reason="needs root and /dev/fuse")(test)
    return pytest.mark.fuse(test)


@contextmanager
def _mounted(cli, mnt: Path, *args: str, create: bool = True) -> Iterator[Path]:
    """Container c1 of demo:app (made unless ``create`` is False) mounted at ``mnt``
    with ``args``; unmounted at the end."""
    if create:
        cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mnt, *args, timeout=rw.MOUNT_TIMEOUT)
    assert os.path.ismount(mnt)
    try:
        yield mnt
    finally:
        cli("umount", "c1")


def _retry(fn, timeout: float = 10):
    """``fn()`` until it stops raising ETXTBSY (the kernel sends a reader's RELEASE
    after its close returns)."""
    end = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except OSError as exc:
            if exc.errno != errno.ETXTBSY or time.monotonic() > end:
                raise
            time.sleep(0.05)


@mounting
@pytest.mark.parametrize("how", ["rw", "read-only", "off", "no-passthrough"])
def test_lower_file_is_read_by_the_kernel(demo, cli, root: Path, mnt: Path, monkeypatch,
                                          how: str):
    """``off``: no file cache; ``no-passthrough``: the kernel is not asked for
    passthrough, so no copies are made either (nothing could read them but copy-ups)."""
    if how == "off":
        monkeypatch.setenv("LAYERSTORE_FILE_CACHE", "0")
    if how == "no-passthrough":
        monkeypatch.setenv("LAYERSTORE_FUSE_PASSTHROUGH", "0")
    with _mounted(cli, mnt, *(["--read-only"] if how == "read-only" else [])):
        blob = mnt / BLOB
        data = blob.read_bytes()  # through the daemon; asks for the copy
        assert len(data) >= MiB
        if how in ("off", "no-passthrough"):
            time.sleep(1)
            assert FileCache(root).usage() == (0, 0)
            with open(blob, "rb") as f:
                assert _read_while_stopped(root, cli, "c1", f.fileno()) is None
            return
        _wait_cached(root, data)
        # a new open is passed through to the copy: the daemon is not needed to read
        with _retry(lambda: _opened_and_passed_through(root, cli, "c1", blob)) as f:
            assert f.read() == data
        # small lower files stay with the daemon (and its page cache)
        with open(mnt / SMALL, "rb") as f:
            assert _read_while_stopped(root, cli, "c1", f.fileno()) is None
    assert cli("check").returncode == 0


@mounting
def test_a_copy_up_while_the_copy_is_read_is_refused(demo, cli, root: Path, mnt: Path):
    with _mounted(cli, mnt):
        blob = mnt / BLOB
        lower = blob.read_bytes()
        copy = _wait_cached(root, lower)
        with _retry(lambda: _opened_and_passed_through(root, cli, "c1", blob)) as r:
            for flags in (os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
                with pytest.raises(OSError) as exc:
                    os.open(blob, flags)
                assert exc.value.errno == errno.ETXTBSY
            with pytest.raises(OSError) as exc:
                os.truncate(blob, 10)
            assert exc.value.errno == errno.ETXTBSY
            # metadata changes and more readers are fine (the data stays as it is)
            os.chmod(blob, 0o600)
            with open(blob, "rb") as r2:
                assert r2.read() == lower
            assert r.read() == lower
        assert blob.read_bytes() == lower  # (the chmod made a metacopy in the upper)
        # the readers gone, the write goes to the upper (at once: the daemon waits for
        # the last reader's RELEASE, which the kernel sends after close returned); the
        # copy is untouched
        fd = os.open(blob, os.O_RDWR)
        try:
            os.pwrite(fd, b"NEW", 0)
        finally:
            os.close(fd)
        want = b"NEW" + lower[3:]
        assert blob.read_bytes() == want
        assert (rw.upper_of(cli, "c1") / BLOB).read_bytes() == want
        assert copy.read_bytes() == lower
    assert cli("check").returncode == 0


@mounting
def test_check_gc_and_drop(demo, cli, root: Path, mnt: Path):
    with _mounted(cli, mnt):
        data = (mnt / BLOB).read_bytes()
        copy = _wait_cached(root, data)
    assert "file cache" in cli("df").stdout
    assert cli("check").returncode == 0
    # a changed copy is damage check names
    copy.chmod(0o644)
    with open(copy, "r+b") as f:
        f.write(b"!")
    r = cli("check", check=False)
    assert r.returncode != 0 and "file cache" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    cli("gc", "--drop-file-cache")
    assert not copy.exists()
    assert cli("check").returncode == 0
    # gc drops the copies of content no layer has any more
    with _mounted(cli, mnt, create=False):
        (mnt / BLOB).read_bytes()
    assert copy.exists()
    cli("rm", "c1")
    cli("rmi", "demo:app")
    cli("gc")
    assert not copy.exists()


def test_fill_in_a_fork_of_a_process_that_hashed_in_threads(tmp_path: Path):
    """Mount daemons are forks (of ``layerstore bench`` too): a copy made in a fork of a
    process whose blake3 had started its thread pool must not wait for those threads."""
    data = os.urandom(4 * MiB)
    blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()  # the pool starts
    pid = os.fork()
    if pid == 0:  # the child: make the copy, exit 0 if it was made
        code = 2
        try:
            made = FileCache(tmp_path, budget=8 * MiB).fill(_digest(data), len(data),
                                                             _writer(data))
            code = 0 if made else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the copy in the forked process never finished")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert FileCache(tmp_path).usage() == (1, len(data))


def test_copy_up_reads_the_copy(demo, root: Path, tmp_path: Path):
    """A full copy (a copy-up) of a file whose copy is in the cache reads that copy, one
    sequential file, not the chunks: shown by a copy changed behind the cache's back
    (what ``check`` would call damage)."""
    store = Store.open(root)
    try:
        with store.env.read() as txn:
            img = resolve(txn, store.env, "demo:app")
        view = MergedLowers(StoreLayers(store, img.diff_ids))
        node = view.lookup(b"/" + BLOB.encode())
        data = view.read(node, 0, node.entry.size)
        out = tmp_path / "out"

        def copied() -> bytes:
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view.copy_to(node, fd)
            finally:
                os.close(fd)
            return out.read_bytes()

        assert copied() == data  # no copy yet: from the chunks
        fc = FileCache(root)
        assert fc.fill(node.entry.digest, len(data), _writer(data))
        p = fc.path(node.entry.digest)
        p.chmod(0o644)
        with open(p, "r+b") as f:
            f.write(b"COPY")
        assert copied() == b"COPY" + data[4:]
        view.close()
    finally:
        store.close()


@mounting
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05])
def test_a_daemon_killed_while_it_copies_leaves_nothing_half_made(demo, cli, root: Path,
                                                                  mnt: Path, delay: float):
    """SIGKILL to the daemon right after a reader closed a big lower file (its filler
    may be copying it): the cache holds the whole copy or none, and ``check`` calls the
    store clean."""
    with _mounted(cli, mnt):  # (its umount cleans up after the killed daemon)
        data = (mnt / BLOB).read_bytes()
        time.sleep(delay)
        os.kill(_pid(root, cli, "c1"), signal.SIGKILL)
    assert not os.path.ismount(mnt)
    fc = FileCache(root)
    for p, st in fc.entries():
        assert p.name == _digest(data).hex() and st.st_size == len(data)
        assert p.read_bytes() == data
    assert not [p for p in cache_dir(root).rglob("*") if p.is_file()
                and fc.path(_digest(data)) != p]
    assert cli("check").returncode == 0
    # and the next mount still reads it right
    with _mounted(cli, mnt, create=False):
        assert (mnt / BLOB).read_bytes() == data


@mounting
def test_readers_that_keep_coming_do_not_shut_a_writer_out(demo, cli, root: Path,
                                                           mnt: Path):
    """Four threads open, read and close the copied file in a loop; an open for writing
    still gets in (new readers wait while it waits for the open ones to go)."""
    with _mounted(cli, mnt):
        blob = mnt / BLOB
        lower = blob.read_bytes()
        _wait_cached(root, lower)
        with _retry(lambda: _opened_and_passed_through(root, cli, "c1", blob)):
            pass
        stop = threading.Event()
        errors: list[BaseException] = []

        def read() -> None:
            try:
                while not stop.is_set():
                    with open(blob, "rb") as f:
                        f.read(64 << 10)
            except BaseException as exc:  # noqa: BLE001  (reported below)
                errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(4)]
        for t in readers:
            t.start()
        try:
            time.sleep(0.3)
            # (a reader slowed down past WRITER_WAIT on a busy machine: one more try;
            # without the waiting readers the writer stayed out for 20 s and more)
            fd = _retry(lambda: os.open(blob, os.O_WRONLY | os.O_APPEND), timeout=2)
            try:
                os.write(fd, b"END")
            finally:
                os.close(fd)
        finally:
            stop.set()
            for t in readers:
                t.join(30)
        assert not errors, errors
        assert blob.read_bytes() == lower + b"END"


@mounting
def test_prefetch_fills_the_cache_for_a_first_read(demo, cli, root: Path, mnt: Path,
                                                   monkeypatch):
    """``layerstore prefetch IMAGE|CONTAINER`` copies the image's files of 1 MiB or more
    into the file cache at once, so that even the first open through a fresh mount is
    passed through to the kernel; small files stay out, a second run finds the copies,
    a budget too small for a file leaves it out (and says so), and bad input is one
    line and a non-zero exit."""
    import re

    got = cli("prefetch", "demo:app")
    m = re.match(r"copied (\d+) files .* 0 \(0B\) were there", got.stdout)
    assert m and int(m.group(1)) >= 1, got.stdout
    copied, cached = int(m.group(1)), FileCache(root).usage()
    assert cached[0] == copied
    with _mounted(cli, mnt):
        with _retry(lambda: _opened_and_passed_through(root, cli, "c1", mnt / BLOB)) as f:
            assert len(f.read()) >= MiB  # its first open: the kernel reads the copy
        with open(mnt / SMALL, "rb") as f:
            assert _read_while_stopped(root, cli, "c1", f.fileno()) is None
    assert FileCache(root).usage() == cached  # the mount made no other copy
    got = cli("prefetch", "c1")  # a container: its image
    assert got.stdout.startswith("copied 0 files") and f"; {copied} (" in got.stdout, got.stdout
    cli("gc", "--drop-file-cache")
    monkeypatch.setenv("LAYERSTORE_FILE_CACHE", str(MiB - 1))  # less than any such file
    got = cli("prefetch", "demo:app")
    assert "copied 0 files" in got.stdout and "did not fit" in got.stdout, got.stdout
    assert FileCache(root).usage() == (0, 0)
    for args, env, code in ((["nosuch:1"], {}, 5), (["demo:app"], {"LAYERSTORE_FILE_CACHE": "0"}, 2),
                            (["demo:app"], {"LAYERSTORE_FILE_CACHE": "lots"}, 2)):
        monkeypatch.delenv("LAYERSTORE_FILE_CACHE", raising=False)
        got = cli("prefetch", *args, check=False, env=env)
        assert got.returncode == code, (args, env, got.stderr)
        assert len(got.stderr.strip().splitlines()) == 1 and "Traceback" not in got.stderr
    assert cli("check").returncode == 0
