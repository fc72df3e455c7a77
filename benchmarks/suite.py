"""The copy-on-write benchmark suite (issue 4): every backend on the same data, interleaved.

    python3 benchmarks/suite.py [--quick] [--runs N] [--backends B ...] [--scenarios N ...]
        [--out DIR] [--work DIR]
    layerstore bench ...            (the same, through the CLI)

Backends (``backends.py``): dir, kernel, fuse-overlayfs, layerstore, layerstore-meta, layerstore-lazy,
layerstore-overlay; one that cannot run here is skipped with the reason. Scenarios 1-7
(``scenarios.py``) run for every backend: in each run, every measurement goes through
the backends in turn (A B C, then B C A in the next run, ...), each on a fresh mount with
an empty upper; warm measurements first, then the cold ones (``sync; echo 3 >
/proc/sys/vm/drop_caches`` after mounting), and the page cache is warmed again at the start
of each run. Scenario 8 (import, dedup, commit) compares layerstore with GNU tar.

Writes ``suite.json`` (every sample, machine, versions), ``suite.md`` (medians with
min-max, ratios, the issue's bars as PASS/MISS) and ``suite.png`` into ``--out`` (with
``-quick`` in the names for ``--quick``). Everything mounted is unmounted at the end, also
on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's layerstore

import backends as bk  # noqa: E402
import common  # noqa: E402
import scenarios as sc  # noqa: E402

HIGHER = sc.HIGHER_BETTER


def log(msg: str) -> None:
    try:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    except OSError:  # stderr closed (a pager quit): keep measuring, results still written
        pass


# -- running ------------------------------------------------------------------------

def record_error(errors: list[dict[str, Any]], backend: str, scenario: int, key: str,
                 exc: BaseException, run: int | None = None) -> None:
    """A failed measurement is kept (JSON, Markdown) and the suite goes on."""
    msg = f"{type(exc).__name__}: {exc}".strip()[:1000]
    errors.append({"backend": backend, "scenario": scenario, "key": key, "run": run,
                   "error": msg})
    log(f"  {key} on {backend}: ERROR {msg.splitlines()[0][:200]}")


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in this process (not in the mount
    daemons it forks), so the ``finally`` blocks unmount everything."""
    me = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != me:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def measure(b: bk.Backend, spec: sc.Spec, prep: sc.Prepared,
            startup: dict[str, float]) -> list[sc.Sample]:
    root = b.mount()
    ctx = sc.Ctx(backend=b, root=root, prep=prep, startup=startup)
    try:
        drops = sc.drops_so_far()
        if spec.cold:
            sc.drop_caches()
            drops += 1
        # no collection of the driver's own objects inside a timed section (a full one
        # took 28-62 ms here); they are collected after it
        gc.disable()
        try:
            got = spec.fn(ctx)
        finally:
            gc.enable()
        if sc.drops_so_far() > drops + ctx.own_drops:  # someone else dropped the caches
            for s in got:
                s.extra["caches_dropped_by_others"] = True
    except BaseException:
        teardown(b, ctx, quiet=True)  # an unmount error must not hide this one (Ctrl-C)
        raise
    teardown(b, ctx)
    # Untimed: the disk finishes this backend's writes and the discards of its deleted
    # upper (the work filesystem may be mounted with ``discard``) before the next
    # measurement. Without it a metadata-only chmod after another backend's 256 MiB
    # copy-up took 2.0 ms instead of 0.7-0.8 in 3 of 5 runs: ext4's journal commit,
    # with the discards, held up its first create.
    os.sync()
    return got


def teardown(b: bk.Backend, ctx: sc.Ctx, quiet: bool = False) -> None:
    """Undo the change (plain directory), unmount, drop the upper; when ``quiet``, failing
    that only forces the unmount."""
    try:
        for undo in reversed(ctx.undo):
            undo()
        b.umount()
    except Exception:
        if not quiet:
            raise
        b.cleanup()


