"""Helpers for tests that feed layerstore images made by real tools.

- ``tree_manifest(root)``: everything about a directory tree that a layer tar can carry
  (type, mode incl. setuid/setgid/sticky, owner, mtime in ns, size, content hash, symlink
  target, device numbers, xattrs, hard-link groups), keyed by the relative path as bytes.
- ``gnu_extract(tar, dest)``: GNU tar extraction as root, keeping everything.
- ``apply_layer(tar, dest)``: apply one OCI layer tar to a plain directory with the OCI
  whiteout rules (``.wh.NAME`` and ``.wh..wh..opq``), independent of layerstore's code.
- ``OciLayout``: write an OCI image layout by hand (blobs, manifests, indexes).
- ``write_tar(path, members)``: a tar from (TarInfo, data) pairs with Python's tarfile.
- ``images(root)`` / ``export_layout(root, ref, dest)``: the CLI's view of the store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import run_cli

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


# --- hashing ---------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def gunzip_digest(path: os.PathLike | str) -> str:
    """sha256 of a gzip file's uncompressed content (a layer's diff_id)."""
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# --- trees -----------------------------------------------------------------------------


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    for n in names:
        out[n.encode()] = os.getxattr(path, n, follow_symlinks=False)
    return out


def blake3_file(path: os.PathLike | str | bytes) -> str:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_manifest(root: os.PathLike | str, *, root_mtime: bool = False,
                  dir_mtimes: bool = True, content: str = "sha256") -> dict[bytes, dict[str, Any]]:
    """Relative path (bytes, root is b".") -> its attributes. Hard links are compared
    as groups: each path of a group records the sorted list of all the group's paths."""
    base = os.fsencode(os.fspath(root))
    out: dict[bytes, dict[str, Any]] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}

    def visit(rel: bytes) -> None:
        full = base if rel == b"." else base + b"/" + rel
        st = os.lstat(full)
        kind = stat.S_IFMT(st.st_mode)
        d: dict[str, Any] = {
            "type": stat.filemode(st.st_mode)[0],
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns,
            "xattrs": _xattrs(full),
        }
        if kind == stat.S_IFDIR and (not dir_mtimes or (rel == b"." and not root_mtime)):
            del d["mtime_ns"]
        if kind == stat.S_IFREG:
            d["size"] = st.st_size
            if content == "blake3":
                d["blake3"] = blake3_file(full)
            else:
                d["sha256"] = sha256_file(full)
        elif kind == stat.S_IFLNK:
            d["target"] = os.readlink(full)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind != stat.S_IFDIR and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        out[rel] = d
        if kind == stat.S_IFDIR:
            for name in sorted(os.listdir(full)):
                visit(name if rel == b"." else rel + b"/" + name)

    visit(b".")
    for paths in inodes.values():
        group = sorted(paths)
        for p in paths:
            out[p]["links"] = group
    return out


_TYPE_CHAR = {0: "-", 1: "d", 2: "l", 3: "c", 4: "b", 5: "p", 6: "w"}


def entries_manifest(entries: dict[bytes, Any], *, root_mtime: bool = False,
                     dir_mtimes: bool = True) -> dict[bytes, dict[str, Any]]:
    """A layer's store entries in ``tree_manifest(content="blake3")`` form."""
    out: dict[bytes, dict[str, Any]] = {}
    groups: dict[int, list[bytes]] = {}
    for vpath, e in entries.items():
        rel = b"." if vpath == b"/" else vpath[1:]
        d: dict[str, Any] = {"type": _TYPE_CHAR[e.type], "mode": oct(e.mode), "uid": e.uid,
                             "gid": e.gid, "mtime_ns": e.mtime_ns, "xattrs": dict(e.xattrs)}
        if e.type == 1 and (not dir_mtimes or (rel == b"." and not root_mtime)):
            del d["mtime_ns"]
        if e.type == 0:
            d["size"] = e.size
            d["blake3"] = e.digest.hex()
        elif e.type == 2:
            d["target"] = e.target
        elif e.type in (3, 4):
            d["rdev"] = tuple(e.rdev)
        if e.link_group:
            groups.setdefault(e.link_group, []).append(rel)
        out[rel] = d
    for paths in groups.values():
        if len(paths) > 1:
            for p in paths:
                out[p]["links"] = sorted(paths)
    return out


