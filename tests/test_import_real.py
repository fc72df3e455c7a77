"""Import and export through the CLI, with inputs made by real tools.

GNU tar, Python's tarfile (PAX and GNU formats), umoci and skopeo make the inputs;
layerstore imports them, exports them again as OCI layouts, and the tests check that

- each exported layer blob is byte for byte the uncompressed layer that went in (so its
  digest is the diff_id) and the config is unchanged (so the image id is kept);
- extracting the export with GNU tar gives the same tree as extracting the input;
- the store's own entries (what a mount will show) carry the same metadata;
- whiteouts and opaque directories follow the OCI rules;
- names, platforms and multi-image inputs come out as the formats say.

Everything runs as root (devices, owners, ``trusted``-free xattrs in ``user.*``).
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import assert_clean, run_cli
from helpers_images import (
    CONTAINERD_NAME,
    MT_LAYER,
    MT_MANIFEST,
    REF_NAME,
    OciLayout,
    apply_layer,
    assert_same_tree,
    check_clean,
    dir_,
    entries_manifest,
    export_layout,
    gnu_create,
    gnu_extract,
    gunzip_digest,
    hardlink,
    images,
    import_ok,
    inspect,
    layer_count,
    layer_entries,
    merge_layers,
    names_by_id,
    read_layout,
    reg,
    sha256_bytes,
    sha256_file,
    sym,
    tar_bytes,
    ti,
    tree_manifest,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (devices, owners)")

LONG_DIR = "a" * 200
LONG_SUB = "b" * 200
LONG_FILE = "c" * 120
NON_UTF8 = b"caf\xe9"


def _need(*tools: str) -> None:
    for t in tools:
        assert shutil.which(t), f"{t} is not installed (.ci/run installs it)"


# --- a tree with everything GNU tar can carry --------------------------------------------


def make_rich_tree(t: Path) -> Path:
    """Files, dirs, xattrs, hard links (to a file and a symlink; GNU tar 1.34 archives
    hard-linked FIFOs and devices as separate entries, so the tarfile tests cover those),
    symlinks, a sparse file, setuid/setgid/sticky, devices, FIFOs, owners, ns mtimes,
    non-UTF-8 names and paths longer than 255 bytes."""
    t.mkdir(parents=True)
    b = os.fsencode(str(t))
    (t / "d").mkdir()
    (t / "d/f").write_bytes(b"hello\n")
    os.setxattr(t / "d/f", "user.bin", b"\x00\xff\x01binary")
    os.setxattr(t / "d/f", "user.text", b"some text")
    os.link(t / "d/f", t / "d/h")
    os.symlink("f", t / "d/s")
    os.link(t / "d/s", t / "d/hs", follow_symlinks=False)
    os.symlink("/absolute/target/that/does/not/exist", t / "d/abs")
    os.symlink("../" + "x" * 150, t / "d/longtarget")
    os.mkfifo(t / "fifo")
    (t / "dev").mkdir()
    os.mknod(t / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(t / "dev/loop9", 0o660 | 0o060000, os.makedev(7, 9))
    with open(t / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"data in the middle" * 100)
        f.seek((8 << 20) - 5)
        f.write(b"tail!")
    (t / "big").write_bytes(os.urandom(300 << 10))
    (t / "empty").write_bytes(b"")
    (t / "bin").mkdir()
    (t / "bin/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(t / "bin/suid", 0o4755)
    (t / "bin/sgid").write_bytes(b"#!/bin/sh\n")
    os.chmod(t / "bin/sgid", 0o2711)
    (t / "tmp").mkdir()
    os.chmod(t / "tmp", 0o1777)
    (t / "shared").mkdir()
    os.chmod(t / "shared", 0o2775)
    (t / "owned").write_bytes(b"owned by someone\n")
    os.chown(t / "owned", 1234, 5678)
    os.chown(t / "d/s", 4321, 8765, follow_symlinks=False)
    os.utime(t / "owned", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.mkdir(b + b"/" + NON_UTF8)
    with open(b + b"/" + NON_UTF8 + b"/na\xefve\xff", "wb") as f:
        f.write(b"latin-1 name\n")
    os.symlink(b"target-\xe9", b + b"/" + NON_UTF8 + b"/link\xe9")
    deep = t / "long" / LONG_DIR / LONG_SUB
    deep.mkdir(parents=True)
    (deep / LONG_FILE).write_bytes(b"deep file\n")
    os.link(deep / LONG_FILE, t / "long" / ("link-" + "z" * 100))
    os.utime(t / "d", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    return t


@pytest.fixture(scope="module")
def rich_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rich_tree(tmp_path_factory.mktemp("rich") / "tree")


def _check_features(m: dict) -> None:
    """The tree the test made really carries what it is meant to test."""
    assert m[b"d/f"]["xattrs"][b"user.bin"] == b"\x00\xff\x01binary"
    assert m[b"d/s"]["links"] == [b"d/hs", b"d/s"]
    assert m[b"fifo"]["type"] == "p" and m[b"dev/null"]["rdev"] == (1, 3)
    assert m[b"dev/loop9"]["rdev"] == (7, 9) and m[b"dev/loop9"]["type"] == "b"
    assert m[b"bin/suid"]["mode"] == "0o4755" and m[b"tmp"]["mode"] == "0o1777"
    assert m[b"owned"]["uid"] == 1234 and m[b"owned"]["gid"] == 5678
    assert m[NON_UTF8 + b"/na\xefve\xff"]["size"] == 13
    long_path = f"long/{LONG_DIR}/{LONG_SUB}/{LONG_FILE}".encode()
    assert len(long_path) > 255 and m[long_path]["links"]


@pytest.mark.parametrize("fmt", ["posix", "posix-sparse0.1", "gnu"])
def test_gnu_tar_layer_round_trip(fmt: str, rich_tree: Path, root: Path, tmp_path: Path) -> None:
    """posix: PAX headers, sparse map format 1.0 (map inside the data area);
    posix-sparse0.1: the map in a PAX record; gnu: GNU long names and old GNU sparse."""
    _need("tar")
    src = tmp_path / "layer.tar"
    if fmt == "posix-sparse0.1":
        gnu_create(rich_tree, src, "--sparse-version=0.1", fmt="posix")
    else:
        gnu_create(rich_tree, src, fmt=fmt)
    with tarfile.open(src) as tf:
        sparse = tf.getmember("./sparse")
        assert sparse.issparse(), "GNU tar did not write a sparse member"
    # the input carries everything (sanity check of the test itself)
    orig = tmp_path / "orig"
    gnu_extract(src, orig)
    m_orig = tree_manifest(orig, root_mtime=True)
    assert_same_tree(tree_manifest(rich_tree, root_mtime=True), m_orig)
    _check_features(m_orig)

    [(image_id, names)] = import_ok(root, src, "--tag", f"gnutar:{fmt}")
    assert names == [f"gnutar:{fmt}"]
    ex = export_layout(root, f"gnutar:{fmt}", tmp_path / "out")
    assert ex.config_digest() == image_id
    [layer] = ex.layer_paths()
    assert sha256_file(layer) == sha256_file(src)
    assert layer.read_bytes() == src.read_bytes()
    assert json.loads(ex.config)["rootfs"]["diff_ids"] == [sha256_file(src)]

    back = tmp_path / "back"
    gnu_extract(layer, back)
    assert_same_tree(m_orig, tree_manifest(back, root_mtime=True))

    # what the store itself holds (what a mount will show) has the same metadata
    entries = layer_entries(root, sha256_file(src))
    assert_same_tree(tree_manifest(orig, root_mtime=True, content="blake3"),
                     entries_manifest(entries, root_mtime=True))
    check_clean(root)


def test_gnu_tar_compressed_same_layer(rich_tree: Path, root: Path, tmp_path: Path) -> None:
    _need("tar", "gzip", "zstd")
    src = tmp_path / "layer.tar"
    gnu_create(rich_tree, src)
    subprocess.run(["gzip", "-k", "-9", str(src)], check=True)
    subprocess.run(["zstd", "-q", "-k", "-19", str(src)], check=True)
    diff_id = sha256_file(src)
    ids = {}
    for path, tag in ((src, "plain:1"), (Path(f"{src}.gz"), "gz:1"), (Path(f"{src}.zst"), "zst:1")):
        [(image_id, names)] = import_ok(root, path, "--tag", tag)
        assert names == [tag]
        ids[tag] = image_id
        assert [lay["DiffID"] for lay in inspect(root, tag)["Layers"]] == [diff_id]
    assert len(set(ids.values())) == 1, ids
    assert layer_count(root) == 1
    assert names_by_id(root) == {ids["plain:1"]: ["gz:1", "plain:1", "zst:1"]}
    ex = export_layout(root, "zst:1", tmp_path / "out")
    assert ex.layer_paths()[0].read_bytes() == src.read_bytes()
    check_clean(root)


def test_directory_import(rich_tree: Path, root: Path, tmp_path: Path) -> None:
    """A directory is read through GNU tar: exporting it and extracting gives the tree."""
    [(image_id, _)] = import_ok(root, rich_tree, "--tag", "dir:1")
    ex = export_layout(root, "dir:1", tmp_path / "out")
    assert ex.config_digest() == image_id
    back = tmp_path / "back"
    gnu_extract(ex.layer_paths()[0], back)
    assert_same_tree(tree_manifest(rich_tree), tree_manifest(back))
    # importing the same directory again gives the same layer (reproducible tar)
    import_ok(root, rich_tree, "--tag", "dir:2")
    assert layer_count(root) == 1
    check_clean(root)


# --- Python tarfile: PAX and GNU -------------------------------------------------------------


def _python_members(fmt: int) -> list:
    long_name = "long/" + "n" * 150 + "/" + "m" * 120
    members = [
        dir_("etc", mode=0o755),
        reg("etc/hosts", b"127.0.0.1 localhost\n", mode=0o644, uid=3_000_000, gid=3_000_001),
        sym("etc/long-link", "/" + "t" * 180),
        hardlink("etc/hosts-link", "etc/hosts"),
        reg(long_name, b"long name content\n" * 50),
        hardlink("hl-to-long", long_name),
        sym("s", "etc/hosts"),
        hardlink("hl-to-symlink", "s"),
        (ti("fifo", tarfile.FIFOTYPE), None),
        hardlink("hl-to-fifo", "fifo"),
        reg("caf\udce9", b"not utf-8\n"),
        reg("big", os.urandom(200 << 10)),
        reg("suid", b"x", mode=0o4755),
        dir_("sticky", mode=0o1777),
    ]
    dev = ti("null", tarfile.CHRTYPE, mode=0o666)
    dev.devmajor, dev.devminor = 1, 3
    members.append((dev, None))
    members.append(hardlink("hl-to-dev", "null"))
    if fmt == tarfile.PAX_FORMAT:
        x = ti("xattrs", mode=0o600)
        x.pax_headers = {"SCHILY.xattr.user.color": "blue", "SCHILY.xattr.user.other": "x=y z",
                         "mtime": "1700000000.123456789"}
        members.append((x, b"with xattrs\n"))
        members.append(reg("ünïcødé/файл", b"utf-8 names\n"))
    return members


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_python_tarfile_round_trip(fmt: int, root: Path, tmp_path: Path) -> None:
    data = tar_bytes(_python_members(fmt), fmt=fmt)
    src = tmp_path / "py.tar"
    src.write_bytes(data)
    name = "py:pax" if fmt == tarfile.PAX_FORMAT else "py:gnu"
    import_ok(root, src, "--tag", name)
    ex = export_layout(root, name, tmp_path / "out")
    [layer] = ex.layer_paths()
    assert layer.read_bytes() == data

    orig, back = tmp_path / "orig", tmp_path / "back"
    gnu_extract(src, orig)
    gnu_extract(layer, back)
    # parents missing from the tar are made by GNU tar with the current time: dir mtimes
    # are compared for the explicit directories only (below)
    m = tree_manifest(orig, dir_mtimes=False)
    assert_same_tree(m, tree_manifest(back, dir_mtimes=False))
    assert m[b"etc/hosts"]["uid"] == 3_000_000
    for d in ("etc", "sticky"):
        assert os.lstat(back / d).st_mtime_ns == 1_700_000_000 * 10**9

    entries = layer_entries(root, sha256_bytes(data))
    assert entries[b"/caf\xe9"].size == 10
    assert entries[b"/etc/hosts"].uid == 3_000_000 and entries[b"/etc/hosts"].gid == 3_000_001
    assert entries[b"/etc/long-link"].target == b"/" + b"t" * 180
    assert entries[b"/s"].link_group and entries[b"/s"].link_group == entries[b"/hl-to-symlink"].link_group
    assert entries[b"/fifo"].link_group == entries[b"/hl-to-fifo"].link_group != 0
    assert entries[b"/null"].rdev == (1, 3) and entries[b"/hl-to-dev"].rdev == (1, 3)
    assert entries[b"/suid"].mode == 0o4755 and entries[b"/sticky"].mode == 0o1777
    # the tar has no "./" entry: the root is implicit
    implicit = {b".", b"long", b"long/" + b"n" * 150, "ünïcødé".encode()}
    assert_same_tree({k: v for k, v in tree_manifest(orig, content="blake3", dir_mtimes=False).items()
                      if k not in implicit},
                     {k: v for k, v in entries_manifest(entries, dir_mtimes=False).items()
                      if k not in implicit})
    assert entries[b"/etc"].mtime_ns == entries[b"/sticky"].mtime_ns == 1_700_000_000 * 10**9
    assert entries[b"/long"].implicit
    if fmt == tarfile.PAX_FORMAT:
        e = entries[b"/xattrs"]
        assert e.xattrs == {b"user.color": b"blue", b"user.other": b"x=y z"}
        assert e.mtime_ns == 1_700_000_000_123_456_789
        assert os.lstat(back / "xattrs").st_mtime_ns == 1_700_000_000_123_456_789
        assert os.getxattr(back / "xattrs", "user.color") == b"blue"
        assert "ünïcødé/файл".encode() in {k[1:] for k in entries}
    check_clean(root)


# --- umoci ------------------------------------------------------------------------------------


def _umoci(*args: str | os.PathLike) -> None:
    p = subprocess.run(["umoci", *map(str, args)], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 0, f"umoci {args}: {p.stderr}"


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``umoci-img`` with tags ``base`` (one layer) and ``v2`` (base + a layer that deletes
    files, replaces a directory by a file and a file by a directory, and deletes and
    recreates a directory). Also ``umoci unpack`` of both tags as reference trees."""
    _need("umoci")
    top = tmp_path_factory.mktemp("umoci")
    lay = top / "umoci-img"
    _umoci("init", "--layout", lay)
    _umoci("new", "--image", f"{lay}:base")
    b1 = top / "b1"
    _umoci("unpack", "--image", f"{lay}:base", b1)
    r = b1 / "rootfs"
    for d in ("etc", "usr/lib", "var/cache/apt", "opt/dir/sub", "keep"):
        (r / d).mkdir(parents=True)
    (r / "etc/a").write_text("a\n")
    (r / "etc/b").write_text("b\n")
    (r / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.link(r / "etc/passwd", r / "etc/passwd-")
    (r / "var/cache/x").write_text("x\n")
    (r / "var/cache/apt/pkg").write_text("pkg\n")
    (r / "opt/dir/y").write_text("y\n")
    (r / "opt/dir/sub/z").write_text("z\n")
    (r / "usr/lib/libz.so").write_bytes(os.urandom(100 << 10))
    os.symlink("usr/lib", r / "lib")
    os.mkfifo(r / "keep/fifo")
    (r / "keep/suid").write_text("s\n")
    os.chmod(r / "keep/suid", 0o4755)
    (r / "keep/owned").write_text("o\n")
    os.chown(r / "keep/owned", 1000, 1000)
    os.setxattr(r / "keep/owned", "user.note", b"umoci keeps xattrs")
    _umoci("repack", "--image", f"{lay}:base", b1)

    _umoci("tag", "--image", f"{lay}:base", "v2")
    b2 = top / "b2"
    _umoci("unpack", "--image", f"{lay}:v2", b2)
    r = b2 / "rootfs"
    (r / "etc/b").unlink()                      # delete a file
    shutil.rmtree(r / "opt/dir")                # replace a directory by a file
    (r / "opt/dir").write_text("now a file\n")
    (r / "etc/a").unlink()                      # replace a file by a directory
    (r / "etc/a").mkdir()
    (r / "etc/a/inner").write_text("inner\n")
    shutil.rmtree(r / "var/cache")              # delete and recreate a directory
    (r / "var/cache").mkdir()
    (r / "var/cache/new").write_text("new\n")
    (r / "usr/lib/libz.so").write_bytes(os.urandom(100 << 10))  # modify a file
    _umoci("repack", "--image", f"{lay}:v2", b2)

    refs = {}
    for tag in ("base", "v2"):
        ref = top / f"ref-{tag}"
        _umoci("unpack", "--image", f"{lay}:{tag}", ref)
        refs[tag] = ref / "rootfs"
    index = json.loads((lay / "index.json").read_text())
    mans = {}
    for d in index["manifests"]:
        doc = json.loads((lay / "blobs/sha256" / d["digest"].split(":")[1]).read_bytes())
        mans[d["annotations"][REF_NAME]] = doc
    return {"layout": lay, "refs": refs, "manifests": mans, "top": top}


def test_umoci_layout(umoci_layout: dict, root: Path, tmp_path: Path) -> None:
    lay = umoci_layout["layout"]
    mans = umoci_layout["manifests"]
    got = import_ok(root, lay)
    want = {mans["base"]["config"]["digest"]: ["umoci-img:base"],
            mans["v2"]["config"]["digest"]: ["umoci-img:v2"]}
    assert dict(got) == want
    assert names_by_id(root) == want
    rows = {r["name"]: r for r in images(root)}
    assert rows["umoci-img:base"]["layers"] == 1 and rows["umoci-img:v2"]["layers"] == 2
    assert rows["umoci-img:v2"]["repository"] == "umoci-img" and rows["umoci-img:v2"]["tag"] == "v2"
    assert layer_count(root) == 2  # the base layer is stored once

    for tag in ("base", "v2"):
        man = mans[tag]
        ex = export_layout(root, f"umoci-img:{tag}", tmp_path / f"out-{tag}")
        # config bytes unchanged: same image id as umoci's config digest
        assert ex.config_digest() == man["config"]["digest"]
        assert sha256_bytes(ex.config) == man["config"]["digest"]
        assert ex.config == (lay / "blobs/sha256" / man["config"]["digest"].split(":")[1]).read_bytes()
        # each exported layer is the gunzipped umoci blob, byte for byte
        diff_ids = json.loads(ex.config)["rootfs"]["diff_ids"]
        for i, (ld, path) in enumerate(zip(man["layers"], ex.layer_paths())):
            blob = lay / "blobs/sha256" / ld["digest"].split(":")[1]
            assert gunzip_digest(blob) == diff_ids[i] == sha256_file(path)
            with gzip.open(blob) as f:
                assert f.read() == path.read_bytes()
        # the exported index names the image
        ann = ex.index["manifests"][0]["annotations"]
        assert ann[CONTAINERD_NAME] == f"umoci-img:{tag}" and ann[REF_NAME] == tag

        # merged view: the exported layers applied in order == umoci's own unpack
        merged = tmp_path / f"merged-{tag}"
        merged.mkdir()
        for path in ex.layer_paths():
            apply_layer(path, merged)
        assert_same_tree(tree_manifest(umoci_layout["refs"][tag]), tree_manifest(merged))

    # the store's own view (what a mount will show): the layers' entries merged by the
    # OCI rules equal umoci's unpack of v2
    diff_ids = json.loads(ex.config)["rootfs"]["diff_ids"]
    stack = [layer_entries(root, d) for d in diff_ids]
    top_layer = stack[1]
    assert top_layer[b"/etc/b"].type == 6 and top_layer[b"/opt/dir"].type == 0
    assert top_layer[b"/etc/a"].type == 1 and top_layer[b"/var/cache/x"].type == 6
    assert not any(p.startswith(b"/opt/dir/") for p in top_layer)  # moot whiteouts dropped
    assert_same_tree(tree_manifest(umoci_layout["refs"]["v2"], content="blake3"),
                     entries_manifest(merge_layers(stack)))

    # the second layer really deletes and replaces (the test exercises what it claims)
    v2 = tree_manifest(umoci_layout["refs"]["v2"])
    assert b"etc/b" not in v2 and v2[b"opt/dir"]["type"] == "-" and v2[b"etc/a"]["type"] == "d"
    assert b"var/cache/x" not in v2 and b"var/cache/apt" not in v2
    top = json.loads((tmp_path / "out-v2/index.json").read_text())
    assert len(top["manifests"]) == 1
    assert_clean(root)  # the real command line, once


def test_umoci_layout_as_tar_and_tag_errors(umoci_layout: dict, root: Path, tmp_path: Path) -> None:
    """The same layout as a tar (as ``tar -C layout .`` makes it); ``--tag`` on a layout
    with two images is refused and imports nothing."""
    archive = tmp_path / "umoci-img.tar"
    subprocess.run(["tar", "-cf", archive, "-C", umoci_layout["layout"], "."], check=True)
    p = run_cli("import", archive, "--tag", "one:name", root=root, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerstore: ") and "--tag" in lines[0], p.stderr
    assert images(root) == []
    got = dict(import_ok(root, archive))
    mans = umoci_layout["manifests"]
    assert got == {mans["base"]["config"]["digest"]: ["umoci-img:base"],
                   mans["v2"]["config"]["digest"]: ["umoci-img:v2"]}
    check_clean(root)


# --- skopeo ------------------------------------------------------------------------------------


def _skopeo(*args: str) -> None:
    p = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True,
                       text=True, check=False)
    assert p.returncode == 0, f"skopeo {args}: {p.stderr}"


def test_skopeo_docker_archive(umoci_layout: dict, root: Path, tmp_path: Path) -> None:
    _need("skopeo")
    lay = umoci_layout["layout"]
    man = umoci_layout["manifests"]["v2"]
    archive = tmp_path / "x.tar"
    _skopeo("copy", f"oci:{lay}:v2", f"docker-archive:{archive}:example.com/foo:1.0")
    with tarfile.open(archive) as tf:
        assert "manifest.json" in tf.getnames()
    [(image_id, names)] = import_ok(root, archive)
    assert names == ["example.com/foo:1.0"]
    assert image_id == man["config"]["digest"]
    assert names_by_id(root) == {image_id: ["example.com/foo:1.0"]}
    ex = export_layout(root, "example.com/foo:1.0", tmp_path / "out")
    assert ex.config_digest() == image_id
    for ld, path in zip(man["layers"], ex.layer_paths()):
        assert gunzip_digest(lay / "blobs/sha256" / ld["digest"].split(":")[1]) == sha256_file(path)
    check_clean(root)


def test_skopeo_oci_archive(umoci_layout: dict, root: Path, tmp_path: Path) -> None:
    _need("skopeo")
    lay = umoci_layout["layout"]
    man = umoci_layout["manifests"]["base"]
    archive = tmp_path / "y.tar"
    _skopeo("copy", f"oci:{lay}:base", f"oci-archive:{archive}:mytag")
    [(image_id, names)] = import_ok(root, archive)
    assert image_id == man["config"]["digest"]
    assert names == ["y:mytag"]  # a bare ref.name is a tag of the archive's name
    ex = export_layout(root, image_id, tmp_path / "out")
    [path] = ex.layer_paths()
    assert gunzip_digest(lay / "blobs/sha256" / man["layers"][0]["digest"].split(":")[1]) == sha256_file(path)
    check_clean(root)


def _uncompressed_layers(lay: Path, man: dict) -> list[bytes]:
    out = []
    for ld in man["layers"]:
        with gzip.open(lay / "blobs/sha256" / ld["digest"].split(":")[1]) as f:
            out.append(f.read())
    return out


def test_docker25_archive_imports_once(umoci_layout: dict, root: Path, tmp_path: Path) -> None:
    """``docker save`` since Engine 25: an OCI layout plus a manifest.json pointing into
    blobs/sha256/. One image with two names, imported once."""
    lay = umoci_layout["layout"]
    man = umoci_layout["manifests"]["v2"]
    config = (lay / "blobs/sha256" / man["config"]["digest"].split(":")[1]).read_bytes()
    layers = _uncompressed_layers(lay, man)
    d = tmp_path / "docker25"
    out = OciLayout(d)
    mdesc, manifest, cfg = out.image(layers, config=config)
    assert cfg == config
    out.add(mdesc, name="example.com/foo:1.0", ref="1.0")
    out.add(mdesc, name="example.com/foo:latest", ref="latest")
    out.write_index()
    (d / "manifest.json").write_text(json.dumps([{
        "Config": "blobs/sha256/" + manifest["config"]["digest"].split(":")[1],
        "RepoTags": ["example.com/foo:1.0", "example.com/foo:latest"],
        "Layers": ["blobs/sha256/" + ld["digest"].split(":")[1] for ld in manifest["layers"]],
    }]))
    (d / "repositories").write_text(json.dumps(
        {"example.com/foo": {"1.0": sha256_bytes(layers[-1]).split(":")[1]}}))
    archive = tmp_path / "docker25.tar"
    subprocess.run(["tar", "-cf", archive, "-C", d, "."], check=True)
    got = import_ok(root, archive)
    assert got == [(man["config"]["digest"], ["example.com/foo:1.0", "example.com/foo:latest"])]
    assert names_by_id(root) == {man["config"]["digest"]: ["example.com/foo:1.0", "example.com/foo:latest"]}
    assert layer_count(root) == 2
    check_clean(root)


def test_legacy_docker_save_two_images(umoci_layout: dict, root: Path, tmp_path: Path) -> None:
    """Legacy ``docker save``: ``<id>/layer.tar``, ``<id>/json``, ``<config>.json``,
    ``repositories``; manifest.json lists two images (the second shares the base)."""
    lay = umoci_layout["layout"]
    d = tmp_path / "legacy"
    d.mkdir()
    entries = []
    ids = {}
    for tag in ("base", "v2"):
        man = umoci_layout["manifests"][tag]
        config = (lay / "blobs/sha256" / man["config"]["digest"].split(":")[1]).read_bytes()
        cname = man["config"]["digest"].split(":")[1] + ".json"
        (d / cname).write_bytes(config)
        lpaths = []
        for i, data in enumerate(_uncompressed_layers(lay, man)):
            lid = sha256_bytes(f"{tag}{i}".encode() + data).split(":")[1]  # v1 ids: arbitrary
            (d / lid).mkdir(exist_ok=True)
            (d / lid / "layer.tar").write_bytes(data)
            (d / lid / "VERSION").write_text("1.0")
            (d / lid / "json").write_text(json.dumps({"id": lid}))
            lpaths.append(f"{lid}/layer.tar")
        entries.append({"Config": cname, "RepoTags": [f"legacy/{tag}:latest"], "Layers": lpaths})
        ids[man["config"]["digest"]] = [f"legacy/{tag}:latest"]
    (d / "manifest.json").write_text(json.dumps(entries))
    (d / "repositories").write_text("{}")
    archive = tmp_path / "legacy.tar"
    subprocess.run(["tar", "-cf", archive, "-C", d, "."], check=True)
    assert dict(import_ok(root, archive)) == ids
    assert names_by_id(root) == ids
    assert layer_count(root) == 2
    # the unpacked form (a directory) works too
    root2 = tmp_path / "store2"
    assert dict(import_ok(root2, d)) == ids
    p = run_cli("import", archive, "--tag", "x:y", root=root2, check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr
    check_clean(root)
    check_clean(root2)


# --- platforms ------------------------------------------------------------------------------


def _host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _multi_platform(tmp_path: Path, nested: bool) -> tuple[Path, dict[str, str], str]:
    """A layout with an amd64 and an arm64 image (different layers), either under a
    nested index (one descriptor in index.json) or as two descriptors of one name."""
    host = _host_arch()
    other = "arm64" if host != "arm64" else "amd64"
    d = tmp_path / "multi"
    out = OciLayout(d)  # the directory's name gives the repository of a bare ref.name
    ids = {}
    descs = []
    for arch in (host, other):
        layer = tar_bytes([reg("arch", arch.encode() + b"\n")])
        mdesc, _, config = out.image([layer], arch=arch, compress="gzip")
        ids[arch] = sha256_bytes(config)
        descs.append(dict(mdesc, platform={"os": "linux", "architecture": arch}))
    descs.reverse()  # the host's is not simply the first
    if nested:
        index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                            "manifests": descs}).encode()
        idesc = out.blob(index, "application/vnd.oci.image.index.v1+json")
        out.add(idesc, ref="multi")
    else:
        for desc in descs:
            out.add(desc, ref="multi", platform=desc.pop("platform"))
    out.write_index()
    return d, ids, other


