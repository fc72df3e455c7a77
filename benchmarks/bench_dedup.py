"""Dedup across a series of root filesystem versions, to choose the chunking parameters.

The series: version 0 is a real debootstrap minbase tree (or, when that fails or with
``--source generated``, a generated one), and each next version is churned from the one
before (``rootfs.churn``: ~7% of files edited, 20% of files >= 1 MiB edited in place,
~1% deleted, ~1.5% added). Each version becomes one uncompressed layer tar (a full snapshot).

Measured:
- logical bytes (sum of the layer tars) and the sum of ``gzip -6`` of each tar (what a
  registry would keep for these layers without any cross-layer dedup);
- computed directly in Python (blake3): unique bytes under whole-file dedup, fixed-size
  chunks, and FastCDC at each parameter set, plus an estimate of what those unique chunks
  take compressed the way the store does (zstd, kept only when it saves >= 10%, +1 byte);
- through the CLI: for each CDC parameter set a fresh store (created with those parameters),
  every version imported in order (``layerstore import``, timed), ``layerstore df --json``
  after each import (stored bytes, chunk count).

    python3 benchmarks/bench_dedup.py [--quick] [--versions 6] [--source auto|debootstrap|generated]
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import rootfs  # noqa: E402

DEFAULT_PARAMS = "4/16/64,16/64/256,64/256/1024"


# -- the series ----------------------------------------------------------------------

def make_series(work: Path, source: str, versions: int, size_mib: int, seed: int
                ) -> tuple[str, list[dict[str, Any]]]:
    """Trees and tars of every version (cached in ``work``). Returns (base name, versions)."""
    base = None
    if source in ("auto", "debootstrap"):
        base = rootfs.debootstrap_rootfs(common.DEFAULT_WORK / "debootstrap-bookworm-minbase")
        if base is None and source == "debootstrap":
            sys.exit("debootstrap failed and --source debootstrap was asked for")
    if base is not None:
        label, sdir = "debootstrap minbase bookworm", work / f"series-debootstrap-s{seed}"
        build0 = lambda tmp: common.run(["cp", "-a", "--", base, tmp])  # noqa: E731
    else:
        if source == "auto":
            print("falling back to a generated base tree", file=sys.stderr)
        label, sdir = f"generated {size_mib} MiB", work / f"series-gen{size_mib}-s{seed}"
        build0 = lambda tmp: rootfs.generate(tmp, size_mib, seed)  # noqa: E731
    out = []
    prev = sdir / "v0"
    for v in range(versions):
        tree = sdir / f"v{v}"
        stats_file = sdir / f"v{v}.churn.json"
        if not tree.exists():
            print(f"making version {v} ...", file=sys.stderr)
            churn: dict[str, int] = {}

            def build(tmp: Path, src: Path = prev, v: int = v, churn: dict = churn) -> None:
                churn.update(rootfs.churn(src, tmp, v, seed))

            common.cached(tree, build0 if v == 0 else build)
            stats_file.write_text(json.dumps(churn))
        churn_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        tar = common.make_layer_tar(tree, sdir / f"v{v}.tar")
        out.append({"version": v, "tree": tree, "tar": tar, "tar_bytes": tar.stat().st_size,
                    "churn": churn_stats, "tree_stats": rootfs.tree_stats(tree)})
        prev = tree
    return label, out


def gzip_size(tar: Path) -> int:
    p = subprocess.Popen(["gzip", "-6", "-c", str(tar)], stdout=subprocess.PIPE)
    assert p.stdout is not None
    n = 0
    while chunk := p.stdout.read(1 << 20):
        n += len(chunk)
    if p.wait() != 0:
        raise RuntimeError(f"gzip failed on {tar}")
    return n


# -- dedup computed directly -----------------------------------------------------------

def cdc_chunker(min_kib: int, avg_kib: int, max_kib: int) -> Any:
    """The chunker the store uses for these parameters (its own code when importable)."""
    try:
        sys.path.insert(0, str(common.REPO))
        from layerstore.store.chunks import ChunkParams
        return ChunkParams(min_kib << 10, avg_kib << 10, max_kib << 10).chunker()
    except ImportError:  # same convention as layerstore/store/chunks.py
        import pyfastcdc
        return pyfastcdc.FastCDC(max(256, (avg_kib - min_kib) << 10),
                                 min_size=min_kib << 10, max_size=max_kib << 10)


class Method:
    """Unique chunks under one way of cutting files."""

    def __init__(self, name: str, cut: Any, compressor: Any):
        self.name, self.cut, self.z = name, cut, compressor
        self.seen: set[bytes] = set()
        self.unique_bytes = 0
        self.est_stored = 0
        self.per_version: list[int] = []  # cumulative unique bytes after each version

    def add(self, data: bytes) -> None:
        mv = memoryview(data)
        for off, length in self.cut(data):
            piece = mv[off:off + length]
            d = blake3.blake3(piece).digest()
            if d in self.seen:
                continue
            self.seen.add(d)
            self.unique_bytes += length
            stored = length
            if self.z is not None:
                c = len(self.z.compress(piece))
                if c <= length * 0.9:
                    stored = c
            self.est_stored += stored + 1  # the codec byte


def whole(data: bytes) -> list[tuple[int, int]]:
    return [(0, len(data))] if data else []


def fixed(size: int) -> Any:
    return lambda data: [(o, min(size, len(data) - o)) for o in range(0, len(data), size)]


def cdc(chunker: Any) -> Any:
    return lambda data: [(c.offset, c.length) for c in chunker.cut_buf(data)]


def direct_dedup(series: list[dict[str, Any]], params: list[tuple[int, int, int]],
                 fixed_kib: int, compression: str) -> tuple[list[Method], int]:
    level = int(compression.partition(":")[2] or 3) if compression != "none" else None
    z = zstandard.ZstdCompressor(level=level) if level is not None else None
    methods = [Method("file-level (whole-file blake3)", whole, z),
               Method(f"fixed {fixed_kib} KiB chunks", fixed(fixed_kib << 10), z)]
    methods += [Method(f"FastCDC {mn}/{av}/{mx} KiB", cdc(cdc_chunker(mn, av, mx)), z)
                for mn, av, mx in params]
    seen_files: set[bytes] = set()
    content = 0
    for v in series:
        inodes: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(v["tree"]):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in inodes:
                    continue  # hard links: content counted once per layer
                inodes.add((st.st_dev, st.st_ino))
                content += st.st_size
                with open(p, "rb") as f:
                    data = f.read()
                fd = blake3.blake3(data).digest()
                if fd in seen_files:  # same content -> same chunks under every method
                    continue
                seen_files.add(fd)
                for m in methods:
                    m.add(data)
        for m in methods:
            m.per_version.append(m.unique_bytes)
        print(f"  direct dedup: version {v['version']} done", file=sys.stderr)
    return methods, content


# -- dedup through the store -----------------------------------------------------------

def store_run(series: list[dict[str, Any]], work: Path, mn: int, av: int, mx: int,
              compression: str) -> dict[str, Any]:
    root = work / f"dedup-store-{mn}-{av}-{mx}"
    if root.exists():
        common.rmtree(root)
    common.create_store(root, mn, av, mx, compression)
    per_version = []
    for v in series:
        common.warm(v["tar"])
        seconds, proc = common.timed(common.ls_cmd(root, "import", v["tar"], "--tag",
                                                   f"series:v{v['version']}"),
                                     env=common.ls_env())
        df = common.ls_df(root)
        per_version.append({"version": v["version"], "import_s": seconds,
                            "image_id": proc.stdout.strip(), "df": df})
        print(f"  store {mn}/{av}/{mx}: v{v['version']} {seconds:.2f}s, stored "
              f"{common.human(df.get('stored_bytes', 0))}", file=sys.stderr)
    common.rmtree(root)
    total_s = sum(p["import_s"] for p in per_version)
    return {"params_kib": [mn, av, mx], "compression": compression, "versions": per_version,
            "import_s_total": total_s, "df": per_version[-1]["df"]}


# -- report -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.common_args(ap)
    ap.add_argument("--versions", type=int, help="versions in the series (default 6, quick 5)")
    ap.add_argument("--source", choices=("auto", "debootstrap", "generated"),
                    help="base of the series (default auto: debootstrap, else generated; "
                         "quick: generated)")
    ap.add_argument("--size-mib", type=int,
                    help="generated base size (default 200, quick 8)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--params", default=DEFAULT_PARAMS,
                    help=f"CDC min/avg/max in KiB, comma separated (default {DEFAULT_PARAMS})")
    ap.add_argument("--fixed-kib", type=int, default=64)
    ap.add_argument("--compression", default="zstd:1", help="store codec: none or zstd:N")
    a = ap.parse_args(argv)
    versions = a.versions or (5 if a.quick else 6)
    source = a.source or ("generated" if a.quick else "auto")
    size_mib = a.size_mib or (8 if a.quick else 200)
    params = [tuple(int(x) for x in p.split("/")) for p in a.params.split(",")]
    common.require_layerstore()
    work = a.work / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)

    label, series = make_series(work, source, versions, size_mib, a.seed)
    logical = sum(v["tar_bytes"] for v in series)
    print("gzip -6 of every layer tar ...", file=sys.stderr)
    for v in series:
        v["gzip_bytes"] = gzip_size(v["tar"])
    gz_total = sum(v["gzip_bytes"] for v in series)
    methods, content = direct_dedup(series, params, a.fixed_kib, a.compression)
    stores = [store_run(series, work, mn, av, mx, a.compression) for mn, av, mx in params]

    info = common.machine_info(work)
    by_params = {tuple(s["params_kib"]): s for s in stores}
    rows = [["logical: sum of layer tars", "", common.human(logical), "", "1.00x", "", "", ""],
            ["sum of gzip -6 layer tars", "", "", common.human(gz_total),
             f"{logical / gz_total:.2f}x", "", "", ""]]
    for m, p in zip(methods, [None, None, *params], strict=True):
        row = [m.name, len(m.seen), common.human(m.unique_bytes),
               common.human(m.est_stored), f"{logical / m.est_stored:.2f}x"]
        s = by_params.get(p) if p else None
        if s:
            stored = s["df"].get("stored_bytes")
            row += [f"{common.human(stored)} ({s['df'].get('chunk_count')} chunks, "
                    f"{logical / stored:.2f}x)" if stored else "?",
                    common.human(s["df"].get("db_file_bytes", 0)),
                    f"{s['import_s_total']:.1f} s "
                    f"({common.mb_s(logical, s['import_s_total']):.0f} MB/s)"]
        else:
            row += ["", "", ""]
        rows.append(row)
    vrows = []
    for i, v in enumerate(series):
        c = v["churn"]
        vrows.append([f"v{v['version']}", common.human(v["tar_bytes"]), v["tree_stats"]["files"],
                      f"{c.get('modified', '')}/{c.get('big_edited', '')}/{c.get('added', '')}"
                      f"/{c.get('deleted', '')}" if c else "base",
                      common.human(v["gzip_bytes"])]
                     + [common.human(m.per_version[i] - (m.per_version[i - 1] if i else 0))
                        for m in methods]
                     + [common.human(s["versions"][i]["df"].get("stored_bytes", 0)
                                     - (s["versions"][i - 1]["df"].get("stored_bytes", 0)
                                        if i else 0))
                        for s in stores])
    cmd = common.command_line()
    md = [f"### Dedup over {versions} versions of a root filesystem ({label} + churn)", "",
          f"Content (regular files, all versions): {common.human(content)}; "
          f"logical (layer tars): {common.human(logical)}. "
          f"'est. stored' compresses each unique chunk with {a.compression} as the store does; "
          f"'ratio' is logical / est. stored.", "",
          common.md_table(["method", "unique chunks", "unique bytes", "est. stored", "ratio",
                           "layerstore stored_bytes (df)", "LMDB file (df db_file_bytes)",
                           "layerstore import, all versions"],
                          rows),
          "", "### Bytes each version adds", "",
          "churn = files modified / big files edited / added / deleted. Columns after gzip: "
          "new unique bytes (uncompressed) per method, then new stored bytes per store.", "",
          common.md_table(["version", "tar", "files", "churn", "gzip -6"]
                          + [m.name.split(" (")[0] for m in methods]
                          + [f"store {s['params_kib'][0]}/{s['params_kib'][1]}/"
                             f"{s['params_kib'][2]}" for s in stores], vrows),
          "", f"Machine: {common.machine_line(info)}. Command: `{cmd}`."]
    name = "dedup-" + ("debootstrap" if label.startswith("debootstrap") else "generated") \
        + ("-quick" if a.quick else "")
    data = {"benchmark": "dedup", "quick": a.quick, "command": cmd, "machine": info,
            "series": label,
            "versions": [{k: (str(x) if isinstance(x, Path) else x) for k, x in v.items()}
                         for v in series],
            "logical_bytes": logical, "gzip_total_bytes": gz_total, "content_bytes": content,
            "compression": a.compression,
            "direct": [{"method": m.name, "unique_chunks": len(m.seen),
                        "unique_bytes": m.unique_bytes,
                        "est_stored_bytes": m.est_stored,
                        "cumulative_unique_bytes": m.per_version} for m in methods],
            "stores": stores}
    common.write_results(a.out, name, data, "\n".join(md))
    common.bar_chart(a.out, name, f"Bytes kept for {versions} versions ({label})",
                     ["logical", "gzip -6"] + [m.name.split(" (")[0] for m in methods],
                     {"bytes (GB)": [logical / 1e9, gz_total / 1e9]
                      + [m.est_stored / 1e9 for m in methods]}, "GB")


if __name__ == "__main__":
    main()