def merge_layers(layers: list[dict[bytes, Any]]) -> dict[bytes, Any]:
    """The merged view of store layers (base first), by the OCI rules, from their
    entries: opaque directories hide lower children, whiteouts delete, an entry replaces
    a lower one of another kind, an implicit directory keeps the lower attributes.
    Hard-link groups are made unique per layer."""
    import copy

    def drop(merged: dict, path: bytes, keep_self: bool = False) -> None:
        prefix = path.rstrip(b"/") + b"/"
        for p in [p for p in merged if p.startswith(prefix) or (p == path and not keep_self)]:
            del merged[p]

    merged: dict[bytes, Any] = {}
    for i, entries in enumerate(layers):
        for path in sorted(entries):
            e = entries[path]
            if e.type == 1 and e.opaque:
                drop(merged, path, keep_self=True)
        for path in sorted(entries):
            e = copy.copy(entries[path])
            if e.link_group:
                e.link_group += (i + 1) << 32
            old = merged.get(path)
            if e.type == 6:
                drop(merged, path)
                continue
            if old is not None and (old.type == 1) != (e.type == 1):
                drop(merged, path)
                old = None
            if e.type == 1 and e.implicit and old is not None:
                continue
            merged[path] = e
    return merged


def diff_manifests(a: dict, b: dict) -> list[str]:
    """Human-readable differences (empty if equal)."""
    out = []
    for p in sorted(set(a) | set(b)):
        if p not in a:
            out.append(f"only in second: {p!r} {b[p]}")
        elif p not in b:
            out.append(f"only in first: {p!r} {a[p]}")
        elif a[p] != b[p]:
            keys = sorted(set(a[p]) | set(b[p]))
            out.append(f"{p!r}: " + ", ".join(
                f"{k}: {a[p].get(k)!r} != {b[p].get(k)!r}" for k in keys if a[p].get(k) != b[p].get(k)))
    return out


def assert_same_tree(a: dict, b: dict) -> None:
    d = diff_manifests(a, b)
    assert not d, "trees differ:\n" + "\n".join(d[:40])


def gnu_extract(tar: os.PathLike | str, dest: os.PathLike | str, *extra: str) -> None:
    """Extract with GNU tar as root, keeping owners, modes, xattrs, devices, holes."""
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--same-owner",
                    "-xpf", str(tar), "-C", str(dest), *extra], check=True, capture_output=True)


def gnu_create(src: os.PathLike | str, tar: os.PathLike | str, *extra: str,
               fmt: str = "posix") -> None:
    """A tar of ``src`` by GNU tar with xattrs, sparse files and numeric owners."""
    subprocess.run(["tar", "--create", f"--format={fmt}", "--xattrs", "--xattrs-include=*",
                    "--sparse", "--numeric-owner", "--sort=name", *extra,
                    "-f", str(tar), "-C", str(src), "."], check=True, capture_output=True)


# --- an independent applier for OCI layers ---------------------------------------------


def _rm(path: bytes) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _norm(name: bytes) -> bytes:
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    assert b".." not in parts, name
    return b"/".join(parts)


