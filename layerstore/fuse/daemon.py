"""Mounting: the daemon process, its readiness handshake, and unmounting.

``mount()`` checks the mountpoint, then forks (``spawn``). The child starts a new session,
opens the store itself (LMDB must never be used across a fork, so the parent closes its
store first), takes the container's lock (one daemon per container), and runs FUSE in the
foreground of its own process (``serve_fuse``, which also locks the upper directory: one
daemon per upper). When libfuse calls ``init`` the mount is live and the child writes
``ok`` on a pipe; an error before that is written on the same pipe. The parent returns
(or raises with the daemon's error) only then. ``layerstore-overlay`` (``compat.py``)
starts its daemon through the same ``spawn`` and ``serve_fuse``.

Each live mount has a state file ``ROOT/containers/<id>/mount.json`` (pid, mountpoint)
that ``umount`` uses to find and wait for the daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LayerstoreError, MountError, StoreError, UsageError

log = logging.getLogger("layerstore.fuse.daemon")

if TYPE_CHECKING:
    from ..overlay.lower import MergedLowers

READY_TIMEOUT = 60.0
STATE_FILE = "mount.json"
LOCK_FILE = "lock"


def check_mountpoint(mountpoint: Path, *, allow_nonempty: bool = False) -> Path:
    mp = mountpoint.absolute()
    if not mp.exists():
        raise UsageError(f"mountpoint {mp} does not exist")
    if not mp.is_dir():
        raise UsageError(f"mountpoint {mp} is not a directory")
    if os.path.ismount(mp) or is_mounted(mp):
        raise UsageError(f"{mp} is already a mount point")
    if not allow_nonempty and any(mp.iterdir()):
        raise UsageError(f"mountpoint {mp} is not empty")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing (load the fuse module: modprobe fuse)")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        raise MountError(f"cannot open /dev/fuse: {exc.strerror}") from None
    return mp


def is_mounted(mp: Path) -> bool:
    target = str(mp).encode().replace(b" ", b"\\040")
    try:
        with open("/proc/self/mounts", "rb") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 1)
    except OSError:
        return False


def container_dir(root: Path, cid: str) -> Path:
    return root / "containers" / cid


def read_state(root: Path, cid: str) -> dict[str, Any] | None:
    try:
        return json.loads((container_dir(root, cid) / STATE_FILE).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def mount(root: Path, cid: str, diff_ids: list[str], mountpoint: Path, *, read_only: bool,
          foreground: bool = False, allow_other: bool = False, debug: bool = False,
          copy_up: str = "meta") -> int:
    """Mount container ``cid`` at ``mountpoint``; returns the daemon's pid (0 when
    ``foreground``, after the mount ends). ``copy_up``: ``meta``, ``full`` or ``lazy``
    (see ``overlay/fs.py``)."""
    mp = check_mountpoint(mountpoint)
    cdir = container_dir(root, cid)
    if not cdir.is_dir():
        raise StoreError(f"container directory {cdir} is missing")

    def serve(ready: Callable[[], None]) -> None:
        _serve_container(root, cid, diff_ids, mp, read_only, allow_other, debug, copy_up, ready)

    pid = spawn(serve, mp, foreground=foreground, log=cdir / "daemon.log")
    if pid:
        _raise_readahead(mp)
    return pid


def spawn(serve: Callable[[Callable[[], None]], None], mp: Path, *, foreground: bool,
          log: Path | None) -> int:
    """Run ``serve(ready)`` in a daemon process and return its pid once ``serve`` has
    called ``ready()`` (the mount is live), or raise ``MountError`` with the daemon's
    error, leaving nothing mounted. The daemon starts a new session in ``/``, with its
    stdout and stderr in ``log`` (None: nowhere). With ``foreground``, ``serve`` runs in
    this process and 0 is returned when it returns (after the unmount).

    ``layerstore mount`` and ``layerstore-overlay`` (``compat.py``) both start their
    daemons here."""
    if foreground:
        serve(lambda: None)
        return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        code = 1
        pipe_open = True

        def ready() -> None:
            nonlocal pipe_open
            os.write(w, b"ok\n")
            os.close(w)
            pipe_open = False

        try:
            os.setsid()
            os.chdir("/")
            devnull = os.open(os.devnull, os.O_RDWR)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log else devnull
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            serve(ready)
            code = 0
        except BaseException as exc:  # report, never return into the CLI's code
            msg = str(exc) if isinstance(exc, LayerstoreError) else f"{type(exc).__name__}: {exc}"
            if pipe_open:  # (once closed, its fd number may name another file)
                try:
                    os.write(w, f"error: {msg}\n".encode())
                except OSError:
                    pass
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while time.monotonic() < deadline:
        chunk = _read_with_timeout(r, deadline - time.monotonic())
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    os.close(r)
    text = data.decode(errors="replace").strip()
    if text == "ok":
        return pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    if is_mounted(mp):
        _unmount(mp, lazy=True)
    if text.startswith("error: "):
        raise MountError(text[len("error: "):])
    raise MountError("the mount daemon did not start" + (f" (see {log})" if log else ""))


#: the kernel's readahead for a container mount (KiB): the default, 128 KiB, makes a
#: sequential read one 128 KiB FUSE request at a time; 1 MiB (the mount's max_read) read
#: a cold 256 MiB file at 450-580 MB/s against 340-370 (benchmarks/README.md)
READ_AHEAD_KB = 1024


def _raise_readahead(mp: Path) -> None:
    """Set the FUSE connection's readahead (``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb``,
    the device of ``mp`` from /proc/self/mountinfo). Only once the mount is initialised:
    the kernel lowers it to what the daemon's INIT reply says (libfuse answers with the
    kernel's offer, 128 KiB), so the stat waits for that first. Root only; best effort."""
    try:
        os.stat(mp)
        with open("/proc/self/mountinfo") as f:
            devs = [line.split()[2] for line in f if line.split()[4] == str(mp)]
        if devs:
            with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
                f.write(str(READ_AHEAD_KB))
    except (OSError, IndexError):
        pass


