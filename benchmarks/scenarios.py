"""The suite's data and its measurements (scenarios 1-7 of issue 4; 8 is in suite.py).

Data (made once per size set, cached under ``--work``): a two-layer image, bottom first

- layer 0: a root filesystem: the debootstrap minbase tree (``rootfs.debootstrap_rootfs``)
  in the full run, else (and in ``--quick``) a generated tree (``rootfs.generate``);
- layer 1: ``/bench``: incompressible files for copy-up (``cp-4k`` .. ``cp-1g``), the file
  for random writes (``rw-256m``), a tree for ``rm -rf`` (``rmtree/``) and a directory for
  the rename (``renamedir/``).

Both layers are directories (kernel overlayfs, fuse-overlayfs and layerstore-overlay use
them as ``lowerdir``), uncompressed layer tars in an OCI layout imported into one store
(the layerstore backends mount it), and copied together into one plain directory (the
``dir`` backend).

Timing: every operation is timed in this process with ``time.perf_counter_ns`` around the
system calls themselves (``os.open``/``os.write``/``os.close``, ``os.chmod``, reads). Real
tools (``find``, ``du``, ``ls``, ``tar``, ``rm``, ``mv``) run as subprocesses; their time is
the wall clock minus the same command's median start-up time on an empty directory,
measured in the same run (both are kept in the JSON). fio reports its own IOPS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import common
import rootfs
from backends import Backend, Data, layerstore_cli

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: metric unit -> True when higher is better
HIGHER_BETTER = {"ms": False, "s": False, "MB/s": True, "IOPS": True, "files/s": True,
                 "x": True}


def size_label(n: int) -> str:
    for unit, div in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def human_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Config:
    quick: bool
    copyup_sizes: tuple[int, ...]
    big: int                 # the file for metadata changes and reads (the biggest copy-up one)
    randwrite: int           # the file's size
    randwrite_ios: int       # random 4 KiB writes per pass (distinct blocks)
    randreads: int
    creates: int
    create_size: int
    rmtree_files: int
    rename_files: int
    commit_bytes: int
    rootfs: str              # "debootstrap" (when it can be made) or "generated"
    gen_mib: int
    dedup_versions: int
    runs: int
    walk_skip: tuple[str, ...] = ()   # parts of the root filesystem the walks leave out

    def spec(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("runs", "quick", "commit_bytes", "dedup_versions", "walk_skip",
                  "randwrite_ios", "randreads", "creates", "create_size"):
            d.pop(k)
        return d


#: The issue's sizes are 1 GiB for the big file, 5,000 creates, full passes of random
#: writes and the whole root filesystem for the walks. The layerstore mounts are slow
#: enough today (one `ls -lR` of minbase ~45 s, cold reads ~40 MB/s, ~1.5k write IOPS)
#: that 5 runs of those would take over an hour, so the full run is cut as below
#: (benchmarks/README.md says so next to the results). ``ISSUE`` has the issue's sizes.
FULL = Config(quick=False, copyup_sizes=(4 * KiB, MiB, 64 * MiB, 256 * MiB), big=256 * MiB,
              randwrite=256 * MiB, randwrite_ios=4096, randreads=2048, creates=2000,
              create_size=4 * KiB, rmtree_files=2000, rename_files=1000,
              commit_bytes=256 * MiB, rootfs="debootstrap", gen_mib=200, dedup_versions=3,
              runs=5, walk_skip=("usr/share",))
ISSUE = Config(quick=False, copyup_sizes=(4 * KiB, MiB, 64 * MiB, GiB), big=GiB,
               randwrite=256 * MiB, randwrite_ios=65536, randreads=4096, creates=5000,
               create_size=4 * KiB, rmtree_files=2000, rename_files=1000,
               commit_bytes=256 * MiB, rootfs="debootstrap", gen_mib=200, dedup_versions=3,
               runs=5)
QUICK = Config(quick=True, copyup_sizes=(4 * KiB, MiB, 32 * MiB), big=32 * MiB,
               randwrite=8 * MiB, randwrite_ios=1024, randreads=512, creates=300,
               create_size=4 * KiB, rmtree_files=200, rename_files=100,
               commit_bytes=16 * MiB, rootfs="generated", gen_mib=4, dedup_versions=3, runs=1)


# -- data ---------------------------------------------------------------------------

def random_file(path: Path, size: int, key: str) -> bytes:
    """Incompressible, deterministic content; returns the first byte."""
    h = blake3.blake3(key.encode())
    with open(path, "wb") as f:
        for off in range(0, size, 8 * MiB):
            f.write(h.digest(length=min(8 * MiB, size - off), seek=off))
    return h.digest(length=1)


def _bench_layer(dest: Path, cfg: Config) -> dict[str, Any]:
    b = dest / "bench"
    b.mkdir(parents=True)
    first = {}
    for size in cfg.copyup_sizes:
        name = f"cp-{size_label(size).lower()}"
        first[name] = random_file(b / name, size, name).hex()
    random_file(b / "rw", cfg.randwrite, "rw")
    per_dir = 50
    for i in range(cfg.rmtree_files):
        d = b / "rmtree" / f"d{i // per_dir:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(blake3.blake3(b"rm%d" % i).digest(length=4 * KiB))
    (b / "renamedir").mkdir()
    for i in range(cfg.rename_files):
        (b / "renamedir" / f"f{i:05d}").write_bytes(
            blake3.blake3(b"mv%d" % i).digest(length=4 * KiB))
    for dirpath, _, filenames in os.walk(dest):
        for n in filenames:
            os.utime(os.path.join(dirpath, n), (rootfs.EPOCH, rootfs.EPOCH))
    rootfs._fix_dir_mtimes(dest, rootfs.EPOCH)
    return first


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _write_layout(layout: Path, tars: list[Path], ref: str) -> None:
    """An OCI image layout whose layers are these uncompressed tars (hard-linked in)."""
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(data: bytes) -> dict[str, Any]:
        dg = hashlib.sha256(data).hexdigest()
        (layout / "blobs/sha256" / dg).write_bytes(data)
        return {"digest": f"sha256:{dg}", "size": len(data)}

    layers = []
    for t in tars:
        dg = _sha256_file(t)
        os.link(t, layout / "blobs/sha256" / dg)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": f"sha256:{dg}", "size": t.stat().st_size})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": [x["digest"] for x in layers]}}).encode()
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      **blob(config)},
                           "layers": layers}).encode()
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest),
            "annotations": {"io.containerd.image.name": ref}}]}))


@dataclass
class Prepared:
    data: Data
    cfg: Config
    rootfs_label: str
    rootfs_stats: dict[str, int]
    first_bytes: dict[str, str]
    walk_names: list[str]   # top-level entries of the root filesystem (the walk targets)
    l0_tar: Path


def prepare(work: Path, cfg: Config, log: Callable[[str], None]) -> Prepared:
    """Make (or reuse) the layers, the image in a store, and the plain copy."""
    base = work / ("suite-quick" if cfg.quick else "suite")
    base.mkdir(parents=True, exist_ok=True)
    lock = os.open(base / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:  # held until the process ends: two runs on one work dir would share mountpoints
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another benchmark suite run is using {base} (give this one "
                         "its own --work)") from None
    spec_file = base / "spec.json"
    spec = json.loads(json.dumps(cfg.spec()))  # as it reads back from spec.json
    l0 = None
    if cfg.rootfs == "debootstrap":
        l0 = rootfs.debootstrap_rootfs(common.DEFAULT_WORK / "debootstrap-bookworm-minbase")
    if l0 is not None:
        label = "debootstrap minbase bookworm"
    else:
        label = f"generated {cfg.gen_mib} MiB (seed 1)"
        spec["rootfs"] = "generated"
        l0 = common.cached(work / f"gen-{cfg.gen_mib}MiB-s1",
                           lambda tmp: rootfs.generate(tmp, cfg.gen_mib, 1))
    spec["l0"] = str(l0)
    old = json.loads(spec_file.read_text()) if spec_file.exists() else None
    if old is None or old.get("spec") != spec:
        log(f"making the suite's data in {base} ...")
        for p in list(base.iterdir()):
            common.rmtree(p)
        l1 = base / "layer1"
        first = _bench_layer(l1, cfg)
        l0_tar = common.make_layer_tar(l0, base / "layer0.tar")
        l1_tar = common.make_layer_tar(l1, base / "layer1.tar")
        _write_layout(base / "oci", [l0_tar, l1_tar], "suite:1")
        log("importing the image into the suite's store ...")
        common.ls_run(base / "store", "import", base / "oci", "-q")
        common.rmtree(base / "oci")
        (base / "layer1.tar").unlink()
        spec_file.write_text(json.dumps({"spec": spec, "first_bytes": first,
                                         "rootfs_stats": rootfs.tree_stats(l0)}))
    meta = json.loads(spec_file.read_text())
    plain, marker = base / "plain", base / "plain.clean"
    if not marker.exists():
        log("copying both layers into the plain directory ...")
        if plain.exists():
            common.rmtree(plain)
        common.run(["cp", "-a", "--", l0, plain])
        common.run(["cp", "-a", "--", f"{base / 'layer1'}/.", plain])
        marker.write_text("")
    scratch = base / "mounts"
    scratch.mkdir(exist_ok=True)
    # Every fresh upper (and the plain directory's newfiles-*/) in a block group of its
    # own, not beside the files the last measurement deleted (common.spread_subdirs).
    (base / "store" / "containers").mkdir(exist_ok=True)
    for d in (plain, base / "store" / "containers"):
        common.spread_subdirs(d)
    data = Data(layers=[l0, base / "layer1"], store=base / "store", image="suite:1",
                plain=plain, scratch=scratch)
    names = walk_targets(l0, cfg.walk_skip)
    return Prepared(data=data, cfg=cfg, rootfs_label=label,
                    rootfs_stats=meta["rootfs_stats"], first_bytes=meta["first_bytes"],
                    walk_names=names, l0_tar=base / "layer0.tar")


def walk_targets(root: Path, skip: tuple[str, ...]) -> list[str]:
    """Relative paths that cover ``root`` except the ``skip`` subtrees (a directory that
    holds a skipped one is replaced by its other children)."""
    def expand(rel: str) -> list[str]:
        if rel in skip:
            return []
        if any(s.startswith(rel + "/") for s in skip):
            return [x for n in sorted(os.listdir(root / rel)) for x in expand(f"{rel}/{n}")]
        return [rel]
    return [x for n in sorted(os.listdir(root)) for x in expand(n)]


def count_entries(root: Path, rels: list[str]) -> int:
    """What ``find REL...`` in ``root`` lists (command-line symlinks are not followed)."""
    n = 0
    for rel in rels:
        p = root / rel
        n += 1
        if p.is_dir() and not p.is_symlink():
            n += sum(len(d) + len(f) for _, d, f in os.walk(p))
    return n


def mark_plain_dirty(prep: Prepared, dirty: bool) -> None:
    """While the suite runs, the plain copy may be changed; an interrupted run has it
    copied again next time."""
    marker = prep.data.plain.with_name("plain.clean")
    if dirty:
        marker.unlink(missing_ok=True)
    else:
        marker.write_text("")


def warm_up(prep: Prepared) -> None:
    """Read every lower file (layer directories, plain copy, the store's LMDB file and
    the copies in its file cache) so measurements that are not cold start from a warm
    page cache. The file cache is what a store-backed mount reads a big lower file from
    (and copies it up from) once it has a copy there: left out (before session 17), the
    first such mount of each run read the 256 MiB file's copy cold in its warm copy-up,
    after the last run's cold measurements had dropped the caches (130-700 ms in 1-3 of
    5 runs, against ~55 ms)."""
    buf = bytearray(MiB)
    for top in [*prep.data.layers, prep.data.plain, prep.data.store / "db",
                prep.data.store / "cache"]:
        for dirpath, _, filenames in os.walk(top):
            for n in filenames:
                p = os.path.join(dirpath, n)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass


def drops_so_far() -> int:
    """How often anyone dropped the page cache since boot (/proc/vmstat drop_pagecache):
    another benchmark on the machine doing it in the middle of a warm measurement
    makes that measurement partly cold."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return 0


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# -- measurements -----------------------------------------------------------------

