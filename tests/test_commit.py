"""``layerstore diff`` and ``layerstore commit`` through the CLI, on real FUSE mounts:
changes made in a writable mount show in ``diff``, and an image committed from them
mounts (read-only) as the same tree."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_clean
from helpers_images import export_layout, tree_manifest
from test_passthrough import _write_while_stopped

EXPECTED_DIFF = [
    "C /app",
    "C /app-data",
    "D /app-data/blob.bin",
    "C /app/hello.sh",
    "A /app/hello2.sh",
    "A /blob-moved",
    "C /etc",
    "C /etc/group",
    "C /etc/os-release",
    "D /etc/passwd",
    "A /fifo",
    "A /link",
    "A /newdir",
    "A /newdir/sub",
    "A /newdir/sub/file",
    "A /newfile.txt",
    "A /newfile2",
    "C /usr",
    "C /usr/share",
    "C /usr/share/doc",
    "A /usr/share/doc/NEW",
    "D /usr/share/doc/README",
]


def _make_changes(m: Path) -> bool:
    """The changes (see ``_expected_diff``); returns whether a user xattr could be set
    (the upper's filesystem)."""
    (m / "newfile.txt").write_bytes(b"hello\n")
    os.utime(m / "newfile.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (m / "newdir/sub").mkdir(parents=True)
    (m / "newdir/sub/file").write_bytes(b"x" * 70_000)
    with open(m / "etc/os-release", "ab") as f:
        f.write(b"EXTRA=1\n")
    os.unlink(m / "etc/passwd")
    shutil.rmtree(m / "usr/share/doc")
    (m / "usr/share/doc").mkdir()
    (m / "usr/share/doc/NEW").write_bytes(b"new doc\n")
    os.symlink("/etc/os-release", m / "link")
    os.link(m / "app/hello.sh", m / "app/hello2.sh")  # a lower file: copied up, one inode
    os.link(m / "newfile.txt", m / "newfile2")
    os.mkfifo(m / "fifo", 0o640)
    os.chmod(m / "etc/group", 0o600)  # with --copy-up meta: no data copied, for these two
    os.rename(m / "app-data/blob.bin", m / "blob-moved")
    os.setxattr(m / "etc/group", "trusted.overlay.mine", b"container's own")
    shutil.rmtree(m / "bin")  # a lower directory replaced by a file
    (m / "bin").write_bytes(b"not a directory\n")
    try:
        os.setxattr(m / "newfile.txt", "user.test", b"value")
        return True
    except OSError as exc:
        assert exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
        return False


def _expected_diff(bin_names: list[str]) -> list[str]:
    """EXPECTED_DIFF, plus the lower /bin (this machine's binaries) replaced by a file."""
    extra = ["C /bin"] + [f"D /bin/{n}" for n in bin_names]
    return sorted(EXPECTED_DIFF + extra, key=lambda line: line[2:].encode())


def _without_links(manifest: dict) -> dict:
    return {p: {k: v for k, v in d.items() if k != "links"} for p, d in manifest.items()}


@pytest.mark.parametrize("copy_up", ["meta", "full"])
def test_diff_and_commit(demo, cli, root: Path, mnt: Path, tmp_path: Path, copy_up: str):
    cli("create", "demo:app", "--name", "c1")
    assert cli("diff", "c1").stdout == ""
    cli("mount", "c1", mnt, "--copy-up", copy_up)
    bin_names = sorted(os.listdir(mnt / "bin"))
    assert bin_names
    expected_diff = _expected_diff(bin_names)
    has_xattr = _make_changes(mnt)
    upper = Path(next(c for c in json.loads(cli("ps", "--json").stdout) if c["name"] == "c1")["upper"])
    for rel in ("etc/group", "blob-moved"):  # metacopy files whose data is in the image
        assert ("trusted.overlay.metacopy" in os.listxattr(upper / rel)) == (copy_up == "meta")
    want = tree_manifest(mnt, dir_mtimes=False)
    assert want[b"app/hello2.sh"]["links"] == [b"app/hello.sh", b"app/hello2.sh"]
    if has_xattr:
        assert want[b"newfile.txt"]["xattrs"] == {b"user.test": b"value"}

    # diff while mounted (reads the upper as it is)
    assert cli("diff", "c1").stdout.splitlines() == expected_diff
    cli("umount", mnt)
    assert cli("diff", "c1").stdout.splitlines() == expected_diff
    rows = json.loads(cli("diff", "c1", "--json").stdout)
    assert [f"{r['kind']} {r['path']}" for r in rows] == expected_diff

    image_id = cli("commit", "c1", "new:1").stdout.strip()
    assert image_id.startswith("sha256:") and len(image_id) == 71
    images = json.loads(cli("images", "--json").stdout)
    assert any(i["id"] == image_id for i in images)

    # the committed image, mounted read-only in a new container, is the changed tree
    cli("create", "new:1", "--name", "c2")
    assert cli("diff", "c2").stdout == ""
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    cli("mount", "c2", mnt2, "--read-only")
    try:
        got = tree_manifest(mnt2, dir_mtimes=False)
        # hard links are one inode (the lower view reports st_nlink 1, so tree_manifest
        # cannot group them there: compare inode numbers instead)
        for a, b in (("app/hello.sh", "app/hello2.sh"), ("newfile.txt", "newfile2")):
            assert os.lstat(mnt2 / a).st_ino == os.lstat(mnt2 / b).st_ino
        assert os.lstat(mnt2 / "newfile.txt").st_ino != os.lstat(mnt2 / "app/hello.sh").st_ino
    finally:
        cli("umount", mnt2)
    assert _without_links(got) == _without_links(want)
    assert got[b"newfile.txt"]["mtime_ns"] == 1_600_000_000_123_456_789

    # c1 remounted shows the same tree as before the commit
    cli("mount", "c1", mnt, "--copy-up", copy_up)
    try:
        assert tree_manifest(mnt, dir_mtimes=False) == want
    finally:
        cli("umount", mnt)

    # export: the new layer is last, with OCI whiteouts; the config records the commit
    ex = export_layout(root, "new:1", tmp_path / "exported")
    old = export_layout(root, "demo:app", tmp_path / "exported-old")
    cfg, old_cfg = json.loads(ex.config), json.loads(old.config)
    assert cfg["rootfs"]["diff_ids"][:-1] == old_cfg["rootfs"]["diff_ids"]
    assert cfg["history"][-1]["created_by"] == "layerstore commit"
    assert cfg["history"][:-1] == old_cfg.get("history", [])
    assert cfg["created"] == cfg["history"][-1]["created"]
    with tarfile.open(ex.layer_paths()[-1]) as tf:
        members = {m.name: m for m in tf}
    names = list(members)
    assert "etc/.wh.passwd" in names
    assert "usr/share/doc/.wh..wh..opq" in names
    assert names.index("usr/share/doc") < names.index("usr/share/doc/.wh..wh..opq")
    assert "usr/share/doc/README" not in names and "usr/share/doc/.wh.README" not in names
    assert members["newfile2"].islnk() and members["newfile2"].linkname == "newfile.txt"
    assert members["app/hello2.sh"].islnk() and members["app/hello2.sh"].linkname == "app/hello.sh"
    assert members["link"].issym() and members["fifo"].isfifo()
    assert members["newfile.txt"].pax_headers["mtime"] == "1600000000.123456789"
    # overlayfs' own xattrs stay out; the container's own trusted.overlay.X goes in as such
    xattrs = {(n, k) for n, m in members.items() for k in m.pax_headers if "trusted.overlay" in k}
    assert xattrs == {("etc/group", "SCHILY.xattr.trusted.overlay.mine")}
    assert members["etc/group"].mode == 0o600
    assert not any(n.startswith("etc/.wh.motd") for n in names)  # not in the upper

    # committing again gives the same layer (deterministic tar), a new config
    image2 = cli("commit", "c1", "new:2").stdout.strip()
    ex2 = export_layout(root, "new:2", tmp_path / "exported2")
    assert json.loads(ex2.config)["rootfs"]["diff_ids"] == cfg["rootfs"]["diff_ids"]
    assert image2 != image_id or json.loads(ex2.config)["created"] == cfg["created"]
    assert_clean(root)


def test_commit_bad_input(demo, cli):
    p = cli("commit", "nosuch", "x:1", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = cli("diff", "nosuch", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    cli("create", "demo:app", "--name", "c1")
    p = cli("commit", "c1", "Bad Name!", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr


def _daemon_states(root: Path, stop: threading.Event, seen: list[str]) -> None:
    """Poll the state letter of every mounted container's daemon until ``stop``."""
    pids = [json.loads(p.read_text())["pid"] for p in root.glob("containers/*/mount.json")]
    while not stop.is_set():
        for pid in pids:
            try:
                seen.append(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0])
            except OSError:
                pass
        time.sleep(0.0005)


def test_commit_pauses_a_mounted_container(demo, cli, root: Path, mnt: Path):
    """docker commit's default: the daemon is stopped while the upper is read, and runs
    again afterwards; ``--no-pause`` leaves it running."""
    cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mnt)
    try:
        (mnt / "big").write_bytes(os.urandom(64 << 20))  # so that reading the upper takes a while
        for args, paused in ((["--no-pause"], False), ([], True)):
            seen: list[str] = []
            stop = threading.Event()
            t = threading.Thread(target=_daemon_states, args=(root, stop, seen))
            t.start()
            try:
                cli("commit", "c1", f"p:{int(paused)}", *args)
            finally:
                stop.set()
                t.join()
            assert seen
            assert ("T" in seen) == paused, sorted(set(seen))
            (mnt / f"after-{int(paused)}").write_bytes(b"runs again\n")  # not left stopped
            assert (mnt / f"after-{int(paused)}").read_bytes() == b"runs again\n"
    finally:
        cli("umount", mnt)
    assert_clean(root)


def test_commit_while_a_file_is_written(demo, cli, root: Path, mnt: Path):
    """With FUSE passthrough a file open for writing before the pause is written by the
    kernel, daemon stopped or not: commit reads the upper again while some file moves
    under it, then commits what it read and warns; once the writer stops, no warning
    and the file as it is. Without passthrough the pause holds the writer."""
    cli("create", "demo:app", "--name", "c1")
    cli("mount", "c1", mnt, env={"LAYERSTORE_FUSE": "wire"})
    try:
        (mnt / "big").write_bytes(os.urandom(16 << 20))  # so that reading takes a while
        size = 8 << 20
        fd = os.open(mnt / "data", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"\0" * size, 0)
        through = _write_while_stopped(root, cli, fd, b"\0")  # FUSE passthrough?
        stop = threading.Event()

        def writer() -> None:  # rewrites the file in place, 64 KiB at a time, until told
            n = 0
            while not stop.is_set():
                os.pwrite(fd, bytes([n % 251]) * (64 << 10), (n * (64 << 10)) % size)
                n += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            p = cli("commit", "c1", "w:1")
        finally:
            stop.set()
            t.join()
        assert "Traceback" not in p.stderr
        if through:
            assert "warning: data changed while the upper was read, 3 times" in p.stderr, \
                p.stderr
        else:
            assert "warning" not in p.stderr
        p = cli("commit", "c1", "w:2")  # the writer has stopped: what the file holds now
        assert "warning" not in p.stderr
        now = os.pread(fd, size, 0)
        os.close(fd)
        cli("create", "w:2", "--name", "c2")
        ro = mnt.parent / "ro"
        ro.mkdir()
        cli("mount", "c2", ro, "--read-only")
        try:
            assert (ro / "data").read_bytes() == now
        finally:
            cli("umount", ro)
    finally:
        cli("umount", mnt)
    assert_clean(root)