def _read_with_timeout(fd: int, timeout: float) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    return os.read(fd, 4096) if ready else b""


def _serve_container(root: Path, cid: str, diff_ids: list[str], mp: Path, read_only: bool,
                     allow_other: bool, debug: bool, copy_up: str,
                     ready: Callable[[], None]) -> None:
    from ..overlay.lower import MergedLowers, StoreLayers
    from ..store import Store

    cdir = container_dir(root, cid)
    lock_fd = os.open(cdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        st = read_state(root, cid) or {}
        raise MountError(f"container is already mounted at {st.get('mountpoint', '?')}") from None
    store = Store.open(root)  # opened here, after the fork
    state = cdir / STATE_FILE

    def on_ready() -> None:
        tmp = cdir / (STATE_FILE + ".tmp")
        from .binding import NAME
        tmp.write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(mp),
                                   "read_only": read_only, "copy_up": copy_up,
                                   "fuse": NAME}))
        os.rename(tmp, state)
        ready()

    view = None
    try:
        view = MergedLowers(StoreLayers(store, diff_ids))
        serve_fuse(view, mp, upper=None if read_only else cdir / "upper", work=cdir / "work",
                   on_ready=on_ready, fsname=f"layerstore:{cid[:12]}", subtype="layerstore",
                   allow_other=allow_other, debug=debug, log=cdir / "daemon.log",
                   copy_up=copy_up)
    finally:
        try:
            state.unlink()
        except FileNotFoundError:
            pass
        if view is None or view.closed_quietly:
            store.close()  # (else a copy still reads the map: the exit closes it)


def serve_fuse(view: MergedLowers, mp: Path, *, upper: Path | None, work: Path | None,
               on_ready: Callable[[], None], fsname: str, subtype: str,
               allow_other: bool = False, debug: bool = False,
               extra: dict[str, Any] | None = None, log: Path | None = None,
               copy_up: str = "full") -> None:
    """Serve ``view`` at ``mp`` through FUSE until it is unmounted: writable
    (``OverlayFS`` over ``upper`` and ``work``, the upper locked against a second daemon)
    or, without ``upper``, the lowers alone, read-only. ``extra``: more libfuse options
    (they win)."""
    from .binding import LOWLEVEL
    from .operations import MAX_READ

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _raise_nofile()
    options: dict[str, Any] = dict(
        foreground=True, use_ino=True, default_permissions=True,
        fsname=fsname, subtype=subtype, max_read=MAX_READ,
    )
    def live() -> None:
        _freeze_startup_objects()
        on_ready()

    with _serving(view, mp, upper, work, copy_up, log) as fs:
        if LOWLEVEL:  # pyfuse3: the adapter itself sets caching per entry and per open file
            _serve_lowlevel(view, fs, mp, on_ready=live, debug=debug,
                            options={**options, "allow_other": allow_other, **(extra or {})})
        else:
            _serve_highlevel(view, fs, mp, live, options, allow_other, extra)


def _freeze_startup_objects() -> None:
    """Once the mount is live: leave what the daemon has made so far (modules, the
    store, the warm-up's caches) out of Python's cyclic garbage collector
    (``gc.freeze``). A full collection walks every tracked object, and in a fresh
    daemon one came during the first big copy-up (its records' 7,000+ tuples filled the
    young generations): 18-20 ms of a 256 MiB copy-up in about two runs of five of the
    suite, which made the warm copy-up's medians bimodal. Collections of what requests
    make afterwards go on as before."""
    gc.freeze()
    log.debug("the mount is live: %d objects left out of the garbage collector",
              gc.get_freeze_count())


