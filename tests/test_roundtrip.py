"""Round trip with hypothesis: random layer stacks -> OCI layout -> import -> export.

Each example builds a stack of 1-3 layer tars with Python's ``tarfile`` (PAX format:
xattrs as ``SCHILY.xattr.*``, mtimes with nanoseconds) from a Python model of the tree:
files (empty, small, several chunks), directories, symlinks, hard links, FIFOs and
devices, modes with setuid/setgid/sticky, deletions between layers (``.wh.NAME``
whiteouts, ``.wh..wh..opq`` opaque markers at any position, directories replaced
through a whiteout before or after the new directory, type changes). The layers are put
in a hand-made OCI layout (some gzip, some zstd), imported and exported through the CLI.

Asserted:

- every exported layer blob is byte for byte the original uncompressed layer tar, and
  the config comes back unchanged (same image id);
- the exported layers, applied in order to a directory with OCI whiteout semantics,
  give exactly the model: names, types, content, modes, owners, ns mtimes, user xattrs,
  symlink targets, devices, hard links (same inode, right link count);
- the store's own entries, merged with OCI layer rules, give the same model (this is
  what the mount will show), with file content read back from the chunks;
- ``check`` is clean and the import left no garbage.

Two fixed cases pin down orders the random stacks reach rarely (a whiteout after the
directory that replaces it; an opaque marker after the layer's own children). A second
property: a file's store digest is blake3 of its content (what ``b3sum`` prints) and its
chunks concatenate to the content.

``LAYERSTORE_RT_EXAMPLES=400`` runs a longer hunt than the default 25 examples.
The directory comparison needs root (owners, devices); the store comparison does not.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest
import zstandard
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstore.oci.exporter import get_layer
from layerstore.oci.importer import import_path
from layerstore.store import Store, layers
from layerstore.store.check import check
from layerstore.store.chunks import ChunkParams, get_chunk, get_file, iter_file_data
from layerstore.store.records import BLK, CHR, DIR, FIFO, IMPLICIT, OPAQUE, REG, SYMLINK, WHITEOUT

SMALL_PARAMS = ChunkParams(min_size=2 << 10, avg_size=8 << 10, max_size=32 << 10,
                           compression="none")
PARAMS = [ChunkParams(), SMALL_PARAMS, ChunkParams(2 << 10, 8 << 10, 32 << 10, "zstd:3")]

NAMES = ["a", "b", "etc", "usr", "file.txt", "sp ace", "\u00e9t\u00e9", "..dots", "-x",
         "n" * 120, "raw\udcff\udcfe", "UPPER", ".hidden"]
LINK_TARGETS = [b"a", b"../b", b"/etc/passwd", b"x/y/z", b"t" * 150, b"\xc3\xa9",
                b"../../../../escape", b"."]
XATTR_NAMES = [b"user.a", b"user.mime_type", b"user.x.y"]
UIDS = [0, 0, 1000, 65534, 3_000_000]
#: sizes: empty, tiny, below the default minimum chunk, several default chunks
SIZE_CLASSES = [(0, 0), (1, 100), (1000, 20_000), (65 << 10, 300 << 10)]


@dataclass(eq=False)
class Node:
    """One inode of the model. Never mutated after creation: a change is a new Node, and
    hard links are the same Node object under several paths."""

    kind: str  #: file dir symlink fifo chr blk
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def parent_of(vpath: bytes) -> bytes:
    return vpath.rpartition(b"/")[0] or b"/"


def join(parent: bytes, name: bytes) -> bytes:
    return (b"" if parent == b"/" else parent) + b"/" + name


def is_below(path: bytes, top: bytes) -> bool:
    return top == b"/" or path.startswith(top + b"/")


def ancestors(vpath: bytes) -> list[bytes]:
    """Proper ancestors, top first, without the root."""
    parts = vpath[1:].split(b"/")[:-1]
    return [b"/" + b"/".join(parts[:i + 1]) for i in range(len(parts))]


def tar_info(name: str, node: Node) -> tarfile.TarInfo:
    """A PAX member for a model node (mtime with ns and xattrs in PAX records)."""
    ti = tarfile.TarInfo(name)
    ti.mode, ti.uid, ti.gid = node.mode, node.uid, node.gid
    ti.mtime = node.mtime_ns // 10**9
    ti.uname = ti.gname = ""
    pax = {"mtime": f"{node.mtime_ns // 10**9}.{node.mtime_ns % 10**9:09d}"}
    for k, v in node.xattrs.items():
        pax["SCHILY.xattr." + k.decode()] = v.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
               "symlink": tarfile.SYMTYPE, "fifo": tarfile.FIFOTYPE,
               "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE}[node.kind]
    if node.kind == "symlink":
        ti.linkname = os.fsdecode(node.target)
    if node.kind in ("chr", "blk"):
        ti.devmajor, ti.devminor = node.rdev
    if node.kind == "file":
        ti.size = len(node.data)
    return ti


def write_tar(members: list) -> bytes:
    """A PAX tar of members: TarInfo, or (TarInfo, data) for files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            if isinstance(m, tuple):
                tf.addfile(m[0], io.BytesIO(m[1]))
            else:
                tf.addfile(m)
    return buf.getvalue()


