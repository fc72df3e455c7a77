"""The read-only view of an image: merged-lower semantics without FUSE, and real FUSE
mounts through the CLI (``layerstore mount --read-only``), always unmounted."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers_images import apply_layer, tree_manifest
from helpers_mount import extract_as_overlay_lower

from layerstore.overlay.lower import MergedLowers, StoreLayers
from layerstore.store import Store
from layerstore.store.images import resolve


def _expected_tree(tmp_path: Path, cli, ref: str) -> Path:
    out = tmp_path / "exported"
    cli("export", ref, out)
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    tree = tmp_path / "applied"
    tree.mkdir()
    for layer in manifest["layers"]:
        apply_layer(out / "blobs/sha256" / layer["digest"].split(":")[1], tree)
    return tree


def test_merged_lowers_semantics(demo, root: Path):
    store = Store.open(root)
    try:
        with store.env.read() as txn:
            img = resolve(txn, store.env, "demo:app")
        view = MergedLowers(StoreLayers(store, img.diff_ids))
        names = [n for n, _ in view.listdir(b"/etc")]
        assert names == [b"group", b"os-release", b"passwd"]  # motd is whited out
        assert view.resolve(b"/etc/motd") is None
        assert view.listdir(b"/var/cache") == []  # opaque in the app layer
        with pytest.raises(OSError) as exc:
            view.lookup(b"/var/cache/demo")
        assert exc.value.errno == errno.ENOENT
        node = view.lookup(b"/etc/os-release")
        assert view.read(node, 0, 100) == b'NAME="layerstore demo"\nVERSION_ID="2"\n'
        assert view.read(node, 6, 4) == b"laye"
        assert view.read(node, 1000, 10) == b""
        # a multi-chunk file read across chunk boundaries in pieces equals the whole
        blob = view.lookup(b"/app-data/blob.bin")
        whole = view.read(blob, 0, blob.entry.size)
        assert len(whole) == 2 << 20
        pieces = b"".join(view.read(blob, off, 100_000) for off in range(0, len(whole), 100_000))
        assert pieces == whole
        # inode numbers are stable: a second view gives the same ones
        again = MergedLowers(StoreLayers(store, img.diff_ids))
        assert again.lookup(b"/etc/os-release").ino == node.ino
        assert view.lookup(b"/").entry.type == 1
    finally:
        store.close()


def test_read_only_mount_equals_applied_layers(demo, cli, root: Path, mnt: Path, tmp_path: Path):
    cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mnt, "--read-only")
    try:
        assert os.path.ismount(mnt)
        # the mount's readahead is raised to 1 MiB (the kernel's default is 128 KiB)
        dev = next(line.split()[2] for line in open("/proc/self/mountinfo")
                   if line.split()[4] == str(mnt))
        if os.geteuid() == 0:
            assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "1024"
        expected = _expected_tree(tmp_path, cli, "demo:app")
        got = tree_manifest(mnt)
        want = tree_manifest(expected)
        assert got == want
        # writes are refused
        with pytest.raises(OSError) as exc:
            open(mnt / "etc/new", "w")
        assert exc.value.errno == errno.EROFS
        # the image is runnable: its own sh runs its own script
        if (mnt / "bin/sh").exists():
            p = subprocess.run(["chroot", str(mnt), "/bin/sh", "/app/hello.sh"],
                               capture_output=True, text=True, timeout=30)
            assert p.stdout == "hello from layerstore\n"
        ps = json.loads(cli("ps", "--json").stdout)
        assert [c["name"] for c in ps] == ["c1"]
        # rm refuses while mounted; a second mount of the same container is refused
        p = cli("rm", "c1", check=False)
        assert p.returncode != 0 and "mounted" in p.stderr and "Traceback" not in p.stderr
        other = tmp_path / "mnt2"
        other.mkdir()
        p = cli("mount", "c1", other, "--read-only", check=False)
        assert p.returncode != 0 and "already mounted" in p.stderr
        assert not os.path.ismount(other)
    finally:
        cli("umount", mnt)
    assert not os.path.ismount(mnt)
    cli("rm", "c1")


def test_two_containers_of_one_image_and_import_while_mounted(demo, cli, mnt: Path, tmp_path: Path):
    cli("create", "demo:app", "--name", "a")
    cli("create", "demo:base", "--name", "b")
    other = tmp_path / "mnt2"
    other.mkdir()
    cli("mount", "a", mnt, "--read-only")
    try:
        cli("mount", "b", other, "--read-only")
        try:
            assert (mnt / "etc/motd").exists() is False
            assert (other / "etc/motd").read_text().startswith("Welcome")
            # an import while mounted works and does not disturb the mounts
            cli("import", demo, "--tag", "again:1", check=False)
            layer_tar = tmp_path / "l.tar"
            subprocess.run(["tar", "-C", str(mnt / "etc"), "-cf", str(layer_tar), "."], check=True)
            cli("import", layer_tar, "--tag", "etc:1")
            assert (mnt / "etc/os-release").read_text().endswith('"2"\n')
        finally:
            cli("umount", "b")
    finally:
        cli("umount", mnt)


@pytest.mark.parametrize("case", ["no-container", "missing-mountpoint", "not-empty",
                                  "already-mounted"])
def test_mount_bad_input(demo, cli, mnt: Path, tmp_path: Path, case: str):
    cli("create", "demo:app", "--name", "c1")
    target = mnt
    ref = "c1"
    args = ["--read-only"]
    if case == "no-container":
        ref = "nope"
    elif case == "missing-mountpoint":
        target = tmp_path / "does-not-exist"
    elif case == "not-empty":
        (mnt / "file").write_text("x")
    elif case == "already-mounted":
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        p = cli("mount", ref, target, *args, check=False)
        assert p.returncode != 0
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("layerstore: "), p.stderr
    finally:
        if case == "already-mounted":
            subprocess.run(["umount", str(mnt)], check=True)
    assert not os.path.ismount(mnt)


def test_umount_cleans_up_a_dead_daemon(demo, cli, root: Path, mnt: Path):
    cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mnt, "--read-only")
    state = json.loads(next((root / "containers").glob("*/mount.json")).read_text())
    os.kill(state["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.stat(mnt / "etc")
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.ECANCELED):
                continue  # over io_uring: a request the daemon was sent as it died
            assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            break
        time.sleep(0.1)
    cli("umount", "c1")
    assert not os.path.ismount(mnt)
    # and it mounts again
    cli("mount", "c1", mnt, "--read-only")
    try:
        assert (mnt / "etc/os-release").exists()
    finally:
        cli("umount", mnt)


def test_read_only_mount_equals_kernel_overlayfs(demo, cli, root: Path, mnt: Path, tmp_path: Path):
    """The same layers as kernel overlayfs lowers give the same tree as our mount.
    Directory times are left out: a parent that a layer's tar does not list is made by
    GNU tar with the current time in that lower, and overlayfs shows it, whereas an OCI
    layer leaves the lower directory's attributes alone (which our view shows)."""
    out = tmp_path / "exported"
    cli("export", "demo:app", out)
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    lowers = []
    for i, layer in enumerate(manifest["layers"]):
        d = tmp_path / f"lower{i}"
        extract_as_overlay_lower(out / "blobs/sha256" / layer["digest"].split(":")[1], d)
        lowers.append(str(d))
    kmnt = tmp_path / "kernel"
    kmnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    "lowerdir=" + ":".join(reversed(lowers)), str(kmnt)], check=True)
    try:
        cli("create", "demo:app", "--name", "c1")
        cli("mount", "c1", mnt, "--read-only")
        try:
            assert tree_manifest(mnt, dir_mtimes=False) == tree_manifest(kmnt, dir_mtimes=False)
        finally:
            cli("umount", mnt)
    finally:
        subprocess.run(["umount", str(kmnt)], check=True)
