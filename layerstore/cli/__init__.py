"""The command line: argparse, one module per noun (``*_cmds.py``), errors printed once."""

from __future__ import annotations

import argparse

from ..store import Store


def open_store(args: argparse.Namespace) -> Store:
    """The store named by ``--root`` (or ``LAYERSTORE_ROOT``, or the default)."""
    return Store.open(args.root)
