"""The embedded default image: a small, real OCI image layout made by layerstore itself.

Used by ``layerstore demo`` and by tests; no download. Two tags share a base layer:

- ``demo:base``: a minimal root filesystem: a directory skeleton, ``/bin/sh``, ``ls``,
  ``cat`` and ``echo`` copied from this machine with the shared libraries they need (so
  the tree is runnable with ``chroot``), ``/etc`` files, a 2 MiB data file;
- ``demo:app``: the base plus an app layer that adds ``/app``, replaces
  ``/etc/os-release``, deletes ``/etc/motd`` (a whiteout), makes ``/var/cache`` opaque
  and rewrites 4 KiB of the data file (so the two versions share most chunks).

Layers are gzip-compressed as registries serve them. Contents are deterministic for a
given host (fixed mtimes, sorted entries, gzip header mtime 0).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

MTIME = 1_700_000_000
HOST_TOOLS = ["sh", "ls", "cat", "echo"]


def _tarinfo(name: str, type_: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname, ti.mtime = type_, mode, size, link, MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


class _LayerWriter:
    """Collects entries, then writes them in path order (a directory before its
    contents, as tar itself writes them; GNU tar restores directory times that way)."""

    def __init__(self) -> None:
        self.members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.members[name] = (_tarinfo(name, tarfile.DIRTYPE, mode), None)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.members[name] = (_tarinfo(name, tarfile.REGTYPE, mode, len(data)), data)

    def symlink(self, name: str, target: str) -> None:
        self.members[name] = (_tarinfo(name, tarfile.SYMTYPE, 0o777, link=target), None)

    def finish(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self.members, key=lambda n: n.split("/")):
                ti, data = self.members[name]
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def _host_binaries() -> dict[str, bytes]:
    """Host tools and their libraries, by path inside the image ({} if unavailable)."""
    out: dict[str, bytes] = {}
    for tool in HOST_TOOLS:
        path = shutil.which(tool)
        if not path:
            continue
        real = os.path.realpath(path)
        try:
            out["bin/" + tool] = Path(real).read_bytes()
            ldd = subprocess.run(["ldd", real], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in ldd.stdout.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else (parts[0] if parts else "")
            if lib.startswith("/") and os.path.isfile(lib):
                out[lib.lstrip("/")] = Path(os.path.realpath(lib)).read_bytes()
    return out


def _data(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(512)]
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(256) if rnd.random() < 0.3 else b" ".join(rnd.choices(words, k=40))
    return bytes(out[:size])


def base_layer() -> bytes:
    w = _LayerWriter()
    bins = _host_binaries()
    dirs = {"bin", "etc", "usr", "usr/bin", "usr/share", "usr/share/doc", "var", "var/cache",
            "var/cache/demo", "tmp", "root", "app-data"}
    for p in bins:
        parent = os.path.dirname(p)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for d in sorted(dirs):
        w.dir(d, 0o1777 if d == "tmp" else 0o755)
    for p in sorted(bins):
        w.file(p, bins[p], 0o755)
    w.file("etc/os-release", b'NAME="layerstore demo"\nVERSION_ID="1"\n')
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    w.file("etc/motd", b"Welcome to the layerstore demo image.\n")
    w.file("usr/share/doc/README", _data(64 << 10, 1))
    w.file("var/cache/demo/index", _data(8 << 10, 2))
    w.file("app-data/blob.bin", _data(2 << 20, 3))
    w.symlink("usr/bin/sh", "/bin/sh")
    return w.finish()


def app_layer() -> bytes:
    w = _LayerWriter()
    w.dir("app")
    w.file("app/hello.sh", b"#!/bin/sh\necho hello from layerstore\n", 0o755)
    w.dir("etc")
    w.file("etc/os-release", b'NAME="layerstore demo"\nVERSION_ID="2"\n')
    w.file("etc/.wh.motd", b"")
    w.dir("var/cache")
    w.file("var/cache/.wh..wh..opq", b"")
    w.dir("app-data")
    blob = bytearray(_data(2 << 20, 3))
    blob[1 << 20:(1 << 20) + 4096] = _data(4096, 4)
    w.file("app-data/blob.bin", bytes(blob))
    return w.finish()


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_demo_layout(layout: Path) -> list[str]:
    """Write the demo OCI layout at ``layout`` (a new directory); returns its tags."""
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    from .sources import host_platform

    os_, arch, _ = host_platform()
    tars = [base_layer(), app_layer()]
    gz = [gzip.compress(t, mtime=0) for t in tars]
    layer_descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, g)}
                   for g in gz]
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars]
    index = []
    for tag, n in (("base", 1), ("app", 2)):
        config = json.dumps({
            "architecture": arch, "os": os_, "created": "2023-11-14T22:13:20Z",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids[:n]},
            "history": [{"created_by": "layerstore sample: base"},
                        {"created_by": "layerstore sample: app"}][:n],
        }, sort_keys=True).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       **_blob(layout, config)},
            "layers": layer_descs[:n],
        }, sort_keys=True).encode()
        index.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                      **_blob(layout, manifest),
                      "annotations": {"io.containerd.image.name": f"demo:{tag}",
                                      "org.opencontainers.image.ref.name": tag}})
    (layout / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": index}, indent=2))
    return ["demo:base", "demo:app"]
