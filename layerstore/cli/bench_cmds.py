"""``layerstore bench``: the benchmark suite of ``benchmarks/suite.py``, run from the source tree.

The suite lives in ``benchmarks/`` next to the package (DESIGN.md section 1), not in the
package: it needs the checkout (an editable install). Installed from a wheel, the command
says so in one line. The options are defined here once and used by the suite as well.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

BACKENDS = ["dir", "kernel", "fuse-overlayfs", "layerstore", "layerstore-meta",
            "layerstore-lazy", "layerstore-overlay"]
#: run only when named: ``layerstore-meta`` on one chosen FUSE binding each
#: (``LAYERSTORE_FUSE``; see layerstore/fuse/binding.py): fusepy/libfuse2, mfusepy/libfuse3
#: (libfuse's high-level API), pyfuse3/libfuse3 (the low-level API) and the protocol
#: spoken on /dev/fuse directly (wire.py); and wire.py reading /dev/fuse instead of
#: io_uring (``layerstore-devfuse``; see layerstore/fuse/uring.py)
EXTRA_BACKENDS = ["layerstore-fusepy", "layerstore-mfusepy", "layerstore-pyfuse3",
                  "layerstore-wire", "layerstore-devfuse"]
BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's options (``layerstore bench`` and ``python3 benchmarks/suite.py``)."""
    p.add_argument("--quick", action="store_true",
                   help="small sizes, one run: every backend and scenario in < 2 minutes")
    p.add_argument("--issue-sizes", action="store_true",
                   help="the issue's full sizes (1 GiB file, 5,000 creates, full random-write "
                   "passes, the whole root filesystem): over an hour with today's mount")
    p.add_argument("--runs", type=int, help="runs; medians over them (default 5, quick 1)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS + EXTRA_BACKENDS, metavar="B",
                   help=f"backends (default: all that can run here: {' '.join(BACKENDS)}; "
                        f"also: {' '.join(EXTRA_BACKENDS)})")
    p.add_argument("--scenarios", nargs="+", type=int, choices=range(1, 9), metavar="N",
                   help="scenarios 1-8 (default all)")
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    p.add_argument("--work", type=Path, help="data, store and mounts (default "
                   "/var/tmp/layerstore-bench, env LAYERSTORE_BENCH_WORK)")


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (from a source checkout)",
                       description="The copy-on-write benchmark suite: layerstore against "
                       "kernel overlayfs, fuse-overlayfs and a plain directory on the same "
                       "data, interleaved; writes JSON, Markdown and a PNG chart.")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if not (BENCH_DIR / "suite.py").is_file():
        raise UsageError(f"the benchmark suite is not here ({BENCH_DIR / 'suite.py'}): "
                         "`layerstore bench` runs from a source checkout (pip install -e)")
    sys.path.insert(0, str(BENCH_DIR))
    suite = importlib.import_module("suite")
    return int(suite.run(args, command="layerstore " + " ".join(sys.argv[1:])))