def apply_layer(tar: os.PathLike | str, dest: os.PathLike | str) -> None:
    """Apply one uncompressed layer tar to ``dest`` with OCI changeset semantics:
    opaque markers and whiteouts delete from what is already in ``dest`` (the lower
    layers) before the layer's own entries are extracted, so a layer's whiteouts never
    hide its own entries and an opaque marker acts whatever its position in the tar.
    An entry whose type differs from what is there replaces it (a file over a
    directory removes the directory)."""
    base = os.fsencode(os.fspath(dest))
    opaque: list[bytes] = []
    whiteouts: list[bytes] = []
    entries: list[tuple[bytes, bool]] = []
    with tarfile.open(tar, "r:", encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf:
            name = _norm(os.fsencode(m.name))
            parent, _, leaf = name.rpartition(b"/")
            if leaf == b".wh..wh..opq":
                opaque.append(parent)
            elif leaf.startswith(b".wh."):
                whiteouts.append((parent + b"/" if parent else b"") + leaf[4:])
            elif name:
                entries.append((name, m.isdir()))
    # directories of the lower layers keep their attributes unless the layer names them;
    # extracting or deleting inside them changes their mtime, so it is put back below
    layer_paths = {name for name, _ in entries}
    lower_dirs = {}
    for dirpath, dirnames, _ in os.walk(base):
        for n in dirnames + [b""]:
            full = os.path.join(dirpath, n) if n else dirpath
            if not os.path.islink(full):
                lower_dirs[full] = os.lstat(full).st_mtime_ns
    for d in opaque:
        full = base + b"/" + d if d else base
        if os.path.isdir(full) and not os.path.islink(full):
            for child in os.listdir(full):
                _rm(full + b"/" + child)
    for w in whiteouts:
        _rm(base + b"/" + w)
    for name, is_dir in entries:
        full = base + b"/" + name
        if os.path.lexists(full):
            there_dir = os.path.isdir(full) and not os.path.islink(full)
            if there_dir != is_dir:
                _rm(full)
    gnu_extract(tar, dest, "--exclude=.wh.*")
    for full, mtime in lower_dirs.items():
        rel = os.path.relpath(full, base)
        if rel != b"." and rel in layer_paths:
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            os.utime(full, ns=(mtime, mtime), follow_symlinks=False)


# --- hand-made OCI layouts ------------------------------------------------------------


@dataclass
class OciLayout:
    """Writes an OCI image layout by hand."""

    path: Path
    manifests: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.path / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes, media_type: str, **extra: Any) -> dict:
        digest = sha256_bytes(data)
        (self.path / "blobs/sha256" / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def blob_path(self, desc_or_digest: dict | str) -> Path:
        d = desc_or_digest["digest"] if isinstance(desc_or_digest, dict) else desc_or_digest
        return self.path / "blobs/sha256" / d.split(":")[1]

    def image(self, layers: list[bytes], *, diff_ids: list[str] | None = None,
              compress: str = "none", config_extra: dict | None = None,
              arch: str = "amd64", config: bytes | None = None) -> tuple[dict, dict, bytes]:
        """Write config, layers and manifest; returns (manifest descriptor, manifest
        document, config bytes). ``layers`` are uncompressed tars."""
        ldescs = []
        for data in layers:
            if compress == "gzip":
                ldescs.append(self.blob(gzip.compress(data, mtime=0), MT_LAYER_GZ))
            elif compress == "zstd":
                import zstandard
                ldescs.append(self.blob(zstandard.ZstdCompressor().compress(data), MT_LAYER_ZST))
            else:
                ldescs.append(self.blob(data, MT_LAYER))
        if config is None:
            cfg = {"architecture": arch, "os": "linux", "config": {},
                   "rootfs": {"type": "layers",
                              "diff_ids": diff_ids if diff_ids is not None
                              else [sha256_bytes(d) for d in layers]}}
            cfg.update(config_extra or {})
            config = json.dumps(cfg, sort_keys=True).encode()
        cdesc = self.blob(config, MT_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cdesc, "layers": ldescs}
        mdesc = self.blob(json.dumps(manifest).encode(), MT_MANIFEST)
        return mdesc, manifest, config

    def add(self, desc: dict, *, ref: str | None = None, name: str | None = None,
            platform: dict | None = None) -> dict:
        d = dict(desc)
        ann = {}
        if name:
            ann[CONTAINERD_NAME] = name
        if ref:
            ann[REF_NAME] = ref
        if ann:
            d["annotations"] = ann
        if platform:
            d["platform"] = platform
        self.manifests.append(d)
        return d

    def write_index(self) -> None:
        (self.path / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.manifests}))

    def rewrite(self, old: dict, data: bytes) -> dict:
        """Replace a blob by ``data`` and return the new descriptor (same media type)."""
        self.blob_path(old).unlink()
        return self.blob(data, old["mediaType"])


# --- tar building -------------------------------------------------------------------------


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], *,
              fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, linkname: str = "",
       mtime: int = 1_700_000_000, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.mode = mode if kind != tarfile.DIRTYPE or mode != 0o644 else 0o755
    t.linkname = linkname
    t.mtime = mtime
    t.uid, t.gid = uid, gid
    return t


