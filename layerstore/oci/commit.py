"""A container's upper directory as changes (``diff``) and as a new layer (``commit``).

The upper is in kernel-overlayfs format (``overlay/upper.py``): a whiteout is a 0/0
character device, an opaque directory carries ``trusted.overlay.opaque=y``. It is
controlled by the container, so it is walked from directory fds with ``O_NOFOLLOW``,
never through a symlink.

``diff``: like ``docker diff``. A whiteout is ``D`` (when the lowers have the path); an
upper entry whose path the image's merged lowers have is ``C``, else ``A``; an opaque
directory, or a non-directory, where the lowers have a directory is ``C`` and the lower
children it hides (and the upper does not replace) are ``D``.

``commit``: the upper becomes an uncompressed PAX layer tar, deterministic (entries
sorted by path, a directory before its contents; numeric owners, no user/group names):
a whiteout is an empty ``.wh.NAME`` file, an opaque directory is its own entry followed
by ``DIR/.wh..wh..opq``; regular files, directories, symlinks, devices and FIFOs keep
mode, owner, mtime (ns, PAX ``mtime``) and xattrs (``SCHILY.xattr.*``) as the container
sees them: overlayfs' and layerstore's own (``trusted.overlay.*``) are dropped, a container's own
``trusted.overlay.X`` (stored escaped) is written as such; a metacopy file's data is read
from the image's layers (``overlay/upper.py``: ``trusted.overlay.metacopy``); paths of one
inode become tar hard links to the first of them. Sockets are skipped. The tar is
imported through the importer as one more layer on top of the image's, and a new image
is made whose config is the old one with the new diff_id, a history entry and a new
``created``.

A mounted container is paused while its upper is read (the CLI stops its daemon, as
``docker commit`` pauses; ``--no-pause`` does not): the upper is then a state the
container has seen. Without the pause, a file being written meanwhile may be caught
half-written. With FUSE passthrough (``fuse/wire.py``) the kernel writes a file that
was open for writing before the pause without the daemon, so the pause does not stop
those writes: a regular file whose size or times moved between the start of its reading
and the end of the whole reading is noted, and the upper is read again
(``READ_ATTEMPTS`` in all, the pause lifted in between); if some file still moved in
the last reading, it goes in as read and ``warn`` names it. A file that shrank under
its reader cannot be read whole: that reading is abandoned, and after the last one it
is an error (``ChangingFileError``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ChangingFileError, InvalidInputError, LayerstoreError, StoreError
from ..overlay.lazy import LAZY_XATTR, LazyFile
from ..overlay.lower import MergedLowers, Node, StoreLayers
from ..overlay.upper import (
    DIR_FLAGS,
    METACOPY_XATTR,
    REDIRECT_XATTR,
    is_opaque_fd,
    is_whiteout,
    metacopy_source,
    visible_xattr,
    xattrs_at,
)
from ..store import Store
from ..store.containers import resolve_container
from ..store.images import normalize_name, resolve
from ..store.records import DIR, REG, ContainerRecord, ImageRecord
from .importer import Progress, import_image, no_progress
from .sources import ImageSource, LayerSource

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"


@dataclass
class UpperEntry:
    """One path of the upper (vpath absolute, bytes)."""

    vpath: bytes
    st: os.stat_result
    whiteout: bool = False
    opaque: bool = False


def walk_upper(upper: Path) -> Iterator[tuple[UpperEntry, int, bytes]]:
    """Every entry below the upper's root, sorted, a directory before its contents:
    (entry, parent dir fd, name). The fds are valid only during the iteration step."""
    root_fd = os.open(upper, DIR_FLAGS)
    try:
        yield from _walk(root_fd, b"")
    finally:
        os.close(root_fd)


def _walk(dir_fd: int, prefix: bytes) -> Iterator[tuple[UpperEntry, int, bytes]]:
    for name in sorted(os.fsencode(n) for n in os.listdir(dir_fd)):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        vpath = prefix + b"/" + name
        if is_whiteout(st):
            yield UpperEntry(vpath, st, whiteout=True), dir_fd, name
            continue
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                yield UpperEntry(vpath, st, opaque=is_opaque_fd(fd)), dir_fd, name
                yield from _walk(fd, vpath)
            finally:
                os.close(fd)
            continue
        yield UpperEntry(vpath, st), dir_fd, name


# --- materialize ----------------------------------------------------------------------------


def materialize(store: Store, ref: str) -> int:
    """Fill every file of a container's upper whose data is still (in part) in the image
    (``--copy-up lazy`` and ``meta`` leave such files), so kernel overlayfs can mount the
    upper without ``metacopy=on``. Refuses while the container is mounted. Returns how
    many files were filled."""
    import fcntl

    from ..errors import InUseError
    from ..fuse.daemon import LOCK_FILE, container_dir
    from ..overlay.fs import FULL, OverlayFS

    rec, img = _container_image(store, ref)
    cdir = container_dir(store.root, rec.id)
    lock_fd = os.open(cdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUseError(f"container {rec.name} is mounted (umount it first)") from None
        upper = Path(rec.upper)
        fs = OverlayFS(MergedLowers(StoreLayers(store, img.diff_ids)), upper,
                       upper.parent / "work", FULL)
        try:
            return fs.materialize()
        finally:
            fs.close()
    finally:
        os.close(lock_fd)


# --- diff ---------------------------------------------------------------------------------


def _container_image(store: Store, ref: str) -> tuple[ContainerRecord, ImageRecord]:
    with store.env.read() as txn:
        rec = resolve_container(txn, store.env, ref)
        img = resolve(txn, store.env, rec.image_id)
    return rec, img


def changes(store: Store, ref: str) -> list[tuple[str, str]]:
    """``docker diff`` of a container: sorted (kind, path), kind in A, C, D."""
    rec, img = _container_image(store, ref)
    lowers = MergedLowers(StoreLayers(store, img.diff_ids))
    out: dict[bytes, str] = {}
    upper_paths: set[bytes] = set()
    opaque_dirs: list[bytes] = []
    for e, _, _ in walk_upper(Path(rec.upper)):
        upper_paths.add(e.vpath)
        below = lowers.resolve(e.vpath) is not None
        if e.whiteout:
            if below:
                out[e.vpath] = "D"
            continue
        out[e.vpath] = "C" if below else "A"
        if below and (e.opaque or not stat.S_ISDIR(e.st.st_mode)):
            opaque_dirs.append(e.vpath)  # hides what the lowers have below it
    for d in opaque_dirs:
        node = lowers.resolve(d)
        if node is None or node.entry.type != DIR:
            continue
        for name, _ in lowers.listdir(d):
            child = d + b"/" + name
            if child not in upper_paths:
                out[child] = "D"
    return [(kind, os.fsdecode(p)) for p, kind in sorted(out.items())]


# --- commit -------------------------------------------------------------------------------


def _pax_mtime(ti: tarfile.TarInfo, mtime_ns: int) -> None:
    sec, ns = divmod(mtime_ns, 1_000_000_000)
    ti.mtime = sec
    if ns:
        ti.pax_headers["mtime"] = f"{sec}.{ns:09d}".rstrip("0")


def _info(name: str, type_: bytes, mode: int = 0, uid: int = 0, gid: int = 0,
          mtime_ns: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode & 0o7777
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    _pax_mtime(ti, mtime_ns)
    return ti


def _set_xattrs(ti: tarfile.TarInfo, xattrs: dict[bytes, bytes]) -> None:
    """The xattrs the container sees (its own ``trusted.overlay.X`` unescaped; the
    overlay's and layerstore's own dropped) as PAX ``SCHILY.xattr.*`` records."""
    shown = {}
    for key, value in xattrs.items():
        name = visible_xattr(key)
        if name is not None:
            shown[name] = value
    for key in sorted(shown):
        ti.pax_headers["SCHILY.xattr." + key.decode("utf-8", "surrogateescape")] = \
            shown[key].decode("utf-8", "surrogateescape")


class _LowerReader(io.RawIOBase):
    """A lower file's content as a stream (the data of a metacopy upper file)."""

    def __init__(self, lowers: MergedLowers, node: Node):
        self.lowers, self.node, self.pos = lowers, node, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.lowers.read(self.node, self.pos, len(buf))
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _LazyReader(io.RawIOBase):
    """The content of a lazily copied-up upper file (``overlay/lazy.py``): its filled
    blocks from the upper file, the rest from the lowers."""

    def __init__(self, lowers: MergedLowers, lazy: LazyFile, fd: int):
        self.lowers, self.lazy, self.fd, self.pos = lowers, lazy, fd, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.lazy.read(self.lowers, self.fd, self.pos, len(buf))
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _lazy_file(lowers: MergedLowers | None, vpath: bytes, xattrs: dict[bytes, bytes],
               size: int) -> LazyFile | None:
    """The state of a lazily copied-up upper file, None for other files."""
    value = xattrs.get(LAZY_XATTR)
    if value is None:
        return None
    try:
        if lowers is None:
            raise ValueError("no lowers")
        return LazyFile.load(value, lowers, size)
    except ValueError:
        raise InvalidInputError(f"the data of lazily copied-up file {os.fsdecode(vpath)} "
                                "is not in the image") from None