def run_scenarios(backends: list[bk.Backend], specs: list[sc.Spec], prep: sc.Prepared,
                  runs: int, samples: list[dict[str, Any]], errors: list[dict[str, Any]]
                  ) -> None:
    total = runs * len(specs) * len(backends)
    done = 0
    t_start = time.monotonic()
    for run in range(runs):
        log(f"run {run + 1}/{runs}: warming the page cache ...")
        sc.warm_up(prep)
        startup = sc.measure_startup(prep.data.scratch)
        k = run % len(backends)
        order = backends[k:] + backends[:k]
        for spec in specs:
            for b in order:
                done += 1
                try:
                    got = measure(b, spec, prep, startup)
                except Exception as exc:  # recorded, and the suite goes on
                    record_error(errors, b.name, spec.scenario, spec.key, exc, run)
                    b.cleanup()
                    continue
                for s in got:
                    samples.append({"backend": b.name, "scenario": spec.scenario,
                                    "key": spec.key, "metric": s.metric, "unit": s.unit,
                                    "value": s.value, "run": run, "params": spec.params,
                                    **({"extra": s.extra} if s.extra else {})})
                brief = ", ".join(f"{s.metric} {s.value:.4g} {s.unit}" for s in got)
                eta = (time.monotonic() - t_start) / done * (total - done)
                log(f"  [{done}/{total}, ~{eta / 60:.0f} min left] {b.name}: {brief}")


