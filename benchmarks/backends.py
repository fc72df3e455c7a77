"""The backends the suite compares: how each one gets a fresh mount over the same lowers.

Every backend shows the same merged tree: the suite's image (two layers, bottom first:
the root filesystem, then the benchmark files) over a writable upper.

- ``dir``: a plain directory holding both layers copied together (the floor). It is one
  persistent tree: each scenario undoes its change afterwards (untimed).
- ``kernel``: kernel overlayfs, ``lowerdir=`` the two layer directories.
- ``fuse-overlayfs``: the Debian package, the same options.
- ``layerstore``: ``layerstore create`` + ``layerstore mount`` of the imported image (full
  copy-up; ``--copy-up full`` when the CLI has the option).
- ``layerstore-meta``: the same with ``--copy-up meta`` (metadata-only copy-up), present
  when ``layerstore mount --help`` lists it.
- ``layerstore-lazy``: the same with ``--copy-up lazy`` (metadata-only copy-up, and the
  first write to a big lower file copies only the blocks it touches).
- ``layerstore-overlay``: the fuse-overlayfs-compatible console script over the same layer
  directories, present when it is on PATH.

The layerstore CLI is called in this process (``layerstore.cli.main.main``: the same code
as the console script, without a Python start-up per mount); the daemon it forks serves
the mount. Every other mount is a subprocess. ``Mounts`` remembers each live mount and
the daemon pids behind it, so ``cleanup()`` can unmount and kill whatever is left, also
after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import common

from layerstore.cli.bench_cmds import BACKENDS


@dataclass
class Data:
    """The suite's data: layer directories (bottom first), the image in the store, the
    plain-directory copy, and where fresh uppers and mountpoints go."""
    layers: list[Path]
    store: Path
    image: str
    plain: Path
    scratch: Path

    @property
    def lowerdir(self) -> str:
        """overlayfs ``lowerdir=`` value: topmost first."""
        return ":".join(str(p) for p in reversed(self.layers))


def is_mounted(mp: Path) -> bool:
    target = str(mp).encode().replace(b" ", b"\\040")
    with open("/proc/self/mounts", "rb") as f:
        return any(len(line.split()) > 1 and line.split()[1] == target for line in f)


def pids_serving(mp: Path, inside: bool = False) -> list[int]:
    """Processes that have ``mp`` as one of their arguments (the daemon of a FUSE mount);
    with ``inside``, also those with an argument below it (a tool working on it)."""
    out = []
    want = str(mp).encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args or (inside and any(want + b"/" in a for a in args)):
            out.append(int(d))
    return out


def kill_leftovers(scratch: Path) -> None:
    """Kill what this run started under ``scratch`` and left behind (a tool interrupted
    in the middle of forking, a daemon): found by the run's own mounts directory (the
    work directory is locked, so no other run uses it)."""
    for pid in pids_serving(scratch, inside=True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def force_unmount(mp: Path) -> None:
    """Unmount ``mp`` whatever it is; lazily when busy; then kill the daemons serving it."""
    pids = pids_serving(mp)
    for cmd in (["umount", str(mp)], ["fusermount3", "-u", "-z", str(mp)],
                ["umount", "-l", str(mp)]):
        if not is_mounted(mp):
            break
        subprocess.run(cmd, capture_output=True)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


class Backend:
    name = "?"
    persistent = False  # True: one tree for every measurement; scenarios undo their changes
    description = ""

    def __init__(self, data: Data):
        self.data = data
        self.root = data.scratch / self.name
        self.mp = self.root / "mnt"
        self.n = 0
        self.mounted = False
        self.daemon_pids: list[int] = []

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (None: it can)."""
        return None

    def mount(self) -> Path:
        """A fresh mount with a fresh, empty upper; returns the merged root."""
        raise NotImplementedError

    def umount(self) -> None:
        """Unmount and throw the upper away (untimed)."""
        raise NotImplementedError

    def upper(self) -> Path | None:
        return None

    def file_copy(self, source: Path, path: Path) -> bool:
        """Untimed, before a read that counts on it: the store's file cache has a copy
        of the lower file at ``path`` of the mount (content as ``source``); True if it
        had to be made (by a read through the mount). Only store-backed backends have
        the cache."""
        return False

    def forget_file_copies(self) -> None:
        """Untimed: empty the store's file cache (the next open of a big lower file
        reads it through the daemon, as the first one after an import does)."""

    def cleanup(self) -> None:
        """After the suite, also after errors and Ctrl-C: nothing stays mounted, and the
        retired directories are gone."""
        if self.mp.exists() and is_mounted(self.mp):
            force_unmount(self.mp)
        for pid in self.daemon_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.mounted = False
        if self.spent.exists():
            common.rmtree(self.spent)

    @property
    def spent(self) -> Path:
        return self.root / "spent"

    def retire(self, path: Path) -> None:
        """Throw away what is in the directory ``path``, and keep the directory itself
        (moved to ``spent/``, same filesystem, same inode) until ``cleanup``. ext4 puts a
        new upper (made in a ``common.spread_subdirs`` directory) in the block group
        with the fewest directories: removing the last upper's directory made that its
        group again, beside the inodes just freed, where creates are slow
        (``common.spread_subdirs``); a kept directory sends the next one elsewhere."""
        if not path.is_dir() or path.is_symlink():
            if path.exists() or path.is_symlink():
                common.rmtree(path)
            return
        for child in os.listdir(path):
            common.rmtree(path / child)
        self.spent.mkdir(parents=True, exist_ok=True)
        os.rename(path, self.spent / f"{os.urandom(6).hex()}-{path.name}")  # never taken

    # helpers for the overlay-style backends
    def _fresh_dirs(self) -> tuple[Path, Path]:
        self.n += 1
        up, wk = self.root / f"upper{self.n}", self.root / f"work{self.n}"
        self.root.mkdir(parents=True, exist_ok=True)
        common.spread_subdirs(self.root)  # each upper in a block group of its own
        for d in (up, wk):
            common.fresh_dir(d)
        self.mp.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mp):
            force_unmount(self.mp)
        return up, wk

    def _drop_dirs(self) -> None:
        for p in (self.root / f"upper{self.n}", self.root / f"work{self.n}"):
            if p.exists():
                self.retire(p)