def _metacopy_node(lowers: MergedLowers | None, vpath: bytes, xattrs: dict[bytes, bytes]) -> Node | None:
    """The lower file with the data of an upper metacopy file, None for other files."""
    if METACOPY_XATTR not in xattrs:
        return None
    node = lowers.resolve(metacopy_source(vpath, xattrs.get(REDIRECT_XATTR))) if lowers else None
    if node is None or node.entry.type != REG:
        raise InvalidInputError(f"the data of metacopy file {os.fsdecode(vpath)} is not in the image")
    return node


def _moved(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def write_upper_tar(upper: Path, out: BinaryIO, lowers: MergedLowers | None = None,
                    moved: list[str] | None = None) -> int:
    """Write the upper as a layer tar to ``out``; returns the number of entries. The
    data of metacopy files is read from ``lowers`` (the image's). Regular files whose
    size or times moved after their reading began, up to the end of the whole walk, are
    added to ``moved``: each is in the tar with the size it had when its reading began.
    A file that shrank under its reader cannot be read whole: ChangingFileError."""
    count = 0
    read: list[tuple[str, os.stat_result]] = []
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for e, dir_fd, name in walk_upper(upper):
            rel = os.fsdecode(e.vpath[1:])
            parent, _, leaf = rel.rpartition("/")
            st = e.st
            if e.whiteout:
                wh = (parent + "/" if parent else "") + WH_PREFIX + leaf
                tf.addfile(_info(wh, tarfile.REGTYPE, 0o644))
                count += 1
                continue
            mode = stat.S_IFMT(st.st_mode)
            ti = _info(rel, tarfile.REGTYPE, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
            if stat.S_ISSOCK(mode):
                continue
            xattrs = xattrs_at(dir_fd, name)
            _set_xattrs(ti, xattrs)
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in links:
                ti.type = tarfile.LNKTYPE
                ti.linkname = links[key]
                tf.addfile(ti)
                count += 1
                continue
            if not stat.S_ISDIR(mode) and st.st_nlink > 1:
                links[key] = rel
            lazy = _lazy_file(lowers, e.vpath, xattrs, st.st_size) if stat.S_ISREG(mode) else None
            data = (_metacopy_node(lowers, e.vpath, xattrs)
                    if stat.S_ISREG(mode) and lazy is None else None)
            if lazy is not None:
                assert lowers is not None
                ti.size = st.st_size
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    tf.addfile(ti, io.BufferedReader(_LazyReader(lowers, lazy, fd), 1 << 20))  # type: ignore[arg-type]
                finally:
                    os.close(fd)
            elif data is not None:
                ti.size = st.st_size
                tf.addfile(ti, io.BufferedReader(_LowerReader(lowers, data), 1 << 20))  # type: ignore[arg-type]
            elif stat.S_ISREG(mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as f:
                    before = os.fstat(f.fileno())
                    ti.size = before.st_size
                    try:
                        tf.addfile(ti, f)
                    except OSError as exc:
                        # tarfile's short read ("unexpected end of data"), not a
                        # failure to write the tar (a full disk, say)
                        if os.fstat(f.fileno()).st_size < before.st_size:
                            raise ChangingFileError(
                                f"{rel} shrank while the upper was read (a file the container"
                                " keeps open for writing): commit again") from exc
                        raise
                    if moved is not None:
                        read.append((rel, before))
            elif stat.S_ISDIR(mode):
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                if e.opaque:
                    tf.addfile(_info(rel + "/" + WH_OPAQUE, tarfile.REGTYPE, 0o644))
                    count += 1
            elif stat.S_ISLNK(mode):
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.fsdecode(os.readlink(name, dir_fd=dir_fd))
                tf.addfile(ti)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tf.addfile(ti)
            elif stat.S_ISFIFO(mode):
                ti.type = tarfile.FIFOTYPE
                tf.addfile(ti)
            else:
                continue
            count += 1
    if moved is not None:  # also written after its reading, while the others were read
        for rel, before in read:
            try:
                now = os.lstat(upper / rel)
            except OSError:
                moved.append(rel)
                continue
            if _moved(before, now):
                moved.append(rel)
    return count


#: readings of the upper while files keep changing under it (``commit``)
READ_ATTEMPTS = 3


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def commit_config(old: bytes, diff_ids: list[str], created: str) -> bytes:
    """The old config with the new layer's diff_ids, a history entry and ``created``."""
    try:
        doc: dict[str, Any] = json.loads(old)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError("the image config is not valid JSON") from None
    rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), dict) else {}
    doc["rootfs"] = {**rootfs, "type": "layers", "diff_ids": diff_ids}
    history = doc.get("history") if isinstance(doc.get("history"), list) else []
    doc["history"] = [*history, {"created": created, "created_by": "layerstore commit"}]
    doc["created"] = created
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@contextlib.contextmanager
def _no_pause(cid: str) -> Iterator[None]:
    yield


def _missing(what: str) -> BinaryIO:
    raise InvalidInputError(f"{what} is missing from the store")


def commit(store: Store, ref: str, name: str, progress: Progress | None = None,
           pause: Callable[[str], AbstractContextManager[Any]] | None = None,
           warn: Callable[[str], None] | None = None) -> str:
    """Commit container ``ref`` as image ``name``; returns the new image id.
    ``pause(container_id)``: a context during which the container's upper does not
    change (the CLI stops a mounted container's daemon), but for files open for
    writing before it (see the module docstring); it covers reading the upper only,
    not the import that follows. ``warn``: told of files caught while written."""
    progress = progress or no_progress
    names = [normalize_name(name)]
    with store.importing():
        rec, img = _container_image(store, ref)
        tmp = store.tmp_dir() / f"commit-{rec.id[:12]}-{os.getpid()}.tar"
        try:
            lowers = MergedLowers(StoreLayers(store, img.diff_ids))
            for attempt in range(READ_ATTEMPTS):
                moved: list[str] = []
                try:
                    with open(tmp, "wb") as f, (pause or _no_pause)(rec.id):
                        write_upper_tar(Path(rec.upper), f, lowers, moved)
                except ChangingFileError:
                    if attempt == READ_ATTEMPTS - 1:
                        raise
                    continue
                except LayerstoreError:
                    raise
                except OSError as exc:
                    raise StoreError(f"commit of container {rec.name}: {exc.strerror or exc}"
                                     f" ({exc.filename or tmp})") from exc
                if not moved:
                    break
            if moved and warn is not None:
                more = f" and {len(moved) - 1} more" if len(moved) > 1 else ""
                warn(f"{moved[0]}{more} changed while the upper was read, {READ_ATTEMPTS} times"
                     " (open for writing in the container): committed as read")
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            diff_id = "sha256:" + h.hexdigest()
            size = tmp.stat().st_size
            layers = [LayerSource(open=lambda d=d: _missing(f"layer {d}"), what=f"layer {d}",
                                  diff_id=d) for d in img.diff_ids]
            layers.append(LayerSource(open=lambda: open(tmp, "rb"),  # noqa: SIM115
                                      what=f"upper of container {rec.name}",
                                      diff_id=diff_id, size=size))
            config = commit_config(img.config, [*img.diff_ids, diff_id], _now_rfc3339())
            src = ImageSource(layers=layers, config=config,
                              config_media_type=img.config_media_type,
                              what=f"container {rec.name}")
            result = import_image(store, src, names, progress, f"commit of container {rec.name}")
        finally:
            tmp.unlink(missing_ok=True)
    return result.image_id


__all__ = ["changes", "commit", "commit_config", "walk_upper", "write_upper_tar"]