def test_platform_selection(root: Path, tmp_path: Path) -> None:
    host = _host_arch()
    for nested in (True, False):
        d, ids, other = _multi_platform(tmp_path / ("nested" if nested else "flat"), nested)
        [(image_id, names)] = import_ok(root, d)
        assert image_id == ids[host] and names == ["multi:multi"]
        [(image_id, names)] = import_ok(root, d, "--platform", f"linux/{other}")
        assert image_id == ids[other] and names == ["multi:multi"]
        assert inspect(root, image_id)["Architecture"] == other
        before = images(root)
        p = run_cli("import", d, "--platform", "linux/s390x", root=root, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("layerstore: "), p.stderr
        assert str(d) in lines[0] and "linux/s390x" in lines[0]
        assert "linux/amd64" in lines[0] and "linux/arm64" in lines[0]
        assert images(root) == before
    check_clean(root)


# --- whiteouts in the store --------------------------------------------------------------------


def test_whiteout_semantics_in_store(root: Path, tmp_path: Path) -> None:
    base = tar_bytes([
        dir_("d"), reg("d/a", b"a"), reg("d/b", b"b"), dir_("d/sub"), reg("d/sub/c", b"c"),
        reg("x", b"x"), reg("y", b"y"), reg("z", b"z"), dir_("tmp"), reg("tmp/CERN.repo", b"repo"),
        dir_("e"), reg("e/keep", b"k"), reg("e/gone", b"g"),
    ])
    top = tar_bytes([
        dir_("d"), reg("d/new", b"new"), dir_("d/sub"), reg("d/sub/n2", b"n2"),
        reg("d/.wh..wh..opq", b""),            # opaque AFTER the dir's other entries
        reg(".wh.x", b""),                      # plain whiteout
        reg("y", b"new y"), reg(".wh.y", b""),  # same-layer entry before its whiteout
        reg(".wh.z", b""), reg("z", b"new z"),  # ... and after it
        hardlink("tmp/.wh.CERN.repo", "tmp/CERN.repo"),  # a whiteout stored as a hard link
        reg("e/.wh.gone", b""),
    ])
    d = tmp_path / "wh"
    out = OciLayout(d)
    mdesc, _, config = out.image([base, top])
    out.add(mdesc, ref="wh")
    out.write_index()
    [(image_id, _)] = import_ok(root, d)
    assert image_id == sha256_bytes(config)

    e = layer_entries(root, sha256_bytes(top))
    assert e[b"/d"].type == 1 and e[b"/d"].opaque
    assert not e[b"/d/sub"].opaque  # only the marker's own directory
    assert e[b"/d/new"].type == 0 and e[b"/d/sub/n2"].type == 0
    assert e[b"/x"].type == 6
    assert e[b"/y"].type == 0 and e[b"/y"].size == 5   # not hidden by its own layer
    assert e[b"/z"].type == 0 and e[b"/z"].size == 5
    assert e[b"/tmp/CERN.repo"].type == 6
    assert e[b"/e/gone"].type == 6 and b"/e/keep" not in e
    assert not e[b"/e"].opaque
    assert not any(b"/.wh." in p for p in e), "whiteout markers must not be entries"

    ex = export_layout(root, "wh:wh", tmp_path / "out")
    assert [p.read_bytes() for p in ex.layer_paths()] == [base, top]
    merged = tmp_path / "merged"
    merged.mkdir()
    for p in ex.layer_paths():
        apply_layer(p, merged)
    files = {str(p.relative_to(merged)) for p in merged.rglob("*")}
    assert files == {"d", "d/new", "d/sub", "d/sub/n2", "y", "z", "tmp", "e", "e/keep"}
    check_clean(root)


def test_layer_tar_with_symlinked_parent(root: Path, tmp_path: Path) -> None:
    """``lib -> usr/lib`` then ``lib/x``: the entry lands at /usr/lib/x (inside the root),
    and the export still reproduces the tar byte for byte."""
    data = tar_bytes([dir_("usr"), dir_("usr/lib"), sym("lib", "usr/lib"), reg("lib/x", b"x"),
                      sym("abs", "/usr"), reg("abs/y", b"y")])
    src = tmp_path / "l.tar"
    src.write_bytes(data)
    import_ok(root, src, "--tag", "symparent:1")
    e = layer_entries(root, sha256_bytes(data))
    assert e[b"/usr/lib/x"].type == 0 and e[b"/usr/y"].type == 0
    assert e[b"/lib"].type == 2 and e[b"/lib"].target == b"usr/lib"
    assert b"/lib/x" not in e and b"/abs/y" not in e
    ex = export_layout(root, "symparent:1", tmp_path / "out")
    assert ex.layer_paths()[0].read_bytes() == data
    check_clean(root)


def test_export_as_tar_reimports(umoci_layout: dict, root: Path, tmp_path: Path) -> None:
    """``export IMAGE x.tar`` writes an OCI layout tar that imports to the same image."""
    lay = umoci_layout["layout"]
    import_ok(root, lay)
    out = tmp_path / "v2.tar"
    run_cli("-q", "export", "umoci-img:v2", out, root=root)
    unpacked = tmp_path / "v2"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", out, "-C", unpacked], check=True)
    ex = read_layout(unpacked)
    assert ex.manifest["mediaType"] == MT_MANIFEST
    assert all(ld["mediaType"] == MT_LAYER for ld in ex.manifest["layers"])
    root2 = tmp_path / "store2"
    [(image_id, names)] = import_ok(root2, out)
    assert image_id == umoci_layout["manifests"]["v2"]["config"]["digest"]
    assert names == ["umoci-img:v2"]
    check_clean(root2)