def reg(name: str, data: bytes, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    return ti(name, **kw), data


def dir_(name: str, **kw: Any) -> tuple[tarfile.TarInfo, None]:
    return ti(name, tarfile.DIRTYPE, **kw), None


def sym(name: str, target: str, **kw: Any) -> tuple[tarfile.TarInfo, None]:
    return ti(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw), None


def hardlink(name: str, target: str, **kw: Any) -> tuple[tarfile.TarInfo, None]:
    return ti(name, tarfile.LNKTYPE, linkname=target, **kw), None


# --- the CLI's view ------------------------------------------------------------------------


def cli_inproc(*args: str | os.PathLike, root: Path) -> tuple[int, str, str]:
    """The CLI's ``main`` in this process (no interpreter start-up): for the many
    read-only queries (``images``, ``inspect``, ``check``) that follow each import, which
    itself always runs in a subprocess. Returns (exit code, stdout, stderr)."""
    import contextlib

    from layerstore.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["--root", str(root), "-q", *map(str, args)])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def check_clean(root: Path) -> None:
    """``layerstore check`` (in-process) says clean."""
    rc, out, err = cli_inproc("check", root=root)
    assert rc == 0 and "clean" in out, f"check: {out}\n{err}"


def inspect(root: Path, ref: str) -> dict:
    rc, out, err = cli_inproc("inspect", ref, root=root)
    assert rc == 0, err
    return json.loads(out)[0]


def images(root: Path) -> list[dict]:
    rc, out, err = cli_inproc("images", "--json", root=root)
    assert rc == 0, err
    return json.loads(out)


def names_by_id(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in images(root):
        out.setdefault(row["id"], [])
        if row["name"]:
            out[row["id"]].append(row["name"])
    return {k: sorted(v) for k, v in out.items()}


def import_ok(root: Path, path: os.PathLike | str, *args: str) -> list[tuple[str, list[str]]]:
    """Import through the CLI; returns [(image id, names)] as printed."""
    p = run_cli("-q", "import", path, *args, root=root)
    assert "Traceback" not in p.stderr
    out = []
    for line in p.stdout.splitlines():
        if line.strip():
            parts = line.split()
            out.append((parts[0], parts[1:]))
    return out


@dataclass
class Exported:
    path: Path
    index: dict
    manifest: dict
    config: bytes

    def layer_paths(self) -> list[Path]:
        return [self.path / "blobs/sha256" / d["digest"].split(":")[1] for d in self.manifest["layers"]]

    def config_digest(self) -> str:
        return self.manifest["config"]["digest"]


def read_layout(path: Path, index_entry: int = 0) -> Exported:
    index = json.loads((path / "index.json").read_text())
    mdesc = index["manifests"][index_entry]
    mbytes = (path / "blobs/sha256" / mdesc["digest"].split(":")[1]).read_bytes()
    assert sha256_bytes(mbytes) == mdesc["digest"]
    manifest = json.loads(mbytes)
    config = (path / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_bytes()
    return Exported(path, index, manifest, config)


def export_layout(root: Path, ref: str, dest: Path) -> Exported:
    """``layerstore export`` to a directory; checks every blob's digest and returns the
    parsed layout."""
    run_cli("-q", "export", ref, dest, root=root)
    assert (dest / "oci-layout").is_file()
    for blob in (dest / "blobs/sha256").iterdir():
        assert sha256_file(blob) == "sha256:" + blob.name, f"{blob} does not match its digest"
    ex = read_layout(dest)
    cfg = json.loads(ex.config)
    assert [d["digest"] for d in ex.manifest["layers"]] == cfg["rootfs"]["diff_ids"]
    for d in ex.manifest["layers"]:
        assert d["mediaType"] == MT_LAYER
    return ex


def layer_entries(root: Path, diff_id: str) -> dict[bytes, Any]:
    """A layer's entries in the store: vpath -> Entry (internal API, read-only)."""
    from layerstore.store import Store, layers
    from layerstore.store.records import LayerRecord

    s = Store.open(root)
    try:
        with s.env.read() as txn:
            raw = txn.get(bytes.fromhex(diff_id.split(":")[1]), db=s.env.db("layers"))
            assert raw is not None, f"layer {diff_id} not in the store"
            rec = LayerRecord.decode(raw)
            return dict(layers.walk(txn, s.env, rec.layer_no))
    finally:
        s.close()


def layer_count(root: Path) -> int:
    from layerstore.store import Store

    if not (root / "db").exists():
        return 0
    s = Store.open(root)
    try:
        with s.env.read() as txn:
            return txn.stat(s.env.db("layers"))["entries"]
    finally:
        s.close()


def files_under(path: Path, exclude: Path | None = None) -> set[str]:
    """Every path under ``path`` (relative), skipping ``exclude`` and what is below it."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(path):
        if exclude is not None and Path(dirpath) == exclude.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != exclude]
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            if exclude is not None and p == exclude:
                continue
            out.add(str(p.relative_to(path)))
    return out