def _raise_nofile() -> None:
    """As many open files as the hard limit allows (fuse-overlayfs does the same): every
    file open in the container is one here, and walks keep directories open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve_highlevel(view: MergedLowers, fs: Any, mp: Path, on_ready: Callable[[], None],
                     options: dict[str, Any], allow_other: bool,
                     extra: dict[str, Any] | None) -> None:
    """``serve_fuse`` on the high-level binding (``binding.FUSE``, ``operations.py``)."""
    from .binding import FUSE, FUSE_MAJOR
    from .operations import ENCODING, MAX_WRITE, Operations, ReadOnlyOperations

    ops: Any
    if fs is None:
        ops = ReadOnlyOperations(view, on_ready=on_ready)
        # nothing ever changes: cache data, attributes and names for long
        options.update(ro=True, kernel_cache=True, attr_timeout=86400, entry_timeout=86400,
                       negative_timeout=86400)
    else:
        ops = Operations(fs, on_ready=on_ready)
        # Writable. Names and attributes change only through this mount, and the kernel
        # updates or drops what it caches on our own create/unlink/rename/setattr/write,
        # so it may cache both for long, like the read-only mount, except for one case:
        # libfuse's high-level API gives each name of a hard link its own kernel inode,
        # so a change through one name would leave the others' attributes stale. On
        # libfuse3, Operations tells the kernel to drop those (fuse_invalidate_path);
        # libfuse2 has no way to, so there attributes are not cached and names for 1 s.
        # auto_cache keeps a file's page cache across opens while its mtime and size
        # are unchanged. No hard_remove: an unlinked open file keeps a hidden name so
        # fstat works (Operations translates it; nothing reaches the upper).
        if FUSE_MAJOR == 3:
            options.update(auto_cache=True, attr_timeout=86400, entry_timeout=86400,
                           negative_timeout=86400)
        else:
            options.update(auto_cache=True, attr_timeout=0, entry_timeout=1, negative_timeout=0,
                           big_writes=True, max_write=MAX_WRITE)
    if allow_other:
        options["allow_other"] = True
    options.update(extra or {})
    if FUSE_MAJOR == 3:  # always so on libfuse3, which refuses the options
        for key in ("big_writes", "nonempty", "max_write"):  # max_write: set at init
            options.pop(key, None)
    FUSE(ops, str(mp), encoding=ENCODING, **options)


@contextlib.contextmanager
def _serving(view: MergedLowers, mp: Path, upper: Path | None, work: Path | None,
             copy_up: str, log: Path | None) -> Iterator[Any]:
    """While a mount is served: the writable overlay (``OverlayFS`` over ``upper``, which
    stays locked against a second daemon), or None for a read-only mount; a binding's
    RuntimeError becomes a MountError naming the log."""
    from ..overlay.fs import OverlayFS

    if upper is None:
        fs = None
        lock = -1
    else:
        assert work is not None
        lock = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # kills earlier daemons' half-done copy-ups left in work (see OverlayFS)
            fs = OverlayFS(view, upper, work, copy_up)
        except BlockingIOError:
            os.close(lock)
            raise MountError(f"upper directory {upper} is in use by another mount") from None
        except BaseException:
            os.close(lock)
            raise
    _warm_up(view, fs)
    try:
        yield fs
    except RuntimeError as exc:
        hint = f"; see {log}" if log else ""
        raise MountError(f"mounting {mp} failed ({exc}{hint})") from None
    finally:
        if fs is not None:
            fs.close()
        if lock >= 0:
            os.close(lock)
        view.close()  # waits for the file cache's filler (``store.filecache``)


def _warm_up(view: MergedLowers, fs: Any) -> None:
    """List the root directory before the mount goes live: the first request after a
    mount otherwise pays the first use of everything it touches (LMDB's first
    transactions, the first lookups; in process, a first ``getattr`` of a lower
    directory took 210-240 us, one after this 25-30 us), and the root's entries are
    what any use of a container reaches first. Costs a few ms of the mount's time."""
    try:
        store = getattr(view.layers, "store", None)
        if store is not None:
            store.env.locate_map()  # what every copy-up out of the store looks at first
        if fs is not None:
            entries = fs.readdir(b"/")
            # and what a first metadata change asks for: a lookup below the root, and
            # the kernel's security.capability check (chown through a fresh mount:
            # LOOKUP, LOOKUP, GETXATTR, SETATTR)
            for name, _ in entries[:1]:
                fs.getattr(b"/" + name)
                with contextlib.suppress(OSError):
                    fs.getxattr(b"/" + name, b"security.capability")
        else:
            view.listdir(b"/")
    except Exception:  # noqa: BLE001 - a warm-up only: the mount reports what is wrong
        pass  # when it is used (an unreadable store is EIO there, not a failed mount)