# --- generating layers ---------------------------------------------------------------


class StackGen:
    """Draws a stack of layers from hypothesis, keeping the merged model up to date."""

    def __init__(self, data: st.DataObject):
        self.data = data
        self.state: dict[bytes, Node] = {}  #: merged model, without the root
        self.root: Node | None = None  #: root attributes, if a layer sets them
        self.tars: list[bytes] = []
        self.counter = 0

    def draw(self, strategy: st.SearchStrategy, label: str | None = None):
        return self.data.draw(strategy, label=label)

    # -- attribute draws
    def content(self) -> bytes:
        lo, hi = self.draw(st.sampled_from(SIZE_CLASSES), "size class")
        size = self.draw(st.integers(lo, hi), "size")
        seed = self.draw(st.integers(0, 2**32 - 1), "seed")
        rnd = random.Random(seed)
        kind = self.draw(st.sampled_from(["random", "repeat", "reuse"]), "content")
        if kind == "reuse":
            files = [n.data for n in self.state.values() if n.kind == "file" and n.data]
            if files:
                # an existing file's content, maybe edited: exercises dedup across layers
                base = files[rnd.randrange(len(files))]
                if rnd.random() < 0.5:
                    return base
                cut = rnd.randrange(len(base) + 1)
                return base[:cut] + rnd.randbytes(rnd.randrange(1, 200)) + base[cut:]
        if kind == "repeat" and size:
            pattern = rnd.randbytes(rnd.randrange(1, 5000))
            return (pattern * (size // len(pattern) + 1))[:size]
        return rnd.randbytes(size)

    def attrs(self, kind: str) -> dict:
        mode = self.draw(st.integers(0, 0o7777), "mode")
        if kind == "symlink":
            mode = 0o777
        mtime_ns = self.draw(st.integers(0, 2**33 - 1), "mtime s") * 10**9 + \
            self.draw(st.integers(0, 10**9 - 1), "mtime ns")
        xattrs: dict[bytes, bytes] = {}
        if kind in ("file", "dir") and self.draw(st.booleans(), "has xattrs"):
            for name in self.draw(st.lists(st.sampled_from(XATTR_NAMES), max_size=3,
                                           unique=True)):
                xattrs[name] = self.draw(st.binary(min_size=0, max_size=40), "xattr value")
        return {"mode": mode, "uid": self.draw(st.sampled_from(UIDS), "uid"),
                "gid": self.draw(st.sampled_from(UIDS), "gid"), "mtime_ns": mtime_ns,
                "xattrs": xattrs}

    def new_node(self, kind: str) -> Node:
        a = self.attrs(kind)
        if kind == "file":
            return Node("file", data=self.content(), **a)
        if kind == "symlink":
            return Node("symlink", target=self.draw(st.sampled_from(LINK_TARGETS)), **a)
        if kind in ("chr", "blk"):
            return Node(kind, rdev=(self.draw(st.integers(0, 255)), self.draw(st.integers(0, 255))),
                        **a)
        return Node(kind, **a)

    # -- the stack
    def build(self) -> list[bytes]:
        n_layers = self.draw(st.integers(1, 3), "layers")
        for i in range(n_layers):
            self.tars.append(LayerGen(self, i).build())
        return self.tars


class LayerGen:
    """One layer: a list of tar members, and the model changes they make."""

    def __init__(self, stack: StackGen, index: int):
        self.s = stack
        self.index = index
        self.state = stack.state
        self.start = dict(stack.state)  #: the lower layers' merged tree
        self.members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = []
        self.tail: list[tarfile.TarInfo] = []  #: whiteouts/markers put at the end
        self.touched: set[bytes] = set()  #: paths this layer has an entry for
        self.emitted: set[bytes] = set()  #: real (non-whiteout) entries of this layer
        self.tarname: dict[bytes, str] = {}
        self.dot = stack.draw(st.booleans(), "./ prefix")
        # Leave out the entries of parent directories that exist below (what some tools
        # do); the store makes them implicit and the lower attributes stay. Not combined
        # with opaque/replace, whose meaning for implicit parents differs between tools.
        self.omit_parents = index > 0 and stack.draw(st.booleans(), "omit parents")

    def draw(self, strategy, label=None):
        return self.s.draw(strategy, label)

    def name(self, vpath: bytes) -> str:
        return ("./" if self.dot else "") + os.fsdecode(vpath[1:])

    # -- emitting
    def info(self, vpath: bytes, node: Node) -> tarfile.TarInfo:
        return tar_info(self.name(vpath), node)

    def emit(self, vpath: bytes, node: Node) -> None:
        self.emit_ancestors(vpath)
        ti = self.info(vpath, node)
        self.members.append((ti, node.data) if node.kind == "file" else ti)
        self.tarname[vpath] = ti.name
        self.emitted.add(vpath)
        self.touched.add(vpath)
        self.state[vpath] = node

    def emit_ancestors(self, vpath: bytes) -> None:
        for a in ancestors(vpath):
            if a in self.emitted:
                continue
            node = self.state[a]
            assert node.kind == "dir"
            if self.omit_parents and a in self.start and self.start[a] is node:
                continue
            self.emit(a, node)

    def marker(self, vpath: bytes, at_end: bool) -> None:
        """A whiteout-style empty file (``.wh.NAME`` or the opaque marker)."""
        self.emit_ancestors(vpath)
        ti = tarfile.TarInfo(self.name(vpath))
        ti.mode = 0
        ti.mtime = 0
        (self.tail if at_end else self.members).append(ti)

    # -- model changes
    def remove_tree(self, top: bytes, keep_emitted: bool = False, self_too: bool = True) -> None:
        for p in [p for p in self.state if p == top or is_below(p, top)]:
            if p == top and not self_too:
                continue
            if keep_emitted and p in self.emitted:
                continue
            del self.state[p]

    def fresh_name(self, parent: bytes) -> bytes:
        base = os.fsencode(self.draw(st.sampled_from(NAMES), "name"))
        vpath = join(parent, base)
        while vpath in self.state or vpath in self.touched or vpath in self.start:
            self.s.counter += 1
            vpath = join(parent, base[:200] + b"%d" % self.s.counter)
        return vpath

    def dirs(self) -> list[bytes]:
        return [b"/"] + sorted(p for p, n in self.state.items()
                               if n.kind == "dir" and p.count(b"/") < 5)

    def lower_untouched(self, want_dir: bool | None = None) -> list[bytes]:
        """Lower paths this layer may still change: no entry of this layer at, below or
        (for whiteouts, replaced dirs) above them."""
        out = []
        for p, n in sorted(self.state.items()):
            if p not in self.start or self.start[p] is not n or p in self.touched:
                continue
            if want_dir is not None and (n.kind == "dir") != want_dir:
                continue
            if any(is_below(t, p) for t in self.touched):
                continue
            out.append(p)
        return out

    # -- operations
    def op_add(self) -> None:
        kind = self.draw(st.sampled_from(["file", "file", "file", "dir", "dir", "symlink",
                                          "hardlink", "fifo", "chr"]), "add kind")
        parent = self.draw(st.sampled_from(self.dirs()), "parent")
        vpath = self.fresh_name(parent)
        if kind == "hardlink":
            targets = sorted(p for p in self.emitted if self.state.get(p) is not None
                             and self.state[p].kind != "dir")
            if not targets:
                return
            target = self.draw(st.sampled_from(targets), "link target")
            node = self.state[target]
            self.emit_ancestors(vpath)
            ti = self.info(vpath, node)
            ti.type, ti.size, ti.linkname = tarfile.LNKTYPE, 0, self.tarname[target]
            self.members.append(ti)
            self.tarname[vpath] = ti.name
            self.emitted.add(vpath)
            self.touched.add(vpath)
            self.state[vpath] = node
            return
        self.emit(vpath, self.s.new_node(kind))

    def op_modify(self) -> None:
        """A new version of a lower non-directory (content and/or attributes)."""
        cands = self.lower_untouched(want_dir=False)
        if not cands:
            return self.op_add()
        p = self.draw(st.sampled_from(cands), "modify")
        old = self.state[p]
        if old.kind == "file" and self.draw(st.booleans(), "same content"):
            node = self.s.new_node("file")
            node.data = old.data
        else:
            node = self.s.new_node(old.kind if old.kind != "symlink" else "symlink")
        self.emit(p, node)

    def op_chattr_dir(self) -> None:
        cands = self.lower_untouched(want_dir=True)
        if not cands:
            return self.op_add()
        p = self.draw(st.sampled_from(cands), "chattr dir")
        self.emit(p, self.s.new_node("dir"))

    def op_whiteout(self) -> None:
        cands = self.lower_untouched()
        if not cands:
            return self.op_add()
        p = self.draw(st.sampled_from(cands), "whiteout")
        at_end = self.draw(st.booleans(), "whiteout at end")
        parent, _, base = p.rpartition(b"/")
        self.marker(join(parent or b"/", b".wh." + base), at_end)
        self.remove_tree(p)
        self.touched.add(p)

    def op_opaque(self) -> None:
        cands = [p for p in sorted(self.state) if self.state[p].kind == "dir"
                 and p in self.start and self.start[p] is self.state[p]]
        if not cands or self.omit_parents:
            return self.op_add()
        d = self.draw(st.sampled_from(cands), "opaque")
        at_end = self.draw(st.booleans(), "opaque marker at end")
        self.marker(join(d, b".wh..wh..opq"), at_end)
        # Hides the lower layers' content under d; this layer's own entries stay.
        self.remove_tree(d, keep_emitted=True, self_too=False)
        self.touched.add(d)

    def op_replace(self) -> None:
        """Replace a lower path by a new one of any type, maybe with a whiteout of the
        old one (before or after the new entry: both mean 'delete the lower one')."""
        dirs = self.lower_untouched(want_dir=True)
        cands = dirs if dirs and self.draw(st.booleans(), "replace a dir") else \
            self.lower_untouched()
        if not cands or self.omit_parents:
            return self.op_add()
        p = self.draw(st.sampled_from(cands), "replace")
        kind = self.draw(st.sampled_from(["dir", "dir", "file", "symlink"]), "replace kind")
        whiteout = self.draw(st.sampled_from([None, "before", "after"]), "replace whiteout")
        if self.state[p].kind == "dir" and kind == "dir" and whiteout is None:
            whiteout = "before"  # a dir over a dir without a whiteout is op_chattr_dir
        parent, _, base = p.rpartition(b"/")
        if whiteout == "before":
            self.marker(join(parent or b"/", b".wh." + base), at_end=False)
        self.remove_tree(p)
        self.emit(p, self.s.new_node(kind))
        if whiteout == "after":
            self.marker(join(parent or b"/", b".wh." + base), at_end=True)

    def build(self) -> bytes:
        if self.index == 0 and self.draw(st.booleans(), "root entry"):
            self.s.root = self.s.new_node("dir")
            ti = self.info(b"/", self.s.root)
            ti.name = "./"
            self.members.append(ti)
        ops = [self.op_add] if self.index == 0 else [
            self.op_add, self.op_add, self.op_modify, self.op_chattr_dir, self.op_whiteout,
            self.op_whiteout, self.op_opaque, self.op_replace, self.op_replace]
        n = self.draw(st.integers(1, 15 if self.index == 0 else 10), "ops")
        for _ in range(n):
            self.draw(st.sampled_from(ops), "op")()
        return write_tar(self.members + self.tail)


# --- OCI layout in and out -----------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(dest: Path, tars: list[bytes], compressions: list[str]) -> bytes:
    """A hand-made OCI image layout; returns the config bytes."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    layer_descs = []
    for tar, comp in zip(tars, compressions):
        if comp == "gzip":
            blob, mt = gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif comp == "zstd":
            blob, mt = zstandard.ZstdCompressor().compress(tar), \
                "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, mt = tar, "application/vnd.oci.image.layer.v1.tar"
        layer_descs.append({"mediaType": mt, "digest": put(blob), "size": len(blob)})
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in tars]},
        "history": [{"created_by": "test_roundtrip"} for _ in tars],
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": layer_descs,
    }).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
         "size": len(manifest)}]}
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return config


def read_layout(path: Path) -> tuple[bytes, list[bytes]]:
    """(config, uncompressed layer blobs) of an exported layout, a directory or a tar."""
    if path.is_dir():
        def get(name: str) -> bytes:
            return (path / name).read_bytes()
    else:
        with tarfile.open(path) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]

        def get(name: str) -> bytes:
            return files[name]
    assert json.loads(get("oci-layout"))["imageLayoutVersion"] == "1.0.0"
    index = json.loads(get("index.json"))
    assert len(index["manifests"]) >= 1

    def blob(desc: dict) -> bytes:
        data = get("blobs/sha256/" + desc["digest"].split(":")[1])
        assert sha256(data) == desc["digest"] and len(data) == desc["size"]
        return data

    manifest = json.loads(blob(index["manifests"][0]))
    for l in manifest["layers"]:
        assert l["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    return blob(manifest["config"]), [blob(l) for l in manifest["layers"]]


# --- applying tars to a directory ----------------------------------------------------


def raw_pax_xattrs(tar: bytes, m: tarfile.TarInfo) -> dict[bytes, bytes]:
    """SCHILY.xattr records from a member's raw PAX header (tarfile decodes those values
    lossily, so read the bytes)."""
    out: dict[bytes, bytes] = {}
    pos = m.offset
    while pos < m.offset_data - 512:
        hdr = tar[pos:pos + 512]
        size = int(hdr[124:136].rstrip(b"\0 ") or b"0", 8)
        body = tar[pos + 512:pos + 512 + size]
        if hdr[156:157] == b"x":
            i = 0
            while i < len(body):
                sp = body.index(b" ", i)
                n = int(body[i:sp])
                key, _, value = body[sp + 1:i + n - 1].partition(b"=")
                if key.startswith(b"SCHILY.xattr."):
                    out[key[len(b"SCHILY.xattr."):]] = value
                i += n
        pos += 512 + (size + 511) // 512 * 512
    return out


def rm(host: bytes) -> None:
    if os.path.isdir(host) and not os.path.islink(host):
        shutil.rmtree(host)
    elif os.path.lexists(host):
        os.unlink(host)


def apply_layer(root: bytes, tar: bytes) -> list[tuple[bytes, tarfile.TarInfo]]:
    """Extract one layer over ``root`` with OCI semantics; returns its directory members
    (their attributes are set at the very end, after all layers)."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        members = tf.getmembers()

    def vpath(name: str) -> bytes:
        parts = [p for p in os.fsencode(name).split(b"/") if p not in (b"", b".")]
        return b"/" + b"/".join(parts)

    # Whiteouts and opaque markers apply to the lower layers only, wherever they are.
    for m in members:
        p = vpath(m.name)
        parent, _, base = p.rpartition(b"/")
        if base == b".wh..wh..opq":
            if not os.path.isdir(root + parent):
                continue  # a lower directory that an opaque parent already emptied
            for child in os.listdir(root + parent):
                rm(root + parent + b"/" + child)
        elif base.startswith(b".wh."):
            rm(root + (parent or b"") + b"/" + base[4:])
    dirs = []
    for m in members:
        p = vpath(m.name)
        if p.rpartition(b"/")[2].startswith(b".wh."):
            continue
        host = root + (p if p != b"/" else b"")
        if m.isdir():
            if not (os.path.isdir(host) and not os.path.islink(host)):
                rm(host)
                os.mkdir(host)
            dirs.append((host, m))
            # dir over dir: the children stay, the metadata (xattrs too) is the new one
            for k in os.listxattr(host):
                if k.startswith("user."):
                    os.removexattr(host, k)
            for k, v in raw_pax_xattrs(tar, m).items():
                os.setxattr(host, k, v)
            continue
        rm(host)
        if m.islnk():
            os.link(root + vpath(m.linkname), host, follow_symlinks=False)
            continue
        if m.isreg():
            with open(host, "wb") as out:
                out.write(tar[m.offset_data:m.offset_data + m.size])
            for k, v in raw_pax_xattrs(tar, m).items():
                os.setxattr(host, k, v)
        elif m.issym():
            os.symlink(os.fsencode(m.linkname), host)
        elif m.isfifo():
            os.mkfifo(host)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(host, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        else:
            raise AssertionError(f"unexpected member {m.name} {m.type!r}")
        set_attrs(host, m)
    return dirs


def mtime_ns(m: tarfile.TarInfo) -> int:
    s, _, ns = m.pax_headers["mtime"].partition(".")
    return int(s) * 10**9 + int(ns.ljust(9, "0"))


def set_attrs(host: bytes, m: tarfile.TarInfo) -> None:
    os.lchown(host, m.uid, m.gid)
    if not m.issym():
        os.chmod(host, m.mode)
    t = mtime_ns(m)
    os.utime(host, ns=(t, t), follow_symlinks=False)


def extract(root: Path, tars: list[bytes]) -> None:
    root_b = os.fsencode(root)
    all_dirs = []
    for t in tars:
        all_dirs += apply_layer(root_b, t)
    # Directory attributes last (their mtimes changed as children came and went), in
    # layer order so an upper layer's entry wins.
    for host, m in all_dirs:
        if os.path.isdir(host) and not os.path.islink(host):
            set_attrs(host, m)


KIND_OF_MODE = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                stat.S_IFIFO: "fifo", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk"}


def compare_tree(root: Path, model: dict[bytes, Node], root_node: Node | None) -> None:
    root_b = os.fsencode(root)
    found = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        for n in dirnames + filenames:
            host = os.path.join(dirpath, n)
            found[host[len(root_b):]] = os.lstat(host)
    assert sorted(found) == sorted(model), "extracted names differ from the model"
    checks = list(model.items()) + ([(b"", root_node)] if root_node else [])
    for p, node in checks:
        host = root_b + p
        st_ = found.get(p) or os.lstat(host)
        what = f"{p!r}"
        assert KIND_OF_MODE[stat.S_IFMT(st_.st_mode)] == node.kind, what
        assert (st_.st_uid, st_.st_gid) == (node.uid, node.gid), what
        assert st_.st_mtime_ns == node.mtime_ns, what
        if node.kind != "symlink":
            assert stat.S_IMODE(st_.st_mode) == node.mode, what
            xattrs = {k: os.getxattr(host, k, follow_symlinks=False)
                      for k in os.listxattr(host, follow_symlinks=False)
                      if k.startswith("user.")}
            assert {k.encode(): v for k, v in xattrs.items()} == node.xattrs, what
        if node.kind == "file":
            with open(host, "rb") as f:
                assert f.read() == node.data, what
        elif node.kind == "symlink":
            assert os.readlink(host) == node.target, what
        elif node.kind in ("chr", "blk"):
            assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == node.rdev, what
    # hard links: one inode per Node, link count = number of paths
    groups: dict[int, list[bytes]] = {}
    for p, node in model.items():
        if node.kind != "dir":
            groups.setdefault(id(node), []).append(p)
    inos = set()
    for paths in groups.values():
        got = {found[p].st_ino for p in paths}
        assert len(got) == 1, f"{paths} should be one inode"
        assert found[paths[0]].st_nlink == len(paths), f"{paths}: link count"
        assert not (got & inos), f"{paths} share an inode with other paths"
        inos |= got


# --- the store's view ----------------------------------------------------------------

TYPE_OF = {REG: "file", DIR: "dir", SYMLINK: "symlink", FIFO: "fifo", CHR: "chr", BLK: "blk"}


def merge_store(store: Store, diff_ids: list[str]) -> dict[bytes, tuple]:
    """The image's merged tree from the store's entries with OCI rules:
    vpath -> (entry, layer index)."""
    merged: dict[bytes, tuple] = {}

    def drop(top: bytes, self_too: bool = True) -> None:
        for p in [p for p in merged if (p == top and self_too) or
                  (p != top and is_below(p, top))]:
            del merged[p]

    recs = [get_layer(store, d) for d in diff_ids]
    with store.env.read() as txn:
        for li, rec in enumerate(recs):
            for vpath, e in layers.walk(txn, store.env, rec.layer_no):
                old = merged.get(vpath)
                if e.type == WHITEOUT:
                    drop(vpath)
                elif e.type == DIR:
                    if old is not None and old[0].type != DIR:
                        drop(vpath)
                        old = None
                    if e.flags & OPAQUE:
                        drop(vpath, self_too=False)
                    if e.flags & IMPLICIT and old is not None:
                        continue  # the lower directory's attributes stay
                    merged[vpath] = (e, li)
                else:
                    drop(vpath)
                    merged[vpath] = (e, li)
    return merged


def compare_store(store: Store, diff_ids: list[str], model: dict[bytes, Node],
                  root_node: Node | None) -> None:
    merged = merge_store(store, diff_ids)
    root_entry = merged.pop(b"/", None)  # None only if no layer has any entry
    assert root_entry is not None or not model
    assert sorted(merged) == sorted(model), "the store's merged names differ from the model"
    checks = [(p, merged[p], n) for p, n in model.items()]
    if root_node is not None:
        checks.append((b"/", root_entry, root_node))
    for p, (e, _), node in checks:
        what = f"{p!r}: {e}"
        assert TYPE_OF[e.type] == node.kind, what
        assert (e.mode, e.uid, e.gid, e.mtime_ns) == \
            (node.mode, node.uid, node.gid, node.mtime_ns), what
        assert e.xattrs == node.xattrs, what
        if node.kind == "file":
            assert e.size == len(node.data), what
            assert e.digest == blake3.blake3(node.data).digest(), what
            if node.data:
                assert b"".join(iter_file_data(store.env, e.digest)) == node.data, what
        elif node.kind == "symlink":
            assert e.target == node.target, what
        elif node.kind in ("chr", "blk"):
            assert tuple(e.rdev) == node.rdev, what
    # hard links: paths of one model inode are entries of one layer with one link group
    groups: dict[int, list[bytes]] = {}
    for p, node in model.items():
        if node.kind != "dir":
            groups.setdefault(id(node), []).append(p)
    for paths in groups.values():
        if len(paths) > 1:
            got = {(merged[p][1], merged[p][0].link_group) for p in paths}
            assert len(got) == 1 and next(iter(got))[1] != 0, f"{paths}: {got}"


# --- the tests -----------------------------------------------------------------------


def roundtrip(tmp: Path, tars: list[bytes], model: dict[bytes, Node], root_node: Node | None,
              compressions: list[str], params: ChunkParams, as_tar: bool) -> None:
    """Import ``tars`` as one image through the CLI, export it, compare everything."""
    root = tmp / "store"
    Store.open(root, params=params, map_size=64 << 20).close()
    config = write_layout(tmp / "layout", tars, compressions)
    out = run_cli("import", tmp / "layout", "--tag", "rt:1", root=root)
    assert sha256(config) in out.stdout
    dest = tmp / ("out.tar" if as_tar else "out")
    run_cli("export", "rt:1", dest, root=root)

    got_config, got_layers = read_layout(dest)
    assert got_config == config
    assert len(got_layers) == len(tars)
    for i, (got, want) in enumerate(zip(got_layers, tars)):
        assert got == want, f"layer {i} differs after export"

    if os.geteuid() == 0:  # owners, devices and setuid bits need root (CI runs as root)
        (tmp / "tree").mkdir()
        extract(tmp / "tree", got_layers)
        compare_tree(tmp / "tree", model, root_node)

    with Store.open(root) as s:
        assert s.params == params, "the store's chunking parameters changed"
        compare_store(s, [sha256(t) for t in tars], model, root_node)
        res = check(s.env)
        assert res.clean, res.damage
        assert (res.garbage_chunks, res.garbage_files, res.garbage_layers) == (0, 0, 0)


@settings(max_examples=int(os.environ.get("LAYERSTORE_RT_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_roundtrip(data: st.DataObject) -> None:
    gen = StackGen(data)
    tars = gen.build()
    compressions = [data.draw(st.sampled_from(["none", "gzip", "zstd"]), "compression")
                    for _ in tars]
    params = data.draw(st.sampled_from(PARAMS), "chunk params")
    as_tar = data.draw(st.booleans(), "export as tar")
    with tempfile.TemporaryDirectory(prefix="rt-") as tmp:
        roundtrip(Path(tmp), tars, gen.state, gen.root, compressions, params, as_tar)


def _node(kind: str, mode: int = 0o755, data: bytes = b"", **kw) -> Node:
    return Node(kind, mode=mode, uid=kw.pop("uid", 0), gid=kw.pop("gid", 0),
                mtime_ns=kw.pop("mtime_ns", 1_600_000_000_123_456_789), data=data, **kw)


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_recreated_dir_hides_lower_children_whatever_the_order(tmp_path: Path,
                                                              whiteout_first: bool) -> None:
    """``.wh.d`` and a new ``d/`` in one layer replace the lower ``d`` with everything
    in it, whether the whiteout comes before or after the new directory (OCI: a
    whiteout only applies to the lower layers)."""
    d1, old, sub, x = _node("dir"), _node("file", 0o644, b"old"), _node("dir"), \
        _node("file", 0o600, b"x" * 70000)
    l1 = write_tar([tar_info("d", d1), (tar_info("d/old", old), old.data),
                    tar_info("d/sub", sub), (tar_info("d/sub/x", x), x.data)])
    d2 = _node("dir", 0o1777, mtime_ns=5)
    new = _node("file", 0o4755, b"new")
    wh = tarfile.TarInfo(".wh.d")
    body = [tar_info("d", d2), (tar_info("d/new", new), new.data)]
    l2 = write_tar([wh, *body] if whiteout_first else [*body, wh])
    roundtrip(tmp_path, [l1, l2], {b"/d": d2, b"/d/new": new}, None, ["none", "gzip"],
              SMALL_PARAMS, False)


def test_opaque_marker_after_new_children(tmp_path: Path) -> None:
    """The opaque marker hides the lower children only, even after this layer's own."""
    d, a, b = _node("dir"), _node("file", 0o644, b"a"), _node("file", 0o644, b"b")
    l1 = write_tar([tar_info("d", d), (tar_info("d/a", a), a.data),
                    (tar_info("d/b", b), b.data)])
    b2, c = _node("file", 0o600, b"b2"), _node("symlink", 0o777, target=b"../a")
    l2 = write_tar([tar_info("d", d), (tar_info("d/b", b2), b2.data), tar_info("d/c", c),
                    tarfile.TarInfo("d/.wh..wh..opq")])
    roundtrip(tmp_path, [l1, l2], {b"/d": d, b"/d/b": b2, b"/d/c": c}, None,
              ["zstd", "none"], ChunkParams(), True)


def b3sum(path: Path) -> str:
    out = subprocess.run(["b3sum", "--no-names", str(path)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 700_000), min_size=1, max_size=4),
       seed=st.integers(0, 2**32 - 1), params=st.sampled_from(PARAMS),
       repetitive=st.booleans())
def test_file_digest_is_b3sum_and_chunks_concatenate(sizes, seed, params, repetitive) -> None:
    rnd = random.Random(seed)
    contents = []
    for n in sizes:
        if repetitive and n:
            pat = rnd.randbytes(rnd.randrange(1, 3000))
            contents.append((pat * (n // len(pat) + 1))[:n])
        else:
            contents.append(rnd.randbytes(n))
    with tempfile.TemporaryDirectory(prefix="b3-") as tmp:
        tmp_p = Path(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for i, c in enumerate(contents):
                ti = tarfile.TarInfo(f"f{i}")
                ti.size = len(c)
                tf.addfile(ti, io.BytesIO(c))
        (tmp_p / "layer.tar").write_bytes(buf.getvalue())
        with Store.open(tmp_p / "store", params=params, map_size=16 << 20) as s:
            import_path(s, tmp_p / "layer.tar", tag="b3:1")
            rec = get_layer(s, sha256(buf.getvalue()))
            with s.env.read() as txn:
                entries = {p: layers.lookup(txn, s.env, rec.layer_no, p)
                           for p in (b"/f%d" % i for i in range(len(contents)))}
                for i, c in enumerate(contents):
                    e = entries[b"/f%d" % i]
                    assert e is not None and e.size == len(c)
                    (tmp_p / "f").write_bytes(c)
                    assert e.digest.hex() == b3sum(tmp_p / "f") == blake3.blake3(c).hexdigest()
                    if not c:
                        continue
                    frec = get_file(txn, s.env, e.digest)
                    parts = [get_chunk(txn, s.env, d) for d, _ in frec.chunks]
                    assert b"".join(parts) == c
                    assert frec.size == len(c)
                    assert [len(p) for p in parts] == [n for _, n in frec.chunks]
                    assert all(blake3.blake3(p).digest() == d
                               for p, (d, _) in zip(parts, frec.chunks))
                    assert all(len(p) <= params.max_size for p in parts)
                    assert all(len(p) >= params.min_size for p in parts[:-1])
            r = check(s.env)
            assert r.clean, r.damage
