"""Import speed against GNU tar, and peak memory of a big import.

1. Speed: one uncompressed layer tar (``tar -C TREE --sort=name -cf layer.tar .``) of a
   generated root filesystem (default 256 MiB of file content) and, when debootstrap works,
   of two real Debian trees: minbase (~120 MiB, 5,000 files: smaller than the 200 MiB the
   bar asks for, and the hardest case, mostly small files) and minbase with
   build-essential, python3 and git (~400 MiB, like docker's ``buildpack-deps``). Each run times, interleaved and alternating in order,
   ``tar -xf layer.tar -C DIR`` into a fresh directory and
   ``python -m layerstore --root ROOT import layer.tar`` into a fresh store, both on the same
   disk (``--work``). Wall-clock, including process start-up; page cache warm (the tar is
   read once first; caches are not dropped); ``sync`` between runs, untimed. Reported:
   medians, MB/s (10^6 bytes of tar per second) and layerstore's speed as a fraction of
   tar's. Bar: >= 0.5.
   The package is byte-compiled first (``compileall``), as an installed one is.
2. Memory: peak RSS (``ru_maxrss`` from ``wait4``; RssAnon/RssFile polled) of importing a
   1 GiB layer. Bar: < 300 MiB.

    python3 benchmarks/bench_import.py [--quick] [--runs 5] [--out DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import rootfs  # noqa: E402

SPEED_BAR = 0.5
RSS_BAR_MIB = 300


def generated_tree(work: Path, size_mib: int, seed: int) -> Path:
    return common.cached(work / f"gen-{size_mib}MiB-s{seed}",
                         lambda tmp: rootfs.generate(tmp, size_mib, seed))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def speed(name: str, tree: Path, tar: Path, runs: int, scratch: Path) -> dict[str, Any]:
    """Interleaved runs of tar -x and layerstore import, each into a fresh target.

    Nothing is deleted between runs: the work filesystem may be mounted with ``discard``
    (it is here), and blocks freed by an ``rm -rf`` slow down the next writer for many
    seconds, whichever tool that is. ``scratch`` is removed at the end of the benchmark."""
    samples: dict[str, list[float]] = {"tar": [], "layerstore": []}
    df = None
    for i in range(runs):
        order = ["tar", "layerstore"] if i % 2 == 0 else ["layerstore", "tar"]
        for what in order:
            common.warm(tar)
            target = scratch / f"{slug(name)}-{what}-{i}"
            if what == "tar":
                target.mkdir(parents=True)
                seconds, _ = common.timed(["tar", "-xf", tar, "-C", target])
            else:
                seconds, _ = common.timed(common.ls_cmd(target, "import", tar),
                                          env=common.ls_env())
                if df is None:
                    df = common.ls_df(target)
            samples[what].append(seconds)
            os.sync()  # untimed: this run's writeback does not land in the next one
        print(f"  {name} run {i + 1}/{runs}: tar {samples['tar'][-1]:.2f}s, "
              f"layerstore {samples['layerstore'][-1]:.2f}s", file=sys.stderr)
    size = tar.stat().st_size
    med = {k: common.median(v) for k, v in samples.items()}
    ratio = med["tar"] / med["layerstore"]
    pair_ratios = [t / s for t, s in zip(samples["tar"], samples["layerstore"], strict=True)]
    return {"dataset": name, "tree": str(tree), "tar": str(tar), "tar_bytes": size,
            "tree_stats": rootfs.tree_stats(tree), "runs": runs, "samples_s": samples,
            "median_s": med, "min_s": {k: min(v) for k, v in samples.items()},
            "max_s": {k: max(v) for k, v in samples.items()},
            "mb_s": {k: common.mb_s(size, v) for k, v in med.items()},
            "speed_ratio": ratio, "pair_ratios": pair_ratios,
            "median_pair_ratio": common.median(pair_ratios),
            "bar": SPEED_BAR, "pass": ratio >= SPEED_BAR,
            "df_after_one_import": df}


def peak_rss(tar: Path, root: Path) -> dict[str, Any]:
    """Peak RSS of one import: exact ru_maxrss from wait4(), plus the peaks of its anonymous
    and file-backed parts (RssAnon, RssFile: the LMDB map is file-backed) polled from
    /proc/PID/status every 20 ms."""
    cmd = common.ls_cmd(root, "import", tar)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    with open(root.with_name(root.name + ".stderr"), "w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=common.ls_env())
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"import failed (exit {p.returncode}): {err.read()[-3000:]}")
    rss_mib = usage.ru_maxrss / 1024
    return {"tar": str(tar), "tar_bytes": tar.stat().st_size, "peak_rss_mib": rss_mib,
            "peak_rss_anon_mib": peaks["RssAnon"] / 1024,
            "peak_rss_file_mib": peaks["RssFile"] / 1024,
            "seconds": seconds, "mb_s": common.mb_s(tar.stat().st_size, seconds),
            "method": "wait4 ru_maxrss; RssAnon/RssFile polled", "bar_mib": RSS_BAR_MIB,
            "pass": rss_mib < RSS_BAR_MIB, "df": common.ls_df(root)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.common_args(ap)
    ap.add_argument("--runs", type=int, help="runs per dataset (default 5, quick 3)")
    ap.add_argument("--size-mib", type=int, help="generated tree size (default 256, quick 24)")
    ap.add_argument("--rss-mib", type=int, help="layer size for the memory test "
                    "(default 1024, quick 64; 0 skips it)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-debootstrap", action="store_true",
                    help="only the generated tree (quick mode never uses debootstrap)")
    a = ap.parse_args(argv)
    runs = a.runs or (3 if a.quick else 5)
    size_mib = a.size_mib or (24 if a.quick else 256)
    rss_mib = a.rss_mib if a.rss_mib is not None else (64 if a.quick else 1024)
    common.require_layerstore()
    # Byte-compile the package once, as an installed package is: with
    # PYTHONDONTWRITEBYTECODE set (this machine's environment sets it) every run would
    # otherwise compile layerstore's modules again (~0.1 s of start-up).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(common.REPO / "layerstore")],
                   check=True, stdout=subprocess.DEVNULL)
    load_at_start = common.machine_info()["other_busy_processes"]
    work = a.work / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)

    datasets = [(f"generated {size_mib} MiB (seed {a.seed})",
                 generated_tree(work, size_mib, a.seed))]
    if not a.quick and not a.no_debootstrap:
        for name, cache, include in [
                ("debootstrap minbase bookworm", "debootstrap-bookworm-minbase", ()),
                ("debootstrap bookworm + build-essential, python3, git",
                 "debootstrap-bookworm-build", rootfs.BUILD_TOOLS)]:
            deb = rootfs.debootstrap_rootfs(common.DEFAULT_WORK / cache, include=include)
            if deb is not None:
                datasets.append((name, deb))
            else:
                print(f"no {name} tree: skipped", file=sys.stderr)
    tars = [common.make_layer_tar(tree, work / f"{tree.name}.tar") for _, tree in datasets]
    scratch = work / "runs"
    if scratch.exists():
        common.rmtree(scratch)
    os.sync()
    results = []
    with common.hold_free_page_reporting() as page_reporting:
        for (name, tree), tar in zip(datasets, tars, strict=True):
            print(f"speed: {name}: {common.human(tar.stat().st_size)} tar", file=sys.stderr)
            results.append(speed(name, tree, tar, runs, scratch))

    rss = None
    if rss_mib:
        tree = generated_tree(work, rss_mib, a.seed + 1)
        tar = common.make_layer_tar(tree, work / f"{tree.name}.tar")
        print(f"memory: importing {common.human(tar.stat().st_size)}", file=sys.stderr)
        common.warm(tar)
        rss = peak_rss(tar, scratch / "rss-store")
    common.rmtree(scratch)

    info = common.machine_info(work)
    info["free_page_reporting"] = page_reporting
    rows = [[r["dataset"], common.human(r["tar_bytes"]), r["tree_stats"]["files"],
             f"{r['median_s']['tar']:.2f} ({r['min_s']['tar']:.2f}-{r['max_s']['tar']:.2f})",
             f"{r['mb_s']['tar']:.0f}",
             f"{r['median_s']['layerstore']:.2f} ({r['min_s']['layerstore']:.2f}-"
             f"{r['max_s']['layerstore']:.2f})", f"{r['mb_s']['layerstore']:.0f}",
             f"{r['speed_ratio']:.2f}x", f"{r['median_pair_ratio']:.2f}x",
             f"{r['min_s']['tar'] / r['min_s']['layerstore']:.2f}x",
             "pass" if r["pass"] else "FAIL"]
            for r in results]
    md = [f"### Import speed vs GNU tar -x ({runs} interleaved runs, warm page cache)", "",
          "Each run: a fresh target directory / store root; wall clock including process "
          "start-up; tar does not fsync, layerstore's commits are what its CLI does. "
          "MB/s = 10^6 bytes of layer tar per second, from the medians.", "",
          common.md_table(["layer", "tar size", "files", "tar -xf s (min-max)", "tar MB/s",
                           "layerstore import s (min-max)", "import MB/s",
                           "import/tar speed (medians)", "median of per-run ratios",
                           "best/best", f"bar >= {SPEED_BAR}x"], rows)]
    if rss:
        md += ["", "### Peak memory of one import", "",
               common.md_table(["layer tar", "peak RSS", "of which anon / file-backed (peaks)",
                                "import s", "MB/s", f"bar < {RSS_BAR_MIB} MiB"],
                               [[common.human(rss["tar_bytes"]), f"{rss['peak_rss_mib']:.0f} MiB",
                                 f"{rss['peak_rss_anon_mib']:.0f} / "
                                 f"{rss['peak_rss_file_mib']:.0f} MiB",
                                 f"{rss['seconds']:.1f}", f"{rss['mb_s']:.0f}",
                                 "pass" if rss["pass"] else "FAIL"]]),
               "", "Peak RSS is ru_maxrss from wait4(); the anon and file-backed parts are "
               "the peaks of RssAnon and RssFile polled every 20 ms (file-backed pages "
               "are the LMDB map and libraries: the kernel can drop them)."]
    md += ["", f"Machine: {common.machine_line(info)}. "
           f"Command: `{common.command_line()}`."]
    name = "import-quick" if a.quick else "import"
    common.write_results(a.out, name, {"benchmark": "import", "quick": a.quick, "machine": info,
                                       "busy_at_start": load_at_start,
                                       "command": common.command_line(),
                                       "speed": results, "memory": rss}, "\n".join(md))
    common.bar_chart(a.out, name, "Import speed: layerstore vs tar -x",
                     [r["dataset"] for r in results],
                     {"tar -xf": [r["mb_s"]["tar"] for r in results],
                      "layerstore import": [r["mb_s"]["layerstore"] for r in results]}, "MB/s")


if __name__ == "__main__":
    main()
