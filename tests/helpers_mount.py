"""Fixtures and helpers shared by the mount tests (imported by them; not a test file)."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from layerstore.oci.sample import write_demo_layout


@pytest.fixture
def demo(tmp_path: Path, cli):
    layout = tmp_path / "demo-oci"
    write_demo_layout(layout)
    cli("import", layout)
    return layout


def unmount_all(root: Path) -> None:
    """Teardown: unmount whatever a test left mounted under this store's mounts."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if parts[0].startswith("layerstore:") and str(root.parent) in parts[1]:
            subprocess.run(["fusermount3", "-u", "-z", parts[1]], capture_output=True)
            subprocess.run(["umount", "-l", parts[1]], capture_output=True)


@pytest.fixture
def mnt(tmp_path: Path, root: Path):
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    unmount_all(root)


def extract_as_overlay_lower(tar: Path, dest: Path) -> None:
    """One layer as a kernel-overlayfs lower directory: entries extracted by GNU tar,
    ``.wh.X`` as a 0/0 character device X, ``.wh..wh..opq`` as trusted.overlay.opaque."""
    dest.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                    str(tar), "-C", str(dest), "--exclude=.wh.*"], check=True)
    with tarfile.open(tar) as tf:
        for m in tf:
            parent, _, leaf = m.name.strip("./").rpartition("/")
            d = dest / parent if parent else dest
            if leaf == ".wh..wh..opq":
                os.setxattr(d, "trusted.overlay.opaque", b"y")
            elif leaf.startswith(".wh."):
                d.mkdir(parents=True, exist_ok=True)
                os.mknod(d / leaf[4:], 0o600 | 0o020000, os.makedev(0, 0))