class PlainDir(Backend):
    name = "dir"
    persistent = True
    description = "plain directory with both layers copied in (the floor; no copy-up)"

    def mount(self) -> Path:
        self.mounted = True
        return self.data.plain

    def umount(self) -> None:
        self.mounted = False


class Kernel(Backend):
    name = "kernel"
    fuse = False
    description = "kernel overlayfs, lowerdir = the layer directories (default options)"

    def options(self, up: Path, wk: Path) -> str:
        return f"lowerdir={self.data.lowerdir},upperdir={up},workdir={wk}"

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root to mount"
        try:
            self.mount()
        except RuntimeError as exc:
            return f"mount -t overlay failed: {exc}".splitlines()[0][:200]
        self.umount()
        return None

    def mount_cmd(self, up: Path, wk: Path) -> list[str]:
        return ["mount", "-t", "overlay", "overlay", "-o", self.options(up, wk), str(self.mp)]

    def mount(self) -> Path:
        up, wk = self._fresh_dirs()
        common.run(self.mount_cmd(up, wk), timeout=120)
        self.mounted = True
        if self.fuse:
            self.daemon_pids = pids_serving(self.mp)
        return self.mp

    def umount(self) -> None:
        deadline = time.monotonic() + 10
        while is_mounted(self.mp):  # busy for a moment after a killed tool: retry
            proc = subprocess.run(["umount", str(self.mp)], capture_output=True, text=True)
            if proc.returncode != 0 and time.monotonic() > deadline:
                raise RuntimeError(f"umount {self.mp}: {proc.stderr.strip()}")
            if proc.returncode != 0:
                time.sleep(0.1)
        self._wait_daemons()
        self.mounted = False
        self._drop_dirs()

    def _wait_daemons(self, timeout: float = 30) -> None:
        """Wait until the FUSE daemons of the mount are gone (none for the kernel)."""
        deadline = time.monotonic() + timeout
        for pid in self.daemon_pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.01)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.daemon_pids = []

    def upper(self) -> Path:
        return self.root / f"upper{self.n}"


class FuseOverlayfs(Kernel):
    """fuse-overlayfs, and anything that takes its command line (layerstore-overlay)."""
    name = "fuse-overlayfs"
    program = "fuse-overlayfs"
    fuse = True
    description = "fuse-overlayfs (Debian package), the same lowerdir/upperdir/workdir"

    def unavailable(self) -> str | None:
        if shutil.which(self.program) is None:
            return f"`{self.program}` is not installed"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return Kernel.unavailable(self)

    def mount_cmd(self, up: Path, wk: Path) -> list[str]:
        return [self.program, "-o", self.options(up, wk), str(self.mp)]


