"""Bad input through the CLI (issue 2, "Bad input").

Each case: one line ``layerstore: ...`` on stderr naming the input, a non-zero exit, no
traceback, nothing new in ``images``, no new layer (the store already holds one image,
so a partly imported input would show), a store that ``check`` calls clean, no file
left in the store's scratch directory, and no file written outside the store root (the
whole test directory is compared before and after; paths that malicious entries aim at
must not exist).

``import`` runs in a subprocess; the queries after it (images, check) call the CLI's
``main`` in-process to keep the many cases fast.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import assert_clean, run_cli
from helpers_images import (
    MT_LAYER_GZ,
    OciLayout,
    check_clean,
    cli_inproc,
    dir_,
    files_under,
    hardlink,
    images,
    import_ok,
    layer_count,
    layer_entries,
    reg,
    sha256_bytes,
    sym,
    tar_bytes,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

#: where escaping entries would land if they were extracted relative to the input
ESCAPE_NAME = "escaped-by-layerstore"


def _good_layer(tag: str = "good") -> bytes:
    return tar_bytes([dir_("etc"), reg("etc/os-release", f"ID={tag}\n".encode()),
                      reg("big", random.Random(tag).randbytes(150 << 10))])


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one image (made once; each test gets a copy)."""
    top = tmp_path_factory.mktemp("seed")
    good = top / "good.tar"
    good.write_bytes(_good_layer())
    rc, _, err = cli_inproc("import", good, "--tag", "good:1", root=top / "store")
    assert rc == 0, err
    check_clean(top / "store")
    return top / "store"


@pytest.fixture
def env(tmp_path: Path, root: Path, seeded_store: Path) -> dict:
    """A store with one image in it, an input directory, and an empty ``outside``."""
    shutil.copytree(seeded_store, root, symlinks=True)
    assert len(images(root)) == 1
    (tmp_path / "in").mkdir()
    (tmp_path / "outside").mkdir()
    return {"tmp": tmp_path, "root": root, "in": tmp_path / "in", "outside": tmp_path / "outside"}


def assert_rejected(env: dict, path: Path | str, *args: str, words: tuple[str, ...] = (),
                    names_input: bool = True, must_not_exist: tuple[Path, ...] = ()) -> str:
    tmp, root = env["tmp"], env["root"]
    before_files = files_under(tmp, exclude=root)
    before_images = images(root)
    before_layers = layer_count(root)
    p = run_cli("-q", "import", path, *args, root=root, check=False)
    assert p.returncode != 0, f"import of bad input succeeded: {p.stdout}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{p.stderr}"
    msg = lines[0]
    print(f"rejected {Path(path).name}: {msg}")  # shown with -s / on failure
    assert msg.startswith("layerstore: "), msg
    if names_input:
        assert str(path) in msg, f"the message does not name the input {path}: {msg}"
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    assert p.stdout.strip() == ""
    assert images(root) == before_images
    assert layer_count(root) == before_layers, "a layer of the bad input is visible"
    check_clean(root)
    assert not any((root / "tmp").iterdir()), f"left in the scratch dir: {list((root / 'tmp').iterdir())}"
    assert files_under(tmp, exclude=root) == before_files
    assert not any(env["outside"].iterdir())
    for m in must_not_exist:
        assert not os.path.lexists(m), f"{m} was written"
    return msg


def _write(env: dict, name: str, data: bytes) -> Path:
    p = env["in"] / name
    p.write_bytes(data)
    return p


# --- truncated and corrupt streams ----------------------------------------------------