def scenario8(prep: sc.Prepared, cfg: sc.Config, runs: int, work: Path,
              samples: list[dict[str, Any]], errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Import speed (layerstore import vs tar -x of the root filesystem's layer tar), commit
    of an upper (layerstore commit vs tar | sha256sum of the same upper), dedup ratio."""
    data = prep.data
    scratch = data.scratch / "s8"
    common.fresh_dir(scratch)
    tar = prep.l0_tar
    size = tar.stat().st_size
    info: dict[str, Any] = {"layer_tar": str(tar), "layer_tar_bytes": size}

    def add(backend: str, metric: str, value: float, unit: str, run: int,
            params: dict[str, Any]) -> None:
        samples.append({"backend": backend, "scenario": 8, "key": metric, "metric": metric,
                        "unit": unit, "value": value, "run": run, "params": params})

    created: list[str] = []
    try:
        for run in range(runs):
            # import: interleaved, alternating which goes first
            for what in (["tar", "ls"] if run % 2 == 0 else ["ls", "tar"]):
                common.warm(tar)
                target = scratch / f"import-{run}-{what}"
                t0 = time.perf_counter_ns()
                if what == "tar":
                    target.mkdir()
                    common.run(["tar", "-xf", tar, "-C", target])
                else:
                    sc.layerstore_cli("--root", target, "import", tar, "-q")
                dt = (time.perf_counter_ns() - t0) / 1e9
                add("tar -x" if what == "tar" else "layerstore import",
                    f"import {prep.rootfs_label} layer", size / dt / 1e6, "MB/s", run,
                    {"tar_bytes": size})
                os.sync()
            # commit of an upper of cfg.commit_bytes (new, incompressible files)
            cid = sc.layerstore_cli("--root", data.store, "create", data.image, "-q").strip()
            created.append(cid)
            upper = data.store / "containers" / cid / "upper"
            (upper / "data").mkdir(parents=True)
            half = cfg.commit_bytes // 2
            sc.random_file(upper / "data" / "big", half, f"commit-{run}-big")
            for i in range(half // sc.MiB):
                sc.random_file(upper / "data" / f"f{i:04d}", sc.MiB, f"commit-{run}-{i}")
            os.sync()
            label = f"commit {sc.human_size(cfg.commit_bytes)} upper"
            for what in (["tar", "ls"] if run % 2 == 0 else ["ls", "tar"]):
                t0 = time.perf_counter_ns()
                if what == "tar":
                    common.run(["bash", "-c", 'set -o pipefail; tar -C "$1" -cf - . | sha256sum',
                                "tar", upper])
                else:
                    sc.layerstore_cli("--root", data.store, "commit", cid, f"suite-commit:{run}",
                                      "-q")
                dt = (time.perf_counter_ns() - t0) / 1e9
                add("tar | sha256sum" if what == "tar" else "layerstore commit", label,
                    dt, "s", run, {"bytes": cfg.commit_bytes, "files": 1 + half // sc.MiB})
            log(f"  scenario 8 run {run + 1}/{runs} done")
    except Exception as exc:
        record_error(errors, "layerstore", 8, "import/commit", exc)
    finally:
        undo = [("rm", "--force", cid) for cid in created]
        undo += [("rmi", f"suite-commit:{run}") for run in range(runs)] + [("gc", "-q")]
        for args in undo:
            try:
                sc.layerstore_cli("--root", data.store, *args)
            except Exception as exc:
                if args[0] == "gc":
                    log(f"gc after the commits failed: {exc}")
        common.rmtree(scratch)

    # dedup over versions of a root filesystem (bench_dedup's series and store run)
    try:
        import bench_dedup
        dwork = work / ("quick" if cfg.quick else "full")
        dwork.mkdir(parents=True, exist_ok=True)
        label, series = bench_dedup.make_series(
            dwork, "generated" if cfg.quick else "auto", cfg.dedup_versions,
            8 if cfg.quick else cfg.gen_mib, 1)
        logical = sum(v["tar_bytes"] for v in series)
        gz = sum(bench_dedup.gzip_size(v["tar"]) for v in series)
        st = bench_dedup.store_run(series, dwork, 16, 64, 256, "zstd:1")
        stored = st["df"]["stored_bytes"]
        metric = f"dedup: {cfg.dedup_versions} versions of {label} + churn"
        add("layerstore store", metric, logical / stored, "x", 0, {"logical": logical})
        add("gzip -6 layer tars", metric, logical / gz, "x", 0, {"logical": logical})
        info["dedup"] = {"series": label, "logical_bytes": logical, "gzip_bytes": gz,
                         "stored_bytes": stored, "db_file_bytes": st["df"].get("db_file_bytes"),
                         "import_s_per_version": [v["import_s"] for v in st["versions"]]}
    except Exception as exc:
        record_error(errors, "layerstore", 8, "dedup", exc)
    return info


# -- summary, bars, output -----------------------------------------------------------

def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    units: dict[tuple[int, str], str] = {}
    order: list[tuple[int, str]] = []
    for s in samples:
        k = (s["scenario"], s["metric"])
        if k not in units:
            order.append(k)
            units[k] = s["unit"]
        groups[k][s["backend"]].append(s["value"])
    out = []
    for k in sorted(order, key=lambda k: k[0]):  # stable: first-seen order within a scenario
        per = {b: {"median": common.median(v), "min": min(v), "max": max(v), "n": len(v)}
               for b, v in groups[k].items()}
        ratios = {a: {b: per[a]["median"] / per[b]["median"] if per[b]["median"] else None
                      for b in per if b != a} for a in per}
        out.append({"scenario": k[0], "metric": k[1], "unit": units[k],
                    "higher_is_better": HIGHER[units[k]], "backends": per,
                    "ratio_of_medians": ratios})
    return out


def _find(summary: list[dict[str, Any]], pattern: str) -> dict[str, Any] | None:
    for row in summary:
        if re.fullmatch(pattern, row["metric"]):
            return row
    return None


def evaluate_bars(summary: list[dict[str, Any]], cfg: sc.Config,
                  ours: list[str]) -> list[dict[str, Any]]:
    """The issue's bars, for each layerstore backend, from this run's medians."""
    big = sc.human_size(cfg.big)
    out = []

    def absolute(bar: str, metric: str, limit_ms: float) -> None:
        row = _find(summary, re.escape(metric))
        for b in ours:
            v = row["backends"].get(b, {}).get("median") if row else None
            out.append({"bar": bar, "metric": metric, "backend": b, "vs": None,
                        "measured": v, "target": f"<= {limit_ms:g} ms",
                        "pass": None if v is None else v <= limit_ms,
                        "text": "no data" if v is None else f"{v:.3g} ms"})

    def ratio(bar: str, metric: str, other: str, op: str, limit: float) -> None:
        row = _find(summary, re.escape(metric))
        for b in ours:
            r = None
            if row and b in row["backends"] and other in row["backends"]:
                r = row["ratio_of_medians"][b][other]
            ok = None if r is None else (r <= limit if op == "<=" else r >= limit)
            unit = row["unit"] if row else ""
            text = "no data" if r is None else (
                f"{r:.2f}x ({row['backends'][b]['median']:.4g} vs "
                f"{row['backends'][other]['median']:.4g} {unit})")
            out.append({"bar": bar, "metric": metric, "backend": b, "vs": other,
                        "measured": r, "target": f"{op} {limit:g}x {other}", "pass": ok,
                        "text": text})

    for op in ("chmod", "chown", "utime"):
        absolute(f"{op} of a {big} lower file <= 1 ms", f"{op} {big}", 1.0)
    for t in ("warm", "cold"):
        ratio(f"copy-up of a {big} file ({t}) <= 1.0x fuse-overlayfs",
              f"copy-up {big} {t}", "fuse-overlayfs", "<=", 1.0)
    ratio("warm sequential read >= 0.9x kernel", f"seq read {big} warm", "kernel", ">=", 0.9)
    ratio("cold sequential read >= 0.8x kernel", f"seq read {big} cold", "kernel", ">=", 0.8)
    # (not a bar of its own: the same cold read, of a file no mount had read since the
    # store's file cache was emptied: read through the daemon; its copy is made after)
    ratio("cold sequential read, first since import (file cache empty) >= 0.8x kernel",
          f"seq read {big} first", "kernel", ">=", 0.8)
    for tool in sc.tool_argvs([]):
        ratio(f"`{tool}` first <= 2x fuse-overlayfs", f"{tool} first", "fuse-overlayfs",
              "<=", 2.0)
        ratio(f"`{tool}` warm <= 1.0x fuse-overlayfs", f"{tool} warm", "fuse-overlayfs",
              "<=", 1.0)
    ratio(f"{cfg.creates} creates >= 1.5x fuse-overlayfs files/s",
          f"create {cfg.creates} x {sc.human_size(cfg.create_size)}", "fuse-overlayfs",
          ">=", 1.5)
    ratio("randwrite first pass >= 1.0x fuse-overlayfs IOPS", "randwrite 4K first pass",
          "fuse-overlayfs", ">=", 1.0)
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """common.md_table with ``|`` inside cells escaped."""
    def esc(v: Any) -> Any:
        return v.replace("|", "\\|") if isinstance(v, str) else v
    return common.md_table([esc(h) for h in headers], [[esc(c) for c in r] for r in rows])


def markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    names = [b for b in result["backends"]]
    m = result["machine"]
    cfg = result["config"]
    lines = [f"## layerstore benchmark suite{' (--quick)' if result['quick'] else ''}", "",
             f"Date {m['date']}; {m['cpu']}, {m['nproc']} CPUs, {m['mem_total_mib']} MiB RAM; "
             f"kernel `{m['uname_a']}`; Python {m['python']}; layerstore "
             f"{m['packages'].get('layerstore')} (commit {str(m.get('git_commit'))[:10]}"
             + (f", with uncommitted changes in "
                f"{len(m['git_at_start']['dirty_files'])} files"
                if m.get("git_at_start", {}).get("dirty_files") else "") + "); "
             + "; ".join(f"{k} {v}" for k, v in m.get("tool_versions", {}).items() if v)
             + ".", "",
             f"Command: `{result['command']}`. Runs: {result['runs']} (medians; min-max in "
             f"brackets). Root filesystem: {result['data']['rootfs']} "
             f"({result['data']['rootfs_stats'].get('files')} files, "
             f"{result['data']['rootfs_stats'].get('dirs')} dirs, "
             f"{result['data']['rootfs_stats'].get('symlinks')} symlinks)"
             + (f"; the walks cover {result['data']['walk_entries']} entries of it"
                + (f" (all but {', '.join(cfg.get('walk_skip'))})" if cfg.get("walk_skip")
                   else "") if result["data"].get("walk_entries") else "") + ". "
             f"Load average at start: {' '.join(m.get('loadavg', []))}.", ""]
    uring = m.get("fuse_io_uring")
    if uring is not None:
        lines += [("The layerstore mounts served their requests over io_uring (the kernel's "
                   "`enable_uring` "
                   + uring.get("enable_uring", "was on") + " for the run)."
                   if uring.get("used") else
                   "The layerstore mounts read their requests from /dev/fuse (no FUSE over "
                   f"io_uring: {uring.get('why_not', 'off')})."), ""]
    hit = sum(1 for s in result["samples"] if s.get("extra", {}).get("caches_dropped_by_others"))
    if hit:
        lines += [f"{hit} of {len(result['samples'])} samples ran while another process "
                  "dropped the page cache (/proc/vmstat drop_pagecache rose): they are kept, "
                  "and flagged `caches_dropped_by_others` in the JSON.", ""]
    lines += ["Backends: " + "; ".join(f"**{n}**: {d}" for n, d in result["backends"].items())
              + "."]
    for n, why in result["skipped"].items():
        lines.append(f"Skipped **{n}**: {why}.")
    lines.append("")
    head = ["#", "metric", "unit"] + names
    rows = []
    for r in summary:
        if r["scenario"] == 8:
            continue
        cells = []
        for b in names:
            s = r["backends"].get(b)
            cells.append("error" if s is None else
                         f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})")
        rows.append([r["scenario"], r["metric"],
                     f"{r['unit']} {'↑' if r['higher_is_better'] else '↓'}", *cells])
    lines += ["### Medians (min-max)", "",
              "↓ lower is better, ↑ higher is better.", "", table(head, rows), ""]
    ours = [b for b in names if b.startswith("layerstore")]
    if ours:
        others = names
        rrows = []
        for r in summary:
            if r["scenario"] == 8:
                continue
            for b in ours:
                if b not in r["backends"]:
                    continue
                rrows.append([r["metric"], b] + [
                    fmt(r["ratio_of_medians"][b].get(o)) + "x"
                    if o != b and r["ratio_of_medians"][b].get(o) is not None else ""
                    for o in others])
        lines += ["### Ratios of medians (the layerstore backends against each other backend)",
                  "", "Each cell is the row backend's median divided by the column backend's, "
                  "in the metric's unit: for ms < 1 is faster, for MB/s, IOPS, files/s > 1 is "
                  "faster.", "",
                  table(["metric", "backend"] + [f"/ {o}" for o in others], rrows), ""]
    s8 = [r for r in summary if r["scenario"] == 8]
    if s8:
        srows = []
        for r in s8:
            for b, s in r["backends"].items():
                srows.append([r["metric"], b, f"{fmt(s['median'])} ({fmt(s['min'])}-"
                              f"{fmt(s['max'])}) {r['unit']}"])
            if len(r["backends"]) == 2:
                (a, sa), (b2, sb) = r["backends"].items()
                srows.append(["", f"{a} / {b2}", f"{sa['median'] / sb['median']:.2f}x"])
        lines += ["### Scenario 8: import, dedup, commit (layerstore against GNU tar)", "",
                  table(["metric", "who", "median (min-max)"], srows), ""]
    if result["bars"]:
        brows = []
        for x in result["bars"]:
            verdict = "no data" if x["pass"] is None else ("PASS" if x["pass"] else "MISS")
            brows.append([x["bar"], x["backend"], x["text"], x["target"], f"**{verdict}**"])
        lines += [f"### The issue's bars{' (quick sizes: not the real bars)' if result['quick'] else ''}",
                  "", table(["bar", "backend", "measured", "target", "verdict"], brows),
                  ""]
    if result["errors"]:
        lines += ["### Errors", ""]
        seen = set()
        for e in result["errors"]:
            key = (e["backend"], e["key"], e["error"][:120])
            if key in seen:
                continue
            seen.add(key)
            n = sum(1 for x in result["errors"]
                    if (x["backend"], x["key"], x["error"][:120]) == key)
            lines.append(f"- {e['backend']}, {e['key']} ({n}x): "
                         f"`{e['error'].splitlines()[0][:300]}`")
        lines.append("")
    lines += ["Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()) + "."]
    return "\n".join(lines)


COLORS = {"dir": "#9e9e9e", "kernel": "#1f77b4", "fuse-overlayfs": "#ff7f0e",
          "layerstore": "#2ca02c", "layerstore-meta": "#17becf", "layerstore-lazy": "#d62728",
          "layerstore-overlay": "#9467bd", "layerstore-mfusepy": "#8c564b",
          "layerstore-pyfuse3": "#e377c2", "layerstore-fusepy": "#bcbd22",
          "layerstore-wire": "#000080"}


def chart(result: dict[str, Any], path: Path) -> bool:
    """Speed of every backend relative to kernel overlayfs (or the plain directory),
    per metric, log scale: bars right of 1 are faster than the reference."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(result["backends"])
    if not names:
        return False
    ref = "kernel" if "kernel" in names else names[0]
    rows = [r for r in result["summary"] if r["scenario"] != 8 and ref in r["backends"]]
    if not rows:
        return False
    half = (len(rows) + 1) // 2
    lim = 300.0  # the floor (no copy-up at all) is 10^4 times faster: clip, and say so
    fig, axes = plt.subplots(1, 2, figsize=(16, max(6, 0.22 * len(names) * half + 2)))
    width = 0.8 / len(names)
    for ax, part in zip(axes, (rows[:half], rows[half:]), strict=True):
        for i, b in enumerate(names):
            ys, xs = [], []
            for j, r in enumerate(part):
                s = r["backends"].get(b)
                rv = r["backends"][ref]["median"]
                if s is None or not s["median"] or not rv:
                    continue
                speed = s["median"] / rv if r["higher_is_better"] else rv / s["median"]
                ys.append(j + i * width)
                xs.append(min(max(speed, 1 / lim), lim))
                if not 1 / lim <= speed <= lim:
                    ax.text(xs[-1], ys[-1], f" {speed:.3g}x", va="center", fontsize=6,
                            ha="right" if speed > 1 else "left")
            ax.barh(ys, [x - 1 for x in xs], height=width, color=COLORS.get(b),
                    label=b if b != ref else f"{b} (= 1, the black line)", left=1)
        ax.set_yticks([j + width * (len(names) - 1) / 2 for j in range(len(part))])
        ax.set_yticklabels([f"{r['scenario']}. {r['metric']}" for r in part], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(1 / lim, lim)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"speed relative to {ref} (log; > 1 = faster than {ref}; "
                      f"clipped at {lim:g}x)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    m = result["machine"]
    fig.suptitle(f"layerstore benchmark suite{' (--quick)' if result['quick'] else ''}: "
                 f"medians of {result['runs']} runs, {m['date'][:10]}, {m['nproc']} CPUs, "
                 f"kernel {m['uname'].split()[2]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def tool_versions() -> dict[str, str | None]:
    def first(cmd: list[str]) -> str | None:
        if shutil.which(cmd[0]) is None:
            return None
        p = subprocess.run(cmd, capture_output=True, text=True)
        text = (p.stdout + p.stderr).strip().splitlines()
        text = [t for t in text if t.startswith(cmd[0])]
        return text[0].strip() if text else None
    out = {"fuse-overlayfs": first(["fuse-overlayfs", "--version"]),
           "fio": first(["fio", "--version"])}
    from importlib import metadata
    for pkg in ("fusepy", "mfusepy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    for p in ("redirect_dir", "metacopy", "index", "xino_auto"):
        try:
            v = Path(f"/sys/module/overlay/parameters/{p}").read_text().strip()
            out[f"overlay {p}"] = v
        except OSError:
            pass
    return out


# -- main -----------------------------------------------------------------------------

def write_all(result: dict[str, Any], out: Path, name: str) -> None:
    """NAME.json, NAME.md (also printed) and NAME.png from one result."""
    common.write_results(out, name, result, markdown(result))
    if chart(result, out / f"{name}.png"):
        print(f"(wrote {out / name}.png)")
    else:
        print("(no chart: matplotlib is not installed; pip install -e '.[bench]')")


def parse(argv: list[str] | None) -> argparse.Namespace:
    from layerstore.cli.bench_cmds import add_arguments

    ap = argparse.ArgumentParser(prog="python3 benchmarks/suite.py",
                                 description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--from-json", type=Path, metavar="JSON",
                    help="measure nothing: write the Markdown and chart of an earlier "
                    "run's JSON again (into --out, default next to it)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    a = parse(args)
    if a.from_json:
        result = json.loads(a.from_json.read_text())
        write_all(result, a.out or a.from_json.parent, a.from_json.stem)
        return 0
    return run(a, " ".join(["python3 benchmarks/suite.py", *args]))


def import_layerstore() -> None:
    """Import every layerstore module now. The mount daemons are forks of this process and
    would otherwise import the overlay and FUSE code from the working tree at each mount:
    a tree being edited mid-run must not change the code under test."""
    import importlib
    import pkgutil

    import layerstore
    for m in pkgutil.walk_packages(layerstore.__path__, "layerstore."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)


def git_state() -> dict[str, Any]:
    """The commit measured, and the files that differed from it (a shared working tree)."""
    out = subprocess.run(["git", "-C", str(common.REPO), "status", "--porcelain",
                          "--untracked-files=no"], capture_output=True, text=True).stdout
    return {"dirty_files": [line[3:] for line in out.splitlines()]}


def run(a: argparse.Namespace, command: str) -> int:
    """The suite with parsed options (``layerstore bench`` calls this)."""
    import_layerstore()
    git = git_state()
    a.out = a.out or common.DEFAULT_OUT
    a.work = a.work or common.DEFAULT_WORK
    cfg = sc.QUICK if a.quick else sc.ISSUE if a.issue_sizes else sc.FULL
    runs = a.runs or cfg.runs
    wanted = a.backends or bk.ALL
    scen = sorted(set(a.scenarios or range(1, 9)))
    if os.geteuid() != 0:
        log("not root: kernel overlayfs and dropping caches need root; expect skips")
    t0 = time.monotonic()
    prep = sc.prepare(a.work, cfg, log)
    samples: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    live: list[bk.Backend] = []
    s8: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    interrupted = False
    cmd = command
    with interrupts_raise(), common.hold_free_page_reporting() as page_reporting, \
            common.hold_fuse_io_uring() as fuse_uring:
        try:
            specs = [s for s in sc.specs(cfg) if s.scenario in scen]
            if specs:
                live, skipped = bk.make_backends(prep.data, wanted)
                if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
                    specs = [s for s in specs if not s.cold]
                    skipped["cold measurements"] = "/proc/sys/vm/drop_caches is not writable"
                log("backends: " + ", ".join(b.name for b in live)
                    + "".join(f"; skipped {n}: {w}" for n, w in skipped.items()))
                sc.mark_plain_dirty(prep, True)
                run_scenarios(live, specs, prep, runs, samples, errors)
                sc.mark_plain_dirty(prep, False)
            if 8 in scen:
                s8 = scenario8(prep, cfg, runs, a.work, samples, errors)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: unmounting and writing what was measured")
        except Exception as exc:  # a bug of the suite: still unmount and write the samples
            interrupted = True
            record_error(errors, "suite", 0, "suite", exc)
        finally:
            for b in live:
                b.cleanup()
            for p in prep.data.scratch.glob("*/mnt"):
                if bk.is_mounted(p):
                    bk.force_unmount(p)
            bk.kill_leftovers(prep.data.scratch)
    summary = summarize(samples)
    ours = [b.name for b in live if b.name.startswith("layerstore")]
    machine = common.machine_info(a.work)
    machine["tool_versions"] = tool_versions()
    machine["git_at_start"] = git
    machine["page_cache"] = "warm, except the cold measurements (drop_caches after mounting)"
    machine["free_page_reporting"] = page_reporting
    machine["fuse_io_uring"] = fuse_uring
    result = {"suite": "layerstore bench", "command": cmd, "quick": a.quick, "runs": runs,
              "interrupted": interrupted, "seconds": time.monotonic() - t0,
              "machine": machine, "config": {**cfg.__dict__, "runs": runs},
              "data": {"rootfs": prep.rootfs_label, "rootfs_stats": prep.rootfs_stats,
                       "walk_entries": sc.count_entries(prep.data.layers[0], prep.walk_names),
                       "layers": [str(p) for p in prep.data.layers],
                       "store": str(prep.data.store), "scenario8": s8},
              "scenarios": {n: sc.SCENARIOS[n] for n in scen},
              "backends": {b.name: b.description for b in live},
              "skipped": skipped, "samples": samples, "errors": errors,
              "summary": summary,
              "bars": evaluate_bars(summary, cfg, ours) if live else []}
    write_all(result, a.out, "suite-quick" if a.quick else "suite")
    log(f"done in {(time.monotonic() - t0) / 60:.1f} min")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