@dataclass
class Sample:
    metric: str
    value: float
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ctx:
    backend: Backend
    root: Path
    prep: Prepared
    startup: dict[str, float]          # tool -> median start-up seconds
    undo: list[Callable[[], None]] = field(default_factory=list)
    own_drops: int = 0  #: page cache drops the measurement made itself (untimed)

    def later(self, fn: Callable[[], None]) -> None:
        """Undo a change after the measurement (only the persistent plain directory)."""
        if self.backend.persistent:
            self.undo.append(fn)


@dataclass
class Spec:
    scenario: int
    key: str
    cold: bool
    params: dict[str, Any]
    fn: Callable[[Ctx], list[Sample]]


def ms(ns: int) -> float:
    return ns / 1e6


def run_group(argv: list[str], cwd: Path | None = None, stdout: Any = subprocess.PIPE,
              timeout: float = 1800) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run`` in a process group of its own: on Ctrl-C or a timeout the whole
    group is killed (fio forks its job processes; they must not outlive the mount)."""
    p = subprocess.Popen(argv, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def run_tool(ctx: Ctx, name: str, argv: list[str], cwd: Path) -> tuple[float, dict[str, Any]]:
    """Seconds of a tool run minus its start-up time; and both raw numbers."""
    t0 = time.perf_counter_ns()
    proc = run_group(argv, cwd=cwd, stdout=subprocess.DEVNULL)
    dt = (time.perf_counter_ns() - t0) / 1e9
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}... exit {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    base = ctx.startup.get(name, 0.0)
    # the start-up estimate is noisy by ~0.5 ms: never report less than 10 us
    return max(dt - base, 1e-5), {"raw_s": dt, "startup_s": base}


def tool_argvs(names: list[str]) -> dict[str, list[str]]:
    """The real tools of the walk scenario over the root filesystem's top-level entries
    (``/bench``, the other layer, is left out)."""
    return {
        "find": ["find", *names],
        "du -s": ["du", "-s", *names],
        "ls -lR": ["ls", "-lR", *names],
        "tar cf - | wc -c": ["bash", "-c", 'set -o pipefail; tar cf - "$@" | wc -c',
                             "tar", *names],
    }


def measure_startup(tmp: Path) -> dict[str, float]:
    """Median wall time of each tool on an empty directory (its start-up cost)."""
    empty = tmp / "startup-empty"
    common.fresh_dir(empty)
    (empty / "e").mkdir()
    cmds = tool_argvs(["e"])
    cmds["rm -rf"] = ["rm", "-rf", "missing"]
    cmds["mv"] = ["mv", "e", "e2"]
    out = {}
    for name, argv in cmds.items():
        times = []
        for _ in range(7):
            t0 = time.perf_counter_ns()
            run_group(argv, cwd=empty, stdout=subprocess.DEVNULL)  # as run_tool runs it
            times.append((time.perf_counter_ns() - t0) / 1e9)
            if name == "mv":
                os.rename(empty / "e2", empty / "e")
        out[name] = common.median(times)
    common.rmtree(empty)
    return out


def copyup(size: int, cold: bool) -> Callable[[Ctx], list[Sample]]:
    name = f"cp-{size_label(size).lower()}"

    def fn(ctx: Ctx) -> list[Sample]:
        byte = bytes.fromhex(ctx.prep.first_bytes[name])  # the same byte: content unchanged
        path = str(ctx.root / "bench" / name)
        t0 = time.perf_counter_ns()
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, byte)
        os.close(fd)
        dt = time.perf_counter_ns() - t0
        return [Sample(f"copy-up {human_size(size)} {'cold' if cold else 'warm'}", ms(dt),
                       "ms")]
    return fn


def metadata(op: str, size: int) -> Callable[[Ctx], list[Sample]]:
    name = f"cp-{size_label(size).lower()}"

    def fn(ctx: Ctx) -> list[Sample]:
        path = ctx.root / "bench" / name
        lower = ctx.prep.data.layers[1] / "bench" / name
        st = lower.stat()
        t0 = time.perf_counter_ns()
        if op == "chmod":
            os.chmod(path, 0o600)
        elif op == "chown":
            os.chown(path, 1234, 1234)
        else:
            os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
        dt = time.perf_counter_ns() - t0

        def undo() -> None:
            os.chmod(path, st.st_mode & 0o7777)
            os.chown(path, st.st_uid, st.st_gid)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        ctx.later(undo)
        return [Sample(f"{op} {human_size(size)}", ms(dt), "ms")]
    return fn


def randwrite(size: int, count: int) -> Callable[[Ctx], list[Sample]]:
    """``count`` random 4 KiB writes to distinct blocks of the file, twice (the same
    blocks): the first pass includes the copy-up at open."""
    def fio_pass(path: Path, label: str) -> Sample:
        argv = ["fio", f"--name={label}", f"--filename={path}", "--rw=randwrite", "--bs=4k",
                f"--size={size}", f"--number_ios={count}", "--ioengine=psync",
                "--randrepeat=1", "--output-format=json"]
        t0 = time.perf_counter_ns()
        proc = run_group(argv)
        wall = (time.perf_counter_ns() - t0) / 1e9
        if proc.returncode != 0:
            raise RuntimeError(f"fio exit {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
        text = proc.stdout.decode()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        w = job["write"]
        if w.get("total_ios") is not None and w["total_ios"] < count:
            raise RuntimeError(f"fio wrote only {w['total_ios']} blocks")
        return Sample(f"randwrite 4K {label} pass", w["iops"], "IOPS",
                      {"tool": "fio", "fio_runtime_ms": w.get("runtime"), "wall_s": wall,
                       "ios": w.get("total_ios")})

    def loop_pass(path: Path, label: str) -> Sample:
        blocks = random.Random(1).sample(range(size // 4096), count)
        buf = b"\x5a" * 4096
        t0 = time.perf_counter_ns()
        fd = os.open(path, os.O_WRONLY)
        for b in blocks:
            os.pwrite(fd, buf, b * 4096)
        os.close(fd)
        dt = (time.perf_counter_ns() - t0) / 1e9
        return Sample(f"randwrite 4K {label} pass", len(blocks) / dt, "IOPS",
                      {"tool": "built-in loop", "seconds": dt})

    def fn(ctx: Ctx) -> list[Sample]:
        path = ctx.root / "bench" / "rw"
        one = fio_pass if shutil.which("fio") else loop_pass
        return [one(path, "first"), one(path, "second")]
    return fn


def seqread(size: int, name: str, first: bool = False) -> Callable[[Ctx], list[Sample]]:
    """Runs right after the caches were dropped: the first read is cold, the second warm.

    Store-backed backends read a big lower file from a copy in the store's file cache
    (``layerstore/store/filecache.py``) once any mount has opened it: the file is made
    sure to be there first (read once and the caches dropped again, untimed). With
    ``first``, the cache is emptied instead and only the cold read is timed: the first
    read of the file after an import, through the daemon from LMDB."""
    def fn(ctx: Ctx) -> list[Sample]:
        out = []
        buf = bytearray(MiB)
        path = ctx.root / "bench" / name
        if first:
            ctx.backend.forget_file_copies()
        elif ctx.backend.file_copy(ctx.prep.data.plain / "bench" / name, path):
            drop_caches()
            ctx.own_drops += 1
        for label in ("first", ) if first else ("cold", "warm"):
            t0 = time.perf_counter_ns()
            n = 0
            with open(path, "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    n += k
            dt = (time.perf_counter_ns() - t0) / 1e9
            if n != size:
                raise RuntimeError(f"read {n} bytes of {size}")
            out.append(Sample(f"seq read {human_size(size)} {label}", n / dt / 1e6, "MB/s"))
        return out
    return fn


def randread(size: int, name: str, count: int) -> Callable[[Ctx], list[Sample]]:
    rng = random.Random(2)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]

    def fn(ctx: Ctx) -> list[Sample]:
        fd = os.open(ctx.root / "bench" / name, os.O_RDONLY)
        try:
            t0 = time.perf_counter_ns()
            for off in offsets:
                os.pread(fd, 4096, off)
            dt = (time.perf_counter_ns() - t0) / 1e9
        finally:
            os.close(fd)
        return [Sample(f"random 4K reads cold ({human_size(size)} file)", count / dt, "IOPS")]
    return fn


def walk(tool: str) -> Callable[[Ctx], list[Sample]]:
    def fn(ctx: Ctx) -> list[Sample]:
        argv = tool_argvs(ctx.prep.walk_names)[tool]
        out = []
        for label in ("first", "warm"):
            s, extra = run_tool(ctx, tool, argv, ctx.root)
            out.append(Sample(f"{tool} {label}", s * 1e3, "ms", extra))
        return out
    return fn


def creates(count: int, size: int) -> Callable[[Ctx], list[Sample]]:
    def fn(ctx: Ctx) -> list[Sample]:
        # A new name each time: in the plain directory (chattr +T, see
        # common.spread_subdirs) ext4 picks the block group by hashing the name.
        d = ctx.root / f"newfiles-{os.urandom(4).hex()}"
        d.mkdir()
        paths = [str(d / f"f{i:05d}") for i in range(count)]
        buf = b"\xa5" * size
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        t0 = time.perf_counter_ns()
        for p in paths:
            fd = os.open(p, flags, 0o644)
            os.write(fd, buf)
            os.close(fd)
        t1 = time.perf_counter_ns()
        for p in paths:
            os.unlink(p)
        t2 = time.perf_counter_ns()
        if ctx.backend.persistent:  # kept until the suite ends (Backend.retire)
            ctx.later(lambda: ctx.backend.retire(d))
        else:
            d.rmdir()
        return [Sample(f"create {count} x {human_size(size)}", count / ((t1 - t0) / 1e9),
                       "files/s"),
                Sample(f"delete those {count}", count / ((t2 - t1) / 1e9), "files/s")]
    return fn


def rm_tree(files: int) -> Callable[[Ctx], list[Sample]]:
    def fn(ctx: Ctx) -> list[Sample]:
        s, extra = run_tool(ctx, "rm -rf", ["rm", "-rf", "bench/rmtree"], ctx.root)
        if (ctx.root / "bench/rmtree").exists():
            raise RuntimeError("bench/rmtree still exists after rm -rf")
        src = ctx.prep.data.layers[1] / "bench/rmtree"
        ctx.later(lambda: common.run(["cp", "-a", "--", src, ctx.root / "bench/rmtree"]))
        return [Sample(f"rm -rf lower tree ({files} files)", s * 1e3, "ms", extra)]
    return fn


def rename_dir(files: int) -> Callable[[Ctx], list[Sample]]:
    """What ``mv`` does: rename(2); on EXDEV (overlayfs without redirect_dir) ``mv``
    copies and deletes, and that is timed too."""
    def fn(ctx: Ctx) -> list[Sample]:
        src, dst = ctx.root / "bench/renamedir", ctx.root / "bench/renamed"
        extra: dict[str, Any] = {"exdev": False}
        t0 = time.perf_counter_ns()
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            extra["exdev"] = True
        dt = (time.perf_counter_ns() - t0) / 1e9
        if extra["exdev"]:
            s, more = run_tool(ctx, "mv", ["mv", "bench/renamedir", "bench/renamed"], ctx.root)
            dt += s
            extra.update(more)
        if len(os.listdir(dst)) != files or src.exists():
            raise RuntimeError("the renamed directory is not complete")
        ctx.later(lambda: os.rename(dst, src))
        return [Sample(f"rename lower dir ({files} files)", dt * 1e3, "ms", extra)]
    return fn


def specs(cfg: Config) -> list[Spec]:
    """Every measurement of one run, warm ones first, then cold ones."""
    big = f"cp-{size_label(cfg.big).lower()}"
    out: list[Spec] = []
    for cold in (False, True):
        for size in cfg.copyup_sizes:
            out.append(Spec(1, f"copyup-{size_label(size)}-{'cold' if cold else 'warm'}", cold,
                            {"size": size, "cold": cold}, copyup(size, cold)))
    for op in ("chmod", "chown", "utime"):
        out.append(Spec(2, f"meta-{op}", False, {"op": op, "size": cfg.big},
                        metadata(op, cfg.big)))
    out.append(Spec(3, "randwrite", False,
                    {"size": cfg.randwrite, "bs": 4096, "ios": cfg.randwrite_ios,
                     "tool": "fio" if shutil.which("fio") else "built-in loop"},
                    randwrite(cfg.randwrite, cfg.randwrite_ios)))
    out.append(Spec(4, "seqread", True, {"size": cfg.big, "block": MiB},
                    seqread(cfg.big, big)))
    out.append(Spec(4, "randread", True, {"size": cfg.big, "count": cfg.randreads},
                    randread(cfg.big, big, cfg.randreads)))
    out.append(Spec(4, "seqread-first", True, {"size": cfg.big, "block": MiB,
                                               "file_cache": "emptied"},
                    seqread(cfg.big, big, first=True)))
    for tool in tool_argvs([]):
        out.append(Spec(5, f"walk-{tool.split()[0]}", False,
                        {"tool": tool, "skipped": list(cfg.walk_skip)}, walk(tool)))
    out.append(Spec(6, "creates", False, {"count": cfg.creates, "size": cfg.create_size},
                    creates(cfg.creates, cfg.create_size)))
    out.append(Spec(6, "rmtree", False, {"files": cfg.rmtree_files}, rm_tree(cfg.rmtree_files)))
    out.append(Spec(7, "rename", False, {"files": cfg.rename_files},
                    rename_dir(cfg.rename_files)))
    out.sort(key=lambda s: s.cold)  # stable: warm ones keep their order, cold ones go last
    return out


SCENARIOS = {
    1: "copy-up latency: first open(O_WRONLY) + 1-byte write + close of a lower file",
    2: "metadata-only change of the big lower file: chmod, chown, utime",
    3: "random 4 KiB writes over a lower file: first pass (with copy-up) and second pass",
    4: "sequential read of the big lower file, cold then warm; random 4 KiB reads, cold; "
       "the first read of it (store's file cache emptied), cold",
    5: "tree walks over the root filesystem: first (fresh mount) and warm (again)",
    6: "creating files of 4 KiB and deleting them; rm -rf of a lower tree",
    7: "rename of a lower directory",
    8: "import speed and dedup ratio; commit of an upper",
}

__all__ = [
    "FULL",
    "QUICK",
    "SCENARIOS",
    "Config",
    "Ctx",
    "Sample",
    "Spec",
    "drop_caches",
    "layerstore_cli",
    "measure_startup",
    "prepare",
    "specs",
    "warm_up",
]