def _layer_with_big_file() -> tuple[bytes, int]:
    """A tar whose last member is a 100 KiB file; returns (bytes, end of its data)."""
    data = tar_bytes([dir_("d"), reg("d/small", b"small"), reg("d/big", random.Random(1).randbytes(100 << 10))])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        big = tf.getmember("d/big")
        end = big.offset_data + -(-big.size // 512) * 512
    return data, end


def test_truncated_tar_mid_file(env: dict) -> None:
    data, end = _layer_with_big_file()
    p = _write(env, "cut-mid-file.tar", data[: end - 40_000])
    assert_rejected(env, p, words=("truncated",))


def test_truncated_tar_at_block_boundary(env: dict) -> None:
    """Cut right after the last member's data: every header is whole, the end-of-archive
    blocks are missing."""
    data, end = _layer_with_big_file()
    assert end % 512 == 0
    p = _write(env, "cut-at-block.tar", data[:end])
    assert_rejected(env, p, words=("truncated",))


def test_truncated_tar_after_header(env: dict) -> None:
    data, _ = _layer_with_big_file()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        big = tf.getmember("d/big")
    p = _write(env, "cut-after-header.tar", data[: big.offset_data])
    assert_rejected(env, p, words=("truncated",))


def test_truncated_gzip(env: dict) -> None:
    data, _ = _layer_with_big_file()
    gz = gzip.compress(data)
    p = _write(env, "cut.tar.gz", gz[: len(gz) // 2])
    assert_rejected(env, p, words=("gzip",))


def test_truncated_zstd(env: dict) -> None:
    import zstandard

    data, _ = _layer_with_big_file()
    z = zstandard.ZstdCompressor().compress(data)
    p = _write(env, "cut.tar.zst", z[: len(z) // 2])
    assert_rejected(env, p, words=("zstd",))


def test_corrupt_gzip(env: dict) -> None:
    data, _ = _layer_with_big_file()
    gz = bytearray(gzip.compress(data))
    gz[len(gz) // 2] ^= 0xFF
    p = _write(env, "corrupt.tar.gz", bytes(gz))
    assert_rejected(env, p)


# --- unsafe entries -------------------------------------------------------------------


def test_entry_with_dotdot(env: dict) -> None:
    target = env["outside"] / ESCAPE_NAME
    for i, name in enumerate(["../outside/" + ESCAPE_NAME, "a/../../outside/" + ESCAPE_NAME,
                              "../../../../../../../../tmp/" + ESCAPE_NAME]):
        p = _write(env, f"dotdot{i}.tar", tar_bytes([reg("ok", b"ok"), reg(name, b"evil")]))
        assert_rejected(env, p, words=("..",), must_not_exist=(target, Path("/tmp") / ESCAPE_NAME))


def test_entry_with_absolute_path(env: dict) -> None:
    target = env["outside"] / ESCAPE_NAME
    p = _write(env, "abs.tar", tar_bytes([reg("ok", b"ok"), reg(str(target), b"evil")]))
    assert_rejected(env, p, words=("absolute",), must_not_exist=(target,))


def test_hard_link_to_missing_target(env: dict) -> None:
    p = _write(env, "hl-missing.tar", tar_bytes([reg("ok", b"ok"), hardlink("h", "does/not/exist")]))
    assert_rejected(env, p, words=("missing",))


def test_hard_link_escaping(env: dict) -> None:
    p = _write(env, "hl-dotdot.tar", tar_bytes([reg("ok", b"ok"), hardlink("h", "../outside/x")]))
    assert_rejected(env, p, words=("..",))
    p = _write(env, "hl-abs.tar", tar_bytes([reg("ok", b"ok"), hardlink("h", "/etc/passwd")]))
    assert_rejected(env, p)


def test_symlink_chain_escaping(env: dict) -> None:
    """A symlink that leads a later entry out of the root (also through a chain)."""
    target = env["tmp"].parent / ESCAPE_NAME
    cases = [
        [sym("a", "../../.."), reg("a/" + ESCAPE_NAME, b"evil")],
        [dir_("d"), sym("d/up", ".."), sym("b", "d/up/.."), reg("b/" + ESCAPE_NAME, b"evil")],
        [sym("a", "b"), sym("b", "c/../../x"), reg("a/" + ESCAPE_NAME, b"evil")],
    ]
    for i, members in enumerate(cases):
        p = _write(env, f"symlink-escape{i}.tar", tar_bytes(members))
        assert_rejected(env, p, must_not_exist=(target, env["outside"] / ESCAPE_NAME))


def test_symlink_loop(env: dict) -> None:
    p = _write(env, "symlink-loop.tar", tar_bytes([sym("a", "b"), sym("b", "a"), reg("a/x", b"x")]))
    assert_rejected(env, p)


def test_symlinked_parent_inside_root_is_fine(env: dict) -> None:
    """``lib -> usr/lib`` then ``lib/x``: stays inside, imports; x is at /usr/lib/x."""
    data = tar_bytes([dir_("usr"), dir_("usr/lib"), sym("lib", "usr/lib"), reg("lib/x", b"x")])
    p = _write(env, "symlink-inside.tar", data)
    import_ok(env["root"], p, "--tag", "inside:1")
    e = layer_entries(env["root"], sha256_bytes(data))
    assert e[b"/usr/lib/x"].type == 0 and e[b"/usr/lib/x"].size == 1
    assert e[b"/lib"].type == 2 and e[b"/lib"].target == b"usr/lib"
    assert b"/lib/x" not in e
    assert not any(env["outside"].iterdir())
    assert_clean(env["root"])


def test_whiteout_with_empty_name(env: dict) -> None:
    p = _write(env, "wh-empty.tar", tar_bytes([dir_("d"), reg("d/.wh.", b"")]))
    assert_rejected(env, p, words=(".wh.",))


# --- not an image ---------------------------------------------------------------------


def test_random_bytes(env: dict) -> None:
    data = random.Random(7).randbytes(10_000)
    assert not data.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd"))
    assert_rejected(env, _write(env, "random.bin", data))


def test_empty_file(env: dict) -> None:
    assert_rejected(env, _write(env, "empty", b""))


def test_text_file(env: dict) -> None:
    assert_rejected(env, _write(env, "notes.txt", b"just some text\nnot a tar at all\n" * 40))


def test_nonexistent_path(env: dict) -> None:
    assert_rejected(env, env["in"] / "does-not-exist.tar", words=("no such file",))


def test_gzip_of_text(env: dict) -> None:
    assert_rejected(env, _write(env, "text.gz", gzip.compress(b"hello, not a tar\n" * 100)))


# --- OCI layouts ----------------------------------------------------------------------


def _layout(env: dict, name: str, *, compress: str = "none") -> tuple[OciLayout, dict, dict, bytes]:
    """A two-layer image whose first layer is fine (so a partial import would show)."""
    lay = OciLayout(env["in"] / name)
    layers = [_good_layer("base-" + name), tar_bytes([reg("top", b"top layer of " + name.encode())])]
    mdesc, manifest, config = lay.image(layers, compress=compress)
    lay.add(mdesc, ref="latest")
    lay.write_index()
    return lay, mdesc, manifest, config


def _relink(lay: OciLayout, mdesc: dict, manifest: dict) -> None:
    """Write ``manifest`` again and point index.json at it."""
    lay.blob_path(mdesc).unlink()
    new = lay.blob(json.dumps(manifest).encode(), mdesc["mediaType"])
    lay.manifests = []
    lay.add(new, ref="latest")
    lay.write_index()


def test_layer_blob_digest_mismatch(env: dict) -> None:
    lay, _, manifest, _ = _layout(env, "corrupt-blob")
    blob = lay.blob_path(manifest["layers"][1])
    data = bytearray(blob.read_bytes())
    data[600] ^= 0x01  # inside the file's content: the tar stays valid
    blob.write_bytes(bytes(data))
    assert_rejected(env, lay.path, words=("digest",))


def test_gzip_layer_blob_digest_mismatch(env: dict) -> None:
    lay, _, manifest, _ = _layout(env, "corrupt-gz-blob", compress="gzip")
    assert manifest["layers"][1]["mediaType"] == MT_LAYER_GZ
    blob = lay.blob_path(manifest["layers"][1])
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01  # the gzip trailer's size field
    blob.write_bytes(bytes(data))
    assert_rejected(env, lay.path)


def test_config_blob_digest_mismatch(env: dict) -> None:
    lay, _, manifest, config = _layout(env, "corrupt-config")
    lay.blob_path(manifest["config"]).write_bytes(config.replace(b'"amd64"', b'"arm64"'))
    assert_rejected(env, lay.path, words=("digest",))


def test_diff_id_mismatch(env: dict) -> None:
    lay, mdesc, manifest, config = _layout(env, "bad-diff-id")
    cfg = json.loads(config)
    cfg["rootfs"]["diff_ids"][1] = sha256_bytes(b"something else")
    manifest["config"] = lay.rewrite(manifest["config"], json.dumps(cfg).encode())
    _relink(lay, mdesc, manifest)
    assert_rejected(env, lay.path, words=("diff_id",))


def test_manifest_names_missing_layer_blob(env: dict) -> None:
    lay, _, manifest, _ = _layout(env, "missing-layer")
    lay.blob_path(manifest["layers"][1]).unlink()
    assert_rejected(env, lay.path, words=("missing",))


def test_manifest_names_missing_config(env: dict) -> None:
    lay, _, manifest, _ = _layout(env, "missing-config")
    lay.blob_path(manifest["config"]).unlink()
    assert_rejected(env, lay.path, words=("missing",))


def test_index_names_missing_manifest(env: dict) -> None:
    lay, mdesc, _, _ = _layout(env, "missing-manifest")
    lay.blob_path(mdesc).unlink()
    assert_rejected(env, lay.path, words=("missing",))


def test_config_not_json(env: dict) -> None:
    lay, mdesc, manifest, _ = _layout(env, "config-not-json")
    manifest["config"] = lay.rewrite(manifest["config"], b"this is { not json")
    _relink(lay, mdesc, manifest)
    assert_rejected(env, lay.path)


def test_manifest_not_json(env: dict) -> None:
    lay, mdesc, _, _ = _layout(env, "manifest-not-json")
    lay.blob_path(mdesc).unlink()
    new = lay.blob(b"<html>not a manifest</html>", mdesc["mediaType"])
    lay.manifests = []
    lay.add(new, ref="latest")
    lay.write_index()
    assert_rejected(env, lay.path)


def test_index_not_json(env: dict) -> None:
    lay, _, _, _ = _layout(env, "index-not-json")
    (lay.path / "index.json").write_text('{"schemaVersion": 2, "manifests": [')
    assert_rejected(env, lay.path, words=("index.json",))


def test_blob_digest_with_path_traversal(env: dict) -> None:
    lay, mdesc, manifest, _ = _layout(env, "digest-traversal")
    manifest["layers"][1]["digest"] = "sha256:../../../../etc/passwd"
    _relink(lay, mdesc, manifest)
    assert_rejected(env, lay.path)


def test_truncated_layout_archive(env: dict) -> None:
    lay, _, _, _ = _layout(env, "layout-archive")
    archive = env["in"] / "layout.tar"
    subprocess.run(["tar", "-cf", archive, "-C", lay.path, "oci-layout", "index.json", "blobs"], check=True)
    data = archive.read_bytes()
    with tarfile.open(archive) as tf:
        last = tf.getmembers()[-1]
    archive.write_bytes(data[: last.offset_data + 100])
    assert_rejected(env, archive)


def test_docker_save_unsafe_layer_path(env: dict) -> None:
    d = env["in"] / "docker-save"
    d.mkdir()
    layer = _good_layer("docker")
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [sha256_bytes(layer)]}}).encode()
    cname = sha256_bytes(cfg).split(":")[1] + ".json"
    (d / cname).write_bytes(cfg)
    (env["outside"].parent / "secret.tar").write_bytes(layer)  # what "../" would reach
    (d / "manifest.json").write_text(json.dumps(
        [{"Config": cname, "RepoTags": ["evil:1"], "Layers": ["../../secret.tar"]}]))
    archive = env["in"] / "docker-save.tar"
    subprocess.run(["tar", "-cf", archive, "-C", d, "."], check=True)
    assert_rejected(env, archive)
    assert_rejected(env, d)


# --- the store root ---------------------------------------------------------------------


def _layer_file(env: dict) -> Path:
    return _write(env, "fine.tar", _good_layer("fine"))


def test_store_root_in_immutable_directory(env: dict, tmp_path: Path) -> None:
    """The root cannot be created: its parent is immutable (``chattr +i`` stops root)."""
    parent = tmp_path / "immutable"
    parent.mkdir()
    src = _layer_file(env)
    r = subprocess.run(["chattr", "+i", parent], capture_output=True, text=True, check=False)
    if r.returncode == 0:
        undo = ["chattr", "-i", parent]
    else:  # a filesystem without the immutable flag: a read-only bind mount instead
        subprocess.run(["mount", "--bind", parent, parent], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", parent], check=True)
        undo = ["umount", parent]
    try:
        p = run_cli("-q", "import", src, root=parent / "store", check=False)
    finally:
        subprocess.run(undo, check=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerstore: "), p.stderr
    print(f"rejected: {lines[0]}")
    assert str(parent / "store") in lines[0]
    assert not (parent / "store").exists()


def test_store_root_read_only_mount(env: dict) -> None:
    """An existing store on a read-only bind mount: import fails cleanly, the store is
    untouched."""
    root = env["root"]
    src = _layer_file(env)
    before = images(root)
    subprocess.run(["mount", "--bind", root, root], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True)
        p = run_cli("-q", "import", src, root=root, check=False)
    finally:
        subprocess.run(["umount", root], check=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerstore: "), p.stderr
    print(f"rejected: {lines[0]}")
    assert str(root) in lines[0]
    assert images(root) == before
    assert_clean(root)


# --- --tag misuse -----------------------------------------------------------------------


def test_tag_with_several_images(env: dict) -> None:
    lay = OciLayout(env["in"] / "two")
    for t in ("one", "two"):
        mdesc, _, _ = lay.image([tar_bytes([reg("f", t.encode())])])
        lay.add(mdesc, ref=t)
    lay.write_index()
    assert_rejected(env, lay.path, "--tag", "x:y", words=("--tag",))


def test_invalid_tag(env: dict) -> None:
    assert_rejected(env, _layer_file(env), "--tag", "Not A Name!", names_input=False,
                    words=("name",))


def test_unknown_platform(env: dict) -> None:
    lay = OciLayout(env["in"] / "plat")
    mdesc, _, _ = lay.image([tar_bytes([reg("f", b"x")])])
    lay.add(mdesc, ref="latest", platform={"os": "linux", "architecture": "amd64"})
    lay.write_index()
    assert_rejected(env, lay.path, "--platform", "linux/mips64", words=("linux/mips64", "linux/amd64"))
    assert_rejected(env, lay.path, "--platform", "nonsense", names_input=False, words=("platform",))

