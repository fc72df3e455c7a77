"""Shared helpers for the benchmarks: machine info, timing, medians, output.

Every benchmark writes ``NAME.json`` (machine, parameters, raw samples, summary) and
``NAME.md`` (the Markdown table, also printed) into ``--out`` (default
``benchmarks/results/``), plus ``NAME.png`` when matplotlib (the ``bench`` extra) is there.
"""

from __future__ import annotations

import array
import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results"
#: Trees, tars and store roots live here (one disk with the tar extraction target).
DEFAULT_WORK = Path(os.environ.get("LAYERSTORE_BENCH_WORK", "/var/tmp/layerstore-bench"))

MiB = 1 << 20


# -- running things -----------------------------------------------------------------

def run(cmd: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its exact stderr (benchmarks must not lie)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                           f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}")
    return proc


def timed(cmd: Sequence[str | os.PathLike[str]],
          **kw: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall-clock seconds of one command (including process start-up)."""
    t0 = time.perf_counter()
    proc = run(cmd, **kw)
    return time.perf_counter() - t0, proc


def ls_env() -> dict[str, str]:
    """Environment that finds layerstore from this checkout even when not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def ls_cmd(root: Path, *args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "layerstore", "--root", str(root), *map(str, args)]


def ls_run(root: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return run(ls_cmd(root, *args), env=ls_env())


def ls_df(root: Path) -> dict[str, Any]:
    out = ls_run(root, "df", "--json").stdout
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"`layerstore df --json` did not print JSON: {out[:500]!r}") from exc


def create_store(root: Path, min_kib: int, avg_kib: int, max_kib: int,
                 compression: str = "zstd:1") -> None:
    """Create a store with these chunking parameters (a subprocess: the benchmark process
    never holds the LMDB environment while the CLI writes to it)."""
    code = (
        "import sys\n"
        "from layerstore.store import Store\n"
        "from layerstore.store.chunks import ChunkParams\n"
        "p = ChunkParams(min_size=int(sys.argv[2]) << 10, avg_size=int(sys.argv[3]) << 10,\n"
        "                max_size=int(sys.argv[4]) << 10, compression=sys.argv[5])\n"
        "Store.open(sys.argv[1], params=p).close()\n"
    )
    run([sys.executable, "-c", code, root, min_kib, avg_kib, max_kib, compression],
        env=ls_env())


def layerstore_available() -> str | None:
    """None when ``python -m layerstore --help`` works, else the error text."""
    proc = subprocess.run([sys.executable, "-m", "layerstore", "--help"],
                          capture_output=True, text=True, env=ls_env())
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()


def fresh_dir(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        rmtree(path)
    path.mkdir(parents=True)
    return path


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subdirs(path: Path) -> bool:
    """Mark the directory ``path`` a top of directory hierarchies (``chattr +T``), so
    ext4 puts each directory made in it in a block group of its own choosing, as it
    does for directories in the root; False where the filesystem has no such flag.

    Why the suite needs it: ext4 without a journal (this VM's root) will not reuse an
    inode freed in the last 60 s (300 s while its inode table block is dirty), and
    every create in that block group steps over each such inode (``recently_deleted``
    in ``find_inode_bit``: 79% of a create loop's time in ``perf``). A fresh upper made beside the
    last one lands in the same group as the 2,000 files the last measurement deleted,
    and a plain create there took ~0.8 ms of kernel CPU (1,200-1,900 files/s instead of
    40,000), whatever the mount."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & FS_TOPDIR_FL:
            flags[0] |= FS_TOPDIR_FL
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def rmtree(path: Path) -> None:
    # rm -rf is quicker than shutil on big trees and copes with odd modes
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def cached(path: Path, build: Callable[[Path], None]) -> Path:
    """Build ``path`` once: ``build(tmp)`` then rename, so a crash leaves no half result."""
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists() or tmp.is_symlink():
        rmtree(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    build(tmp)
    tmp.rename(path)
    return path


def make_layer_tar(tree: Path, tar: Path) -> Path:
    """An uncompressed layer tar of ``tree`` made by GNU tar (sorted: reproducible)."""
    def build(tmp: Path) -> None:
        run(["tar", "-C", tree, "--sort=name", "-cf", tmp, "."])
    return cached(tar, build)


def warm(path: Path) -> None:
    """Read a file once so the runs below see a warm page cache."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


# -- statistics and formatting ------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def mb_s(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10^6 bytes)."""
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- machine info and output --------------------------------------------------------

def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _busy_processes() -> list[str]:
    """Other processes using CPU right now (benchmarks on a shared machine get noisy)."""
    out = subprocess.run(["ps", "-eo", "pid=,pcpu=,args=", "--sort=-pcpu"],
                         capture_output=True, text=True).stdout.splitlines()
    busy = []
    for line in out[:8]:
        pid, pcpu, args = (line.split(None, 2) + ["", ""])[:3]
        if float(pcpu) >= 5 and int(pid) not in (os.getpid(), os.getppid()):
            busy.append(f"{pcpu}% {args[:120]}")
    return busy


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")
#: while a benchmark runs: freed memory waits this long (ms) and up to this much (MiB)
#: before the guest hands it back to the host
HOLD_FREE_MS, HOLD_WAITING_MIB = 60_000, 16384  # min_free_ms accepts at most ~5 min
#: ... and only free blocks of this order are handed back: 11 is above x86-64's largest
#: (10), so none are. With the first two alone, 256 MiB copy-ups still ranged 110-630 ms
#: in some runs of the suite (blocks were reported between runs), 83-153 ms with this.
HOLD_ORDER = 11


@contextlib.contextmanager
def hold_free_page_reporting() -> Iterator[dict[str, Any]]:
    """Keep freed memory in this VM for the duration of a benchmark.

    On a VM with free page reporting (this one: "Free page reporting enabled",
    ``min_free_ms=0``), memory the guest frees goes back to the host at once, and the
    next write to it faults on the host: the same 256 MiB copy took 300-600 ms instead of
    80-150 ms for whichever backend (or ``tar``) first allocated page cache after a
    pause, which decided medians. Root only; the old values come back afterwards.
    Yields what was done (recorded with the results)."""
    # each setting with the values to try, in order
    params = {"min_free_ms": (HOLD_FREE_MS,), "max_waiting_mib": (HOLD_WAITING_MIB,),
              # kernels that cap the order at their largest one (10) refuse 11
              "page_reporting_order": (HOLD_ORDER, HOLD_ORDER - 1)}
    old: dict[str, str] = {}
    info: dict[str, Any] = {"held": False}
    for name, values in params.items():
        path = PAGE_REPORTING / name
        try:
            old[name] = path.read_text().strip()
        except OSError:
            continue
        for value in values:
            try:
                path.write_text(str(value))
            except OSError:
                continue
            info["held"] = True
            info[name] = f"{old[name]} -> {value}"
            break
    try:
        yield info
    finally:
        for name, value in old.items():
            try:
                (PAGE_REPORTING / name).write_text(value)
            except OSError:
                pass


#: the kernel's switch for FUSE over io_uring (layerstore/fuse/uring.py)
FUSE_URING_PARAM = Path("/sys/module/fuse/parameters/enable_uring")


@contextlib.contextmanager
def hold_fuse_io_uring() -> Iterator[dict[str, Any]]:
    """Let FUSE daemons use io_uring for the duration of a benchmark (kernel 6.14+:
    ``/sys/module/fuse/parameters/enable_uring``, off by default), so that the
    layerstore backends serve their requests over it (``layerstore/fuse/uring.py``);
    ``LAYERSTORE_FUSE_URING=0`` leaves the switch alone (and the mount on /dev/fuse).
    fuse-overlayfs (libfuse 3.14) does not ask for io_uring, so the switch does not
    change it. Root only; the old value comes back afterwards. Yields what was done."""
    info: dict[str, Any] = {"used": False}
    try:
        old = FUSE_URING_PARAM.read_text().strip()
    except OSError:
        info["why_not"] = f"no {FUSE_URING_PARAM} (kernel before 6.14)"
        yield info
        return
    if os.environ.get("LAYERSTORE_FUSE_URING") == "0":
        info["why_not"] = "LAYERSTORE_FUSE_URING=0"
        yield info
        return
    try:
        FUSE_URING_PARAM.write_text("Y")
        info.update(used=True, enable_uring=f"{old} -> Y")
    except OSError as exc:
        info["why_not"] = f"cannot set {FUSE_URING_PARAM}: {exc.strerror}"
        info["used"] = old == "Y"
    try:
        yield info
    finally:
        if info.get("enable_uring"):
            try:
                FUSE_URING_PARAM.write_text(old)
            except OSError:
                pass


def machine_info(work: Path | None = None) -> dict[str, Any]:
    mem_kib = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    packages = {}
    for name in ("layerstore", "blake3", "lmdb", "pyfastcdc", "zstandard", "msgpack", "tqdm",
                 "matplotlib"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "uname": " ".join(platform.uname()),
        "uname_a": _first_line(["uname", "-a"]),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "mem_total_mib": mem_kib // 1024 if mem_kib else None,
        "python": sys.version.split()[0],
        "packages": packages,
        "tools": {t: _first_line([t, "--version"]) for t in ("tar", "gzip", "debootstrap")
                  if shutil.which(t)},
        "git_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "page_cache": "warm (caches not dropped)",
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "other_busy_processes": _busy_processes(),
    }
    if work is not None:
        info["work_dir"] = str(work)
        info["work_fs"] = _first_line(["sh", "-c", f"df -T '{work}' | tail -1"])
    return info


def command_line() -> str:
    """How this benchmark was started, relative to the repository when possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python3", str(script), *sys.argv[1:]])


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['date']}, {info['cpu']}, {info['nproc']} CPUs, "
            f"{info['mem_total_mib']} MiB RAM, Python {info['python']}, "
            f"layerstore {info['packages'].get('layerstore')}, `{info['uname_a']}`")


def write_results(out: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\n(wrote {out / name}.json and {out / name}.md)")


def bar_chart(out: Path, name: str, title: str, labels: Sequence[str],
              series: dict[str, Sequence[float]], ylabel: str) -> None:
    """A grouped bar chart ``NAME.png``; skipped quietly without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(series))), 4))
    width = 0.8 / max(1, len(series))
    for i, (sname, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=sname)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)


def common_args(parser: Any) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a few runs: a smoke test (< 60 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"results directory (default {DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help=f"scratch directory for trees, tars and stores, cached between "
                             f"runs (default {DEFAULT_WORK}; env LAYERSTORE_BENCH_WORK)")


def require_layerstore() -> None:
    err = layerstore_available()
    if err is not None:
        sys.exit(f"`{sys.executable} -m layerstore --help` fails; is layerstore importable "
                 f"(PYTHONPATH={REPO})?\n{err}")