class LayerstoreOverlay(FuseOverlayfs):
    name = "layerstore-overlay"
    program = "layerstore-overlay"
    description = "`layerstore-overlay` (fuse-overlayfs-compatible) over the layer directories"


#: source file -> blake3 of its content (``Layerstore.file_copy``)
_DIGESTS: dict[Path, bytes] = {}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def layerstore_cli(*args: str | os.PathLike[str]) -> str:
    """Run the layerstore CLI in this process; its stdout, or RuntimeError with stderr."""
    from layerstore.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    if rc == 130:  # main() turns Ctrl-C into exit 130: the suite must stop, not go on
        raise KeyboardInterrupt
    if rc:
        raise RuntimeError(f"layerstore {' '.join(map(str, args))}: exit {rc}: "
                           f"{err.getvalue().strip()}")
    return out.getvalue()


def copy_up_modes() -> list[str]:
    """The values of ``layerstore mount --copy-up`` ([] when the option does not exist)."""
    proc = subprocess.run([sys.executable, "-m", "layerstore", "mount", "--help"],
                          capture_output=True, text=True, env=common.ls_env())
    text = proc.stdout
    if "--copy-up" not in text:
        return []
    import re
    m = re.search(r"--copy-up\s*\{([^}]*)\}", text)
    return [s.strip() for s in m.group(1).split(",")] if m else ["full"]


class Layerstore(Backend):
    name = "layerstore"
    mode: str | None = "full"
    description = "`layerstore create` + `layerstore mount` (full copy-up)"

    def __init__(self, data: Data, copy_up_option: bool):
        super().__init__(data)
        self.copy_up_option = copy_up_option
        self.cid: str | None = None

    def unavailable(self) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        try:
            self.mount()
        except RuntimeError as exc:
            return str(exc).splitlines()[0][:200]
        self.umount()
        return None

    def mount(self) -> Path:
        self.mp.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mp):
            force_unmount(self.mp)
        root = self.data.store
        self.cid = layerstore_cli("--root", root, "create", self.data.image, "-q").strip()
        extra = ["--copy-up", self.mode] if self.copy_up_option and self.mode else []
        self._mount_cmd(root, extra)
        self.mounted = True
        from layerstore.fuse import daemon
        st = daemon.read_state(root, self.cid) or {}
        self.daemon_pids = [st["pid"]] if st.get("pid") else []
        return self.mp

    def _mount_cmd(self, root: Path, extra: list[str]) -> None:
        assert self.cid is not None
        layerstore_cli("--root", root, "mount", self.cid, self.mp, *extra)

    def umount(self) -> None:
        root = self.data.store
        if self.cid is not None:
            if is_mounted(self.mp):
                layerstore_cli("--root", root, "umount", self.mp)
            for sub in ("upper", "work"):
                self.retire(root / "containers" / self.cid / sub)
            layerstore_cli("--root", root, "rm", "--force", self.cid)
            self.cid = None
        self.mounted = False
        self.daemon_pids = []

    def upper(self) -> Path | None:
        return self.data.store / "containers" / self.cid / "upper" if self.cid else None

    def file_copy(self, source: Path, path: Path) -> bool:
        import blake3

        from layerstore.store.filecache import FileCache

        digest = _DIGESTS.get(source)
        if digest is None:
            h = blake3.blake3()  # (no thread pool in this process: daemons are its forks)
            h.update_mmap(source)
            digest = _DIGESTS[source] = h.digest()
        copy = FileCache(self.data.store).path(digest)
        if copy.exists():
            return False
        buf = bytearray(1 << 20)
        with open(path, "rb", buffering=0) as f:  # the open asks the daemon's filler
            while f.readinto(buf):
                pass
        deadline = time.monotonic() + 120
        while not copy.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the file cache never got {path}")
            time.sleep(0.05)
        return True

    def forget_file_copies(self) -> None:
        from layerstore.store.filecache import FileCache

        FileCache(self.data.store).sweep()

    def cleanup(self) -> None:
        super().cleanup()
        if self.cid is not None:
            with contextlib.suppress(Exception):
                layerstore_cli("--root", self.data.store, "rm", "--force", self.cid)
            self.cid = None


