"""What an import path holds: images, their configs and their layer blobs.

``open_source(path, tmp_dir, platform)`` recognises, in this order:

1. a directory with ``oci-layout``: an OCI image layout;
2. a directory with ``manifest.json``: an unpacked ``docker save``;
3. any other directory: a root filesystem (read with GNU tar: xattrs, hard links,
   sparse files, numeric owners, sorted names, no atime/ctime, so it is reproducible);
4. a tar whose members are those of an OCI layout (``oci-layout``, ``index.json``,
   ``blobs/...``) or a docker save (``manifest.json``, ``<id>/layer.tar`` ...), also
   gzip- or zstd-compressed (then unpacked to a temporary file first);
5. any other tar, plain, gzip or zstd (by magic bytes): a single layer.

Each image comes back as an ``ImageSource`` whose layers open lazily. Every blob read
through ``Blobs.read_verified`` is checked against its digest; layer blobs are checked
while they stream (``importer.py``). Paths named inside the input (docker's
``manifest.json``) are confined to the input; digests are validated before they become
paths, so ``blobs/sha256/../../x`` cannot be read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as _platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..digest import parse_oci_digest
from ..errors import (
    BlobNotFoundError,
    DigestMismatchError,
    InvalidInputError,
    PlatformNotFoundError,
)
from .streams import detect_compression, open_layer_stream

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}
MANIFEST_TYPES = {MT_OCI_MANIFEST, MT_DOCKER_MANIFEST}
CONFIG_TYPES = {MT_OCI_CONFIG, MT_DOCKER_CONFIG}
LAYER_TYPE_RE = re.compile(
    r"^application/vnd\.(oci\.image\.layer(\.nondistributable)?\.v1\.tar(\+gzip|\+zstd)?"
    r"|docker\.image\.rootfs\.(foreign\.)?diff\.tar(\.gzip)?)$"
)

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

#: manifests and configs larger than this are refused (they are small JSON documents)
MAX_JSON = 16 << 20

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
         "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}


def host_platform() -> tuple[str, str, str]:
    machine = _platform.machine()
    arch = _ARCH.get(machine, machine)
    variant = {"aarch64": "v8", "armv7l": "v7", "armv6l": "v6"}.get(machine, "")
    return "linux", arch, variant


def parse_platform(text: str | None) -> tuple[str, str, str]:
    if not text:
        return host_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidInputError(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT])")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


@dataclass
class LayerSource:
    """One layer blob of an image, opened on demand."""

    open: Callable[[], BinaryIO]
    what: str  #: for messages: where the blob is
    media_type: str = MT_OCI_LAYER
    digest: str | None = None  #: the blob's digest as the manifest names it
    size: int | None = None
    diff_id: str | None = None  #: from the config; None for a bare layer tar


@dataclass
class ImageSource:
    """One image of the input."""

    layers: list[LayerSource]
    config: bytes | None = None  #: None: make one (bare layer tar or directory)
    config_media_type: str = MT_OCI_CONFIG
    manifest: bytes = b""
    manifest_media_type: str = ""
    names: list[str] = field(default_factory=list)
    what: str = ""


# --- blob access ---------------------------------------------------------------------


class Blobs:
    """Named files inside an input, a directory or a tar (random access)."""

    def __init__(self, label: str):
        self.label = label

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def read_json_file(self, name: str) -> Any:
        data = self.read(name)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInputError(f"{self.label}: {name} is not valid JSON") from None

    def read(self, name: str) -> bytes:
        if not self.exists(name):
            raise BlobNotFoundError(f"{self.label}: {name} is missing")
        if self.size(name) > MAX_JSON:
            raise InvalidInputError(f"{self.label}: {name} is too large for a JSON document")
        with self.open(name) as f:
            return f.read()

    def blob_name(self, digest: str) -> str:
        try:
            alg, hexd = parse_oci_digest(digest)
        except ValueError:
            raise InvalidInputError(f"{self.label}: invalid digest {digest!r}") from None
        return f"blobs/{alg}/{hexd}"

    def read_verified(self, digest: str, what: str) -> bytes:
        name = self.blob_name(digest)
        if not self.exists(name):
            raise BlobNotFoundError(f"{self.label}: {what} blob {digest} is missing")
        data = self.read(name)
        alg, hexd = parse_oci_digest(digest)
        if hashlib.new(alg, data).hexdigest() != hexd:
            raise DigestMismatchError(f"{self.label}: {what} blob {digest} does not match its digest")
        return data


def _safe_name(name: str, label: str) -> str:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or name.startswith("/"):
        raise InvalidInputError(f"{label}: unsafe path {name!r} in the image metadata")
    return "/".join(parts)


class DirBlobs(Blobs):
    def __init__(self, root: Path):
        super().__init__(str(root))
        self.root = root.resolve()

    def _path(self, name: str) -> Path:
        p = (self.root / _safe_name(name, self.label)).resolve()
        if p != self.root and self.root not in p.parents:
            raise InvalidInputError(f"{self.label}: {name!r} leads outside the input")
        return p

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise BlobNotFoundError(f"{self.label}: {name} is missing") from None
        except OSError as exc:
            raise InvalidInputError(f"{self.label}: cannot read {name}: {exc.strerror}") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size


class TarBlobs(Blobs):
    def __init__(self, path: Path, label: str | None = None):
        super().__init__(label or str(path))
        try:
            self.tar = tarfile.open(path, "r:")
            self.members = {}
            for m in self.tar:
                self.members[_norm_member(m.name)] = m
        except (tarfile.TarError, EOFError) as exc:
            raise InvalidInputError(f"{self.label}: not a valid tar archive ({exc})") from None

    def _member(self, name: str) -> tarfile.TarInfo | None:
        name = _safe_name(name, self.label)
        m = self.members.get(name)
        seen = 0
        while m is not None and (m.issym() or m.islnk()) and seen < 8:
            # docker save links identical layers to each other
            target = m.linkname if m.islnk() else os.path.normpath(
                os.path.join(os.path.dirname(name), m.linkname))
            name = _safe_name(target, self.label)
            m = self.members.get(name)
            seen += 1
        return m if m is not None and m.isreg() else None

    def open(self, name: str) -> BinaryIO:
        m = self._member(name)
        if m is None:
            raise BlobNotFoundError(f"{self.label}: {name} is missing")
        f = self.tar.extractfile(m)
        assert f is not None
        return f  # type: ignore[return-value]

    def exists(self, name: str) -> bool:
        return self._member(name) is not None

    def size(self, name: str) -> int:
        m = self._member(name)
        return m.size if m is not None else 0


def _norm_member(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


# --- OCI image layout ------------------------------------------------------------------


def _platform_of(desc: dict[str, Any]) -> tuple[str, str, str] | None:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return None
    return p.get("os", ""), p.get("architecture", ""), p.get("variant", "")


def _pick_platform(descs: list[dict[str, Any]], want: tuple[str, str, str], label: str) -> dict[str, Any]:
    with_platform = [d for d in descs if _platform_of(d) is not None]
    if not with_platform:
        return descs[0]
    os_, arch, variant = want
    matches = [d for d in with_platform
               if _platform_of(d)[:2] == (os_, arch)  # type: ignore[index]
               and (not variant or _platform_of(d)[2] in ("", variant))]  # type: ignore[index]
    if not matches:
        avail = ", ".join(sorted({"/".join(x for x in _platform_of(d) if x)  # type: ignore[union-attr]
                                  for d in with_platform}))
        want_s = "/".join(x for x in want if x)
        raise PlatformNotFoundError(f"{label}: no image for platform {want_s} (available: {avail})")
    # prefer an exact variant match
    exact = [d for d in matches if _platform_of(d)[2] == variant]  # type: ignore[index]
    return (exact or matches)[0]


def _ref_name(desc: dict[str, Any], default_repo: str) -> str | None:
    ann = desc.get("annotations") or {}
    full = ann.get(CONTAINERD_NAME)
    if full:
        return str(full)
    ref = ann.get(REF_NAME)
    if not ref:
        return None
    ref = str(ref)
    if "/" in ref or ":" in ref:
        return ref
    return f"{default_repo}:{ref}"  # a bare tag, as umoci and skopeo write it


def _repo_from_label(label: str) -> str:
    base = os.path.basename(label.rstrip("/")) or "image"
    for ext in (".tar.gz", ".tgz", ".tar.zst", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    base = re.sub(r"[^a-z0-9._-]", "-", base.lower()).strip("-._") or "image"
    return base


def read_oci_layout(blobs: Blobs, want: tuple[str, str, str]) -> list[ImageSource]:
    label = blobs.label
    layout = blobs.read_json_file("oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise InvalidInputError(f"{label}: oci-layout has no imageLayoutVersion")
    index = blobs.read_json_file("index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidInputError(f"{label}: index.json has no manifests")
    repo = _repo_from_label(label)
    # Group the top-level descriptors by name: one image per name (several platforms of
    # one name form an implicit index).
    groups: dict[str | None, list[dict[str, Any]]] = {}
    for desc in index["manifests"]:
        if not isinstance(desc, dict):
            raise InvalidInputError(f"{label}: index.json has a malformed descriptor")
        groups.setdefault(_ref_name(desc, repo), []).append(desc)
    images: dict[str, ImageSource] = {}
    order: list[str] = []
    for name, descs in groups.items():
        descs = [d for d in descs if d.get("mediaType") in INDEX_TYPES | MANIFEST_TYPES
                 or "mediaType" not in d]
        if not descs:
            continue
        desc = _pick_platform(descs, want, label)
        mdesc, manifest = _resolve_manifest(blobs, desc, want, label)
        if manifest is None:
            continue
        key = mdesc["digest"]
        if key not in images:
            img = _oci_image(blobs, mdesc, manifest, label)
            if img is None:
                continue
            images[key] = img
            order.append(key)
        if name:
            images[key].names.append(name)
    if not order:
        raise InvalidInputError(f"{label}: the OCI layout holds no image")
    return [images[k] for k in order]


def _resolve_manifest(blobs: Blobs, desc: dict[str, Any], want: tuple[str, str, str], label: str,
                      depth: int = 0) -> tuple[dict[str, Any], bytes | None]:
    if depth > 4:
        raise InvalidInputError(f"{label}: image indexes nested too deeply")
    data = blobs.read_verified(str(desc.get("digest", "")), "manifest")
    try:
        doc = json.loads(data)
    except ValueError:
        raise InvalidInputError(f"{label}: manifest {desc.get('digest')} is not JSON") from None
    mt = desc.get("mediaType") or doc.get("mediaType")
    if mt in INDEX_TYPES or (mt is None and "manifests" in doc):
        subs = [d for d in doc.get("manifests") or [] if isinstance(d, dict)
                and (d.get("mediaType") in INDEX_TYPES | MANIFEST_TYPES or "mediaType" not in d)]
        if not subs:
            return desc, None
        sub = _pick_platform(subs, want, label)
        return _resolve_manifest(blobs, sub, want, label, depth + 1)
    return desc, data


def _oci_image(blobs: Blobs, mdesc: dict[str, Any], data: bytes, label: str) -> ImageSource | None:
    manifest = json.loads(data)
    cdesc = manifest.get("config")
    if not isinstance(cdesc, dict) or not isinstance(manifest.get("layers"), list):
        raise InvalidInputError(f"{label}: manifest {mdesc.get('digest')} has no config or layers")
    if manifest.get("artifactType") or cdesc.get("mediaType") not in CONFIG_TYPES:
        return None  # an artifact, not an image
    config = blobs.read_verified(str(cdesc.get("digest", "")), "config")
    diff_ids = _diff_ids(config, label)
    ldescs = manifest["layers"]
    if len(ldescs) != len(diff_ids):
        raise InvalidInputError(
            f"{label}: manifest has {len(ldescs)} layers but the config lists {len(diff_ids)} diff_ids")
    layers = []
    for ld, diff_id in zip(ldescs, diff_ids):
        mt = str(ld.get("mediaType", ""))
        if not LAYER_TYPE_RE.match(mt):
            raise InvalidInputError(f"{label}: unsupported layer media type {mt!r}")
        digest = str(ld.get("digest", ""))
        name = blobs.blob_name(digest)
        if not blobs.exists(name):
            raise BlobNotFoundError(f"{label}: layer blob {digest} is missing")
        layers.append(LayerSource(open=lambda n=name: blobs.open(n), what=f"{label}: layer {digest}",
                                  media_type=mt, digest=digest, size=ld.get("size"), diff_id=diff_id))
    return ImageSource(layers=layers, config=config, config_media_type=str(cdesc["mediaType"]),
                       manifest=data, manifest_media_type=str(
                           mdesc.get("mediaType") or manifest.get("mediaType") or MT_OCI_MANIFEST),
                       what=label)


def _diff_ids(config: bytes, label: str) -> list[str]:
    try:
        doc = json.loads(config)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"{label}: the image config is not valid JSON") from None
    try:
        diff_ids = doc["rootfs"]["diff_ids"]
        assert isinstance(diff_ids, list)
        for d in diff_ids:
            parse_oci_digest(d)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise InvalidInputError(f"{label}: the image config has no valid rootfs.diff_ids") from None
    return [str(d) for d in diff_ids]


# --- docker save -------------------------------------------------------------------------

_HEX64 = re.compile(r"(?:^|/)(?:sha256:)?([0-9a-f]{64})(?:\.json)?$")


def read_docker_save(blobs: Blobs) -> list[ImageSource]:
    label = blobs.label
    doc = blobs.read_json_file("manifest.json")
    if not isinstance(doc, list) or not doc:
        raise InvalidInputError(f"{label}: manifest.json is not a list of images")
    out = []
    for item in doc:
        if not isinstance(item, dict) or "Config" not in item or "Layers" not in item:
            raise InvalidInputError(f"{label}: manifest.json entry lacks Config or Layers")
        cname = str(item["Config"])
        config = blobs.read(cname)
        m = _HEX64.search(cname)
        if m:
            if hashlib.sha256(config).hexdigest() != m.group(1):
                raise DigestMismatchError(f"{label}: config {cname} does not match its digest")
        diff_ids = _diff_ids(config, label)
        lnames = [str(x) for x in item["Layers"]]
        if len(lnames) != len(diff_ids):
            raise InvalidInputError(
                f"{label}: manifest.json lists {len(lnames)} layers but the config has {len(diff_ids)}")
        layers = []
        for ln, diff_id in zip(lnames, diff_ids):
            if not blobs.exists(ln):
                raise BlobNotFoundError(f"{label}: layer {ln} is missing")
            m = re.search(r"(?:^|/)blobs/(sha256|sha512)/([0-9a-f]+)$", ln)
            layers.append(LayerSource(open=lambda n=ln: blobs.open(n), what=f"{label}: {ln}",
                                      digest=f"{m.group(1)}:{m.group(2)}" if m else None,
                                      size=blobs.size(ln), diff_id=diff_id))
        names = [str(t) for t in item.get("RepoTags") or []]
        out.append(ImageSource(layers=layers, config=config, config_media_type=MT_DOCKER_CONFIG
                               if b"container_config" in config else MT_OCI_CONFIG,
                               names=names, what=label))
    return out


def _docker_names(blobs: Blobs, images: list[ImageSource]) -> list[ImageSource]:
    """Docker 25+ writes both index.json and manifest.json: the layout is read from the
    index, and the names from ``RepoTags`` (``foo:1.0``, as docker shows them, rather
    than the index's ``docker.io/library/foo:1.0``)."""
    if not blobs.exists("manifest.json"):
        return images
    try:
        doc = blobs.read_json_file("manifest.json")
        tags = {hashlib.sha256(blobs.read(str(item["Config"]))).hexdigest(): item.get("RepoTags")
                for item in doc if isinstance(item, dict) and "Config" in item}
    except (InvalidInputError, TypeError, KeyError):
        return images
    for img in images:
        repo_tags = tags.get(hashlib.sha256(img.config or b"").hexdigest())
        if repo_tags:
            img.names = [str(t) for t in repo_tags]
    return images


# --- directories and bare layers ---------------------------------------------------------


def _tar_directory(path: Path) -> tuple[BinaryIO, Callable[[], None]]:
    """A reproducible tar stream of a directory, made by GNU tar."""
    tar = shutil.which("tar")
    if tar is None:
        raise InvalidInputError("importing a directory needs GNU tar (apt-get install tar)")
    proc = subprocess.Popen(
        [tar, "--create", "--file=-", "--format=pax", "--numeric-owner", "--sort=name",
         # sparse format 0.0: 0.1 and 1.0 put the pid in the member name (GNUSparseFile.%p)
         "--xattrs", "--xattrs-include=*", "--sparse", "--sparse-version=0.0",
         "--one-file-system",
         "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
         "-C", str(path), "."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    err: list[bytes] = []
    t = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    t.start()

    def finish() -> None:
        rc = proc.wait()
        t.join()
        if rc not in (0, 1):  # 1: "file changed as we read it"
            msg = b"".join(err).decode(errors="replace").strip().splitlines()
            raise InvalidInputError(f"{path}: tar failed: {msg[-1] if msg else rc}")

    return proc.stdout, finish  # type: ignore[return-value]


_ARCHIVE_MEMBER = re.compile(
    r"^(oci-layout|index\.json|manifest\.json|repositories|blobs(/.*)?"
    r"|[0-9a-f]{64}(\.json|\.tar|/.*)?)$")  # <hex>.tar: skopeo's docker-archive layers


def _tar_kind(path: Path) -> str:
    """'oci', 'docker' or 'layer' for an uncompressed tar file; reads headers only."""
    names = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                n = _norm_member(m.name)
                if not n:
                    continue
                if not _ARCHIVE_MEMBER.match(n):
                    return "layer"
                names.add(n)
    except (tarfile.TarError, EOFError):
        return "layer"  # let the layer reader give the precise error
    if "oci-layout" in names and "index.json" in names:
        return "oci"
    if "manifest.json" in names:
        return "docker"
    return "layer"


@contextlib.contextmanager
def open_source(path: Path, tmp_dir: Path, platform: str | None = None) -> Iterator[list[ImageSource]]:
    """The images in ``path``; temporary files (if any) are removed on exit."""
    want = parse_platform(platform)
    label = str(path)
    if not os.path.lexists(path):
        raise InvalidInputError(f"{label}: no such file or directory")
    if path.is_dir():
        if (path / "oci-layout").is_file():
            yield _docker_names(DirBlobs(path), read_oci_layout(DirBlobs(path), want))
        elif (path / "manifest.json").is_file():
            yield read_docker_save(DirBlobs(path))
        else:
            holder: dict[str, Any] = {}

            def open_dir() -> BinaryIO:
                stream, finish = _tar_directory(path)
                holder["finish"] = finish
                return stream

            layer = LayerSource(open=open_dir, what=label)
            layer.finish = lambda: holder.pop("finish", lambda: None)()  # type: ignore[attr-defined]
            yield [ImageSource(layers=[layer], what=label)]
        return
    if not path.is_file():
        raise InvalidInputError(f"{label}: not a regular file or directory")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise InvalidInputError(f"{label}: cannot read: {exc.strerror}") from None
    comp = detect_compression(head)
    if comp != "none":
        if _compressed_is_archive(path, label):
            with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="import-", suffix=".tar") as tmp:
                with open(path, "rb") as raw:
                    stream, _ = open_layer_stream(raw, label)
                    shutil.copyfileobj(stream, tmp, 1 << 20)
                tmp.flush()
                with _tar_source(Path(tmp.name), label, want) as images:
                    yield images
            return
        yield [ImageSource(layers=[LayerSource(open=lambda: open(path, "rb"), what=label,
                                               size=path.stat().st_size)], what=label)]
        return
    with _tar_source(path, label, want) as images:
        yield images


@contextlib.contextmanager
def _tar_source(path: Path, label: str, want: tuple[str, str, str]) -> Iterator[list[ImageSource]]:
    kind = _tar_kind(path)
    if kind == "layer":
        yield [ImageSource(layers=[LayerSource(open=lambda: open(path, "rb"), what=label,
                                               size=path.stat().st_size)], what=label)]
        return
    blobs = TarBlobs(path, label)
    try:
        yield (_docker_names(blobs, read_oci_layout(blobs, want)) if kind == "oci"
               else read_docker_save(blobs))
    finally:
        blobs.tar.close()


def _compressed_is_archive(path: Path, label: str) -> bool:
    """Does a compressed file hold an image archive rather than a layer? (first member)"""
    with open(path, "rb") as raw:
        stream, _ = open_layer_stream(raw, label)
        try:
            head = stream.read(512)
        except InvalidInputError:
            return False
    try:
        info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except (tarfile.TarError, EOFError):
        return False
    name = _norm_member(info.name)
    return bool(name) and bool(_ARCHIVE_MEMBER.match(name)) and not name.startswith(".wh.")


__all__ = ["ImageSource", "LayerSource", "open_source", "host_platform"]