def _serve_lowlevel(view: MergedLowers, fs: Any, mp: Path, *, on_ready: Callable[[], None],
                    options: dict[str, Any], debug: bool) -> None:
    """``serve_fuse`` on ``lowlevel.py`` (over wire.py, the default, or pyfuse3).
    Entries, attributes and negative lookups are cached for a day and open files keep
    their page cache: the kernel has one inode per file (hard links share it) and every
    change goes through the mount."""
    from .lowlevel import LowLevelOperations, ReadOnlyLowLevelOperations, serve

    # no max_read: libfuse3 wants it set again at init, which pyfuse3 does not do (reads
    # are as large as the kernel makes them: up to 1 MiB, like writes)
    options = dict(options)
    options.pop("max_read", None)
    ops: Any
    if fs is None:
        options["ro"] = True
        ops = ReadOnlyLowLevelOperations(view, on_ready=on_ready)
    else:
        ops = LowLevelOperations(fs, on_ready=on_ready)
    serve(ops, str(mp), options, debug)


def _unmount(mp: Path, lazy: bool = False) -> None:
    for cmd in (["fusermount3", "-u"] + (["-z"] if lazy else []),
                ["fusermount", "-u"] + (["-z"] if lazy else []),
                ["umount"] + (["-l"] if lazy else [])):
        if shutil.which(cmd[0]) is None:
            continue
        p = subprocess.run(cmd + [str(mp)], capture_output=True, text=True)
        if p.returncode == 0:
            return
    if is_mounted(mp):
        raise MountError(f"cannot unmount {mp}")


def umount(root: Path, cid: str, mountpoint: Path | None, timeout: float = 30.0) -> None:
    """Unmount and wait for the daemon; also cleans up after a daemon that died."""
    st = read_state(root, cid)
    mp = Path(mountpoint or (st or {}).get("mountpoint", "")).absolute() if (mountpoint or st) else None
    if mp is None:
        raise UsageError("the container is not mounted")
    pid = (st or {}).get("pid")
    if pid and _proc_state(pid) in (b"T", b"t"):  # left paused by a commit that was killed
        os.kill(pid, signal.SIGCONT)
    if is_mounted(mp):
        try:
            _unmount(mp)
        except MountError:
            _unmount(mp, lazy=True)  # busy, or its daemon died (ENOTCONN)
    elif st is None:
        raise UsageError(f"{mp} is not mounted")
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            break
        if _is_zombie(pid):  # exited; its parent (often init, when the CLI is gone) reaps it later
            break
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.05)
    else:
        if pid:
            raise MountError(f"the mount daemon (pid {pid}) did not exit")
    try:
        (container_dir(root, cid) / STATE_FILE).unlink()
    except FileNotFoundError:
        pass


def _proc_state(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0]  # type: ignore[no-any-return]
    except (OSError, IndexError):
        return b""


@contextlib.contextmanager
def paused(root: Path, cid: str, timeout: float = 10.0) -> Iterator[bool]:
    """While the block runs, the daemon serving container ``cid`` (if it is mounted) is
    stopped (SIGSTOP, then SIGCONT, also on error): every call into the mount waits, as
    ``docker commit`` pauses a container, so the upper does not change under a reader.
    Each overlay operation leaves the upper consistent at every step (copy-ups are
    renamed into place, a metacopy file keeps its mark until its data is complete), so
    wherever the daemon stops, the upper is a state the container has seen. Yields
    whether a daemon was paused."""
    st = read_state(root, cid) or {}
    pid = st.get("pid")
    if not pid or _proc_state(pid) in (b"", b"Z"):
        yield False
        return
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while _proc_state(pid) not in (b"T", b"t", b"", b"Z"):  # every thread stopped
            if time.monotonic() > deadline:
                raise MountError(f"the daemon of container {cid[:12]} did not pause")
            time.sleep(0.001)
        yield True
    finally:
        os.kill(pid, signal.SIGCONT)


def _is_zombie(pid: int) -> bool:
    return _proc_state(pid) == b"Z"


def mounted_containers(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    cdir = root / "containers"
    if cdir.is_dir():
        for p in cdir.iterdir():
            st = read_state(root, p.name)
            if st is not None:
                out[p.name] = st
    return out


__all__ = ["mount", "mounted_containers", "serve_fuse", "spawn", "umount"]
