"""`layerstore bench --quick` through the CLI: the suite runs end to end and writes its
JSON, Markdown and chart, with samples for every backend that can run here and every
scenario. No timing assertions (CI machines are noisy); the numbers are only looked at
for being there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.fuse]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlayfs and FUSE, drops caches: root")
def test_bench_quick(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "layerstore", "bench", "--quick",
                           "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ext in ("json", "md", "png"):
        assert (out / f"suite-quick.{ext}").stat().st_size > 0, ext
    res = json.loads((out / "suite-quick.json").read_text())
    backends = set(res["backends"])
    assert {"dir", "layerstore"} <= backends, res["skipped"]
    for name, why in res["skipped"].items():
        assert why, name  # every skip says why
    errors = "\n".join(f"{e['backend']} {e['key']}: {e['error'][:300]}" for e in res["errors"])
    have = {(s["backend"], s["scenario"]) for s in res["samples"]}
    missing = [(b, n) for n in range(1, 8) for b in sorted(backends) if (b, n) not in have]
    assert not missing, f"no samples for {missing}\nerrors:\n{errors}"
    s8 = {s["backend"] for s in res["samples"] if s["scenario"] == 8}
    assert {"layerstore import", "tar -x", "layerstore commit", "layerstore store"} <= s8, errors
    for s in res["samples"]:
        assert s["value"] > 0 and {"metric", "unit", "run", "params"} <= set(s), s
    for key in ("date", "uname_a", "packages", "tool_versions"):
        assert res["machine"].get(key), key
    md = (out / "suite-quick.md").read_text()
    assert "### The issue's bars" in md and ("PASS" in md or "MISS" in md)
    # nothing stays mounted under the work directory
    mounts = Path("/proc/self/mounts").read_text()
    assert str(work) not in mounts


def _bench_modules():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import backends
        import common
    finally:
        sys.path.pop(0)
    return backends, common


def test_retire_keeps_an_emptied_directory_until_cleanup(tmp_path: Path) -> None:
    """A spent upper is emptied, its directory kept (same inode) until the suite ends:
    on ext4 a new upper then goes to another block group than the one whose inodes
    were just freed (benchmarks/common.py, ``spread_subdirs``)."""
    bk, common = _bench_modules()
    data = bk.Data(layers=[], store=tmp_path / "store", image="x:1", plain=tmp_path / "plain",
                   scratch=tmp_path / "scratch")
    b = bk.PlainDir(data)
    up = tmp_path / "scratch" / "dir" / "upper1"
    (up / "a" / "b").mkdir(parents=True)
    (up / "a" / "b" / "f").write_bytes(b"x")
    (up / ".hidden").write_bytes(b"y")
    ino = up.stat().st_ino
    b.retire(up)
    assert not up.exists()
    [kept] = list(b.spent.iterdir())
    assert kept.stat().st_ino == ino and list(kept.iterdir()) == []
    b.cleanup()
    assert not b.spent.exists()
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, check=True,
                            text=True).stdout.strip()
    marked = common.spread_subdirs(tmp_path)
    assert marked == (fstype == "ext2/ext3")  # what stat calls ext4 too
    if marked:
        out = subprocess.run(["lsattr", "-d", str(tmp_path)], capture_output=True, text=True,
                             check=True)
        assert "T" in out.stdout.split()[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the overlay writes trusted.* xattrs: root")
def test_handler_costs_runs(tmp_path: Path) -> None:
    """``benchmarks/handler_costs.py`` (the five requests of a create, fed to the
    session's dispatcher without a mount) runs, checks its replies, cleans up, and
    prints a median for each request."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "handler_costs.py"
    proc = subprocess.run([sys.executable, str(script), "--files", "50", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for op in ("GETATTR", "LOOKUP", "CREATE", "GETXATTR", "RELEASE"):
        assert any(line.startswith(op) and line.endswith(" us") for line in
                   proc.stdout.splitlines()), (op, proc.stdout)
    assert os.listdir(tmp_path) == []  # the scratch store and upper are gone
