"""Entry point: global options, dispatch, and the one place errors are printed.

A ``LayerstoreError`` prints ``layerstore: <message>`` on one line and exits with its
``exit_code``; anything else is a bug and gets a traceback (``LAYERSTORE_DEBUG=1`` shows
tracebacks for all errors).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import LayerstoreError
from . import bench_cmds, container_cmds, demo_cmds, image_cmds, store_cmds

MODULES = [image_cmds, container_cmds, store_cmds, demo_cmds, bench_cmds]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerstore",
        description="Content-addressed container image layer store and FUSE container mounts.",
    )
    p.add_argument("--root", type=Path, default=None,
                   help="store root (env LAYERSTORE_ROOT; default /var/lib/layerstore as root, "
                        "~/.local/share/layerstore otherwise)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"layerstore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for m in MODULES:
        m.register(sub)
    # Global options are accepted after the command too (`layerstore import X -q`).
    for sp in {id(sp): sp for sp in sub.choices.values()}.values():  # aliases share one
        sp.add_argument("--root", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except LayerstoreError as exc:
        if os.environ.get("LAYERSTORE_DEBUG"):
            raise
        print(f"layerstore: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("layerstore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