class LayerstoreMeta(Layerstore):
    name = "layerstore-meta"
    mode = "meta"
    description = "`layerstore mount --copy-up meta` (metadata-only copy-up)"


class LayerstoreLazy(Layerstore):
    name = "layerstore-lazy"
    mode = "lazy"
    description = "`layerstore mount --copy-up lazy` (block-level copy-up on the first write)"


class LayerstoreBinding(Layerstore):
    """``layerstore mount --copy-up meta`` on a chosen FUSE binding (``LAYERSTORE_FUSE``),
    to compare bindings: the mount command runs in a subprocess, as the binding is chosen
    at import."""

    mode = "meta"
    binding = ""
    env: ClassVar[dict[str, str]] = {}

    def _mount_cmd(self, root: Path, extra: list[str]) -> None:
        assert self.cid is not None
        env = dict(common.ls_env(), LAYERSTORE_FUSE=self.binding, **self.env)
        proc = subprocess.run(common.ls_cmd(root, "mount", self.cid, self.mp, *extra), env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"layerstore mount ({self.binding}): {proc.stderr.strip()}")


class LayerstoreFusepy(LayerstoreBinding):
    name = "layerstore-fusepy"
    binding = "fusepy"
    description = "`layerstore mount --copy-up meta` on fusepy/libfuse2 (high-level API)"


class LayerstoreMfusepy(LayerstoreBinding):
    name = "layerstore-mfusepy"
    binding = "mfusepy"
    description = "`layerstore mount --copy-up meta` on mfusepy/libfuse3 (high-level API)"


class LayerstorePyfuse3(LayerstoreBinding):
    name = "layerstore-pyfuse3"
    binding = "pyfuse3"
    description = ("`layerstore mount --copy-up meta` on pyfuse3/libfuse3 (low-level API, "
                   "`layerstore/fuse/lowlevel.py`)")


class LayerstoreWire(LayerstoreBinding):
    name = "layerstore-wire"
    binding = "wire"
    description = ("`layerstore mount --copy-up meta` speaking the FUSE protocol on /dev/fuse "
                   "(`layerstore/fuse/wire.py` under `lowlevel.py`)")


class LayerstoreDevFuse(LayerstoreBinding):
    name = "layerstore-devfuse"
    binding = "wire"
    env: ClassVar[dict[str, str]] = {"LAYERSTORE_FUSE_URING": "0"}
    description = ("`layerstore mount --copy-up meta` reading its requests from /dev/fuse, "
                   "not over io_uring (`LAYERSTORE_FUSE_URING=0`)")


ALL = BACKENDS


def make_backends(data: Data, wanted: list[str]) -> tuple[list[Backend], dict[str, str]]:
    """The wanted backends that can run here, and the reasons for the others."""
    modes = copy_up_modes()
    makers: dict[str, Callable[[], Backend]] = {
        "dir": lambda: PlainDir(data),
        "kernel": lambda: Kernel(data),
        "fuse-overlayfs": lambda: FuseOverlayfs(data),
        "layerstore": lambda: Layerstore(data, "full" in modes),
        "layerstore-meta": lambda: LayerstoreMeta(data, True),
        "layerstore-lazy": lambda: LayerstoreLazy(data, True),
        "layerstore-overlay": lambda: LayerstoreOverlay(data),
        "layerstore-fusepy": lambda: LayerstoreFusepy(data, True),
        "layerstore-mfusepy": lambda: LayerstoreMfusepy(data, True),
        "layerstore-pyfuse3": lambda: LayerstorePyfuse3(data, True),
        "layerstore-wire": lambda: LayerstoreWire(data, True),
        "layerstore-devfuse": lambda: LayerstoreDevFuse(data, True),
    }
    ok, skipped = [], {}
    for name in wanted:
        if name in ("layerstore-meta", "layerstore-lazy") and name[11:] not in modes:
            skipped[name] = (f"`layerstore mount` has no `--copy-up {name[11:]}` option yet"
                             if not modes else f"`--copy-up` offers only {', '.join(modes)}")
            continue
        b = makers[name]()
        try:
            why = b.unavailable()
        finally:
            b.cleanup()
        if why:
            skipped[name] = why
        else:
            ok.append(b)
    return ok, skipped
