"""``layerstore-overlay``: a fuse-overlayfs-compatible entry point.

    layerstore-overlay [-f] [-d] -o lowerdir=A:B,upperdir=U,workdir=W MOUNTPOINT
    mount -t fuse.layerstore-overlay SRC MOUNTPOINT -o lowerdir=...,upperdir=...,workdir=...

The second form works through Debian's fuse3 (``/sbin/mount.fuse -> mount.fuse3``), which
runs ``layerstore-overlay SRC MOUNTPOINT -o OPTS`` from ``PATH``; ``SRC`` becomes the
mount's fsname. It is the same ``OverlayFS`` and ``Operations`` as ``layerstore mount``,
started by the same daemon code (``daemon.spawn``/``serve_fuse``): the command returns
once the mount is live (or exits non-zero with the daemon's one-line error), and the
daemon exits when the mountpoint is unmounted (``umount MOUNTPOINT``).

Lowers (``lowerdir=``, colon-separated, the leftmost is the top, ``\\:`` and ``\\,``
escape):

- a host directory in kernel-overlayfs lower format (``overlay/dirlower.py``);
- ``image:NAME:TAG``: all layers of a store image, in order (its top layer highest);
- ``layer:sha256:HEX``: one store layer by diff_id.

Store lowers are read from ``-o root=STORE`` (default ``LAYERSTORE_ROOT``, else the
default store root). Directory and store lowers can be mixed in one stack. A relative
directory literally named ``image`` or ``layer`` must be written ``./image``.

Without ``upperdir`` and ``workdir`` the mount is read-only (as with kernel overlayfs and
fuse-overlayfs). Options honoured: ``lowerdir``, ``upperdir``, ``workdir``, ``root``,
``log=FILE`` (the daemon's log; default none), ``allow_other``, ``allow_root``,
``fsname``, ``debug`` (with ``-d``: debug log, foreground), ``metacopy=on|off`` (as
kernel overlayfs: metadata-only copy-up, ``overlay/fs.py``; default off, as
fuse-overlayfs copies the data), and the mount flags libfuse
passes to the kernel (``ro``, ``rw``, ``dev``, ``nodev``, ``suid``, ``nosuid``, ``exec``,
``noexec``, ``atime``, ``noatime``, ``sync``, ``async``, ``dirsync``). mount(8)'s own
options (``defaults``, ``auto``, ``nofail``, ``_netdev``, ``x-*``, ...) are dropped
silently; anything else (fuse-overlayfs' ``squash_to_root``, ``uidmapping``, ``fast_ino``,
...) is ignored with a one-line warning. Unlike fuse-overlayfs the mountpoint must not
already be a mount point (a non-empty one is fine).

Imports: ``fuse -> overlay -> store`` only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import LayerNotFoundError, LayerstoreError, StoreAccessError, UsageError
from . import daemon

PROG = "layerstore-overlay"
USAGE = (f"usage: {PROG} [-f] [-d] -o lowerdir=A:B[,upperdir=U,workdir=W][,OPTS] "
         "[SOURCE] MOUNTPOINT")
#: mount flags libfuse2 passes to mount(2)
MOUNT_FLAGS = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime",
               "noatime", "sync", "async", "dirsync"}
#: options that are mount(8)'s or fstab's business, not the filesystem's
MOUNT_TABLE_OPTIONS = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser",
                       "users", "owner", "group", "comment"}
STORE_PREFIXES = ("image", "layer")


@dataclass
class Lower:
    """One ``lowerdir=`` element: a host directory, or store layers (diff_ids, top first)."""

    text: str
    path: Path | None = None
    diff_ids: list[str] = field(default_factory=list)


@dataclass
class Args:
    mountpoint: Path | None = None
    source: str | None = None
    lowers: list[Lower] = field(default_factory=list)
    upper: Path | None = None
    work: Path | None = None
    root: Path | None = None
    log: Path | None = None
    foreground: bool = False
    debug: bool = False
    allow_other: bool = False
    copy_up: str = "full"
    fuse_options: dict[str, Any] = field(default_factory=dict)


def split_escaped(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` not escaped by a backslash; escapes are kept."""
    out, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_lowerdir(value: str) -> list[Lower]:
    """``A:image:NAME:TAG:layer:sha256:HEX:B`` -> its lowers, top first."""
    parts = split_escaped(value, ":")
    out: list[Lower] = []
    i = 0
    while i < len(parts):
        word = unescape(parts[i])
        if word in STORE_PREFIXES:
            if i + 2 >= len(parts) or not parts[i + 1] or not parts[i + 2]:
                want = "image:NAME:TAG" if word == "image" else "layer:sha256:HEX"
                raise UsageError(f"lowerdir: {':'.join(parts[i:])!r} is not {want}")
            a, b = unescape(parts[i + 1]), unescape(parts[i + 2])
            out.append(Lower(f"{word}:{a}:{b}"))
            i += 3
        else:
            if not word:
                raise UsageError("lowerdir: empty element (data-only lowers '::' are not supported)")
            out.append(Lower(word, path=Path(word).absolute()))
            i += 1
    return out


def parse_args(argv: list[str], warn: Callable[[str], None]) -> Args:
    args = Args()
    options: list[str] = []
    positional: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "-o":
            try:
                options.append(next(it))
            except StopIteration:
                raise UsageError("-o needs an argument") from None
        elif a.startswith("-o") and a != "-o":
            options.append(a[2:])
        elif a == "-f":
            args.foreground = True
        elif a == "-d":
            args.debug = args.foreground = True
        elif a == "--":
            positional.extend(it)
        elif a.startswith("-") and a != "-":
            warn(f"ignoring unknown flag {a}")
        else:
            positional.append(a)
    if not positional:
        raise UsageError("no mountpoint given")
    if len(positional) > 2:
        raise UsageError(f"too many arguments: {' '.join(positional)}")
    args.mountpoint = Path(positional[-1])
    if len(positional) == 2:
        args.source = positional[0]
    for opts in options:
        for opt in split_escaped(opts, ","):
            if opt:
                _apply_option(args, opt, warn)
    if not args.lowers:
        raise UsageError("missing -o lowerdir=DIR[:DIR...]")
    if (args.upper is None) != (args.work is None):
        raise UsageError("upperdir and workdir go together (without both the mount is read-only)")
    return args


def _apply_option(args: Args, opt: str, warn: Callable[[str], None]) -> None:
    key, eq, raw = opt.partition("=")
    value = unescape(raw)
    if key == "lowerdir" and eq:
        args.lowers = parse_lowerdir(raw)
    elif key in ("upperdir", "workdir", "root", "log") and eq and value:
        p = Path(value).absolute()
        setattr(args, {"upperdir": "upper", "workdir": "work"}.get(key, key), p)
    elif key == "fsname" and eq:
        args.fuse_options["fsname"] = value
    elif key == "allow_other" and not eq:
        args.allow_other = True
    elif key == "allow_root" and not eq:
        args.fuse_options["allow_root"] = True
    elif key == "debug" and not eq:
        args.debug = args.foreground = True
    elif key == "metacopy" and value in ("on", "off"):
        args.copy_up = "meta" if value == "on" else "full"
    elif key in MOUNT_FLAGS and not eq:
        if key != "rw":
            args.fuse_options[key] = True
    elif key in MOUNT_TABLE_OPTIONS or key.startswith("x-"):
        pass
    else:
        warn(f"ignoring option {opt}")


def _check_dir(what: str, p: Path) -> os.stat_result:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UsageError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {p}: {exc.strerror}") from None
    if not os.path.isdir(p):
        raise UsageError(f"{what} {p} is not a directory")
    return st


def check(args: Args) -> None:
    """Everything that can be checked before the fork: one-line errors."""
    for low in args.lowers:
        if low.path is not None:
            _check_dir("lowerdir", low.path)
    if args.upper is not None and args.work is not None:
        su, sw = _check_dir("upperdir", args.upper), _check_dir("workdir", args.work)
        if su.st_dev != sw.st_dev:
            raise UsageError(f"upperdir {args.upper} and workdir {args.work} are not on the "
                             "same filesystem")
        u, w = os.path.realpath(args.upper), os.path.realpath(args.work)
        if u == w or u.startswith(w + "/") or w.startswith(u + "/"):
            raise UsageError("upperdir and workdir must be separate directories, neither inside "
                             "the other")
    store_lowers = [low for low in args.lowers if low.path is None]
    if store_lowers:
        _resolve_store_lowers(args.root, store_lowers)


def _resolve_store_lowers(root: Path | None, lowers: list[Lower]) -> None:
    """Fill in the diff_ids of ``image:``/``layer:`` lowers (the store is opened and closed
    here; the daemon opens its own after the fork)."""
    from ..store import Store
    from ..store.images import resolve

    store = Store.open(root, create=False)
    try:
        env = store.env
        with env.read() as txn:
            for low in lowers:
                kind, _, ref = low.text.partition(":")
                if kind == "image":
                    low.diff_ids = list(reversed(resolve(txn, env, ref).diff_ids))
                else:
                    algo, _, hexd = ref.partition(":")
                    try:
                        key = bytes.fromhex(hexd)
                    except ValueError:
                        key = b""
                    if algo != "sha256" or len(key) != 32:
                        raise UsageError(f"lowerdir: {low.text!r} is not layer:sha256:HEX")
                    if txn.get(key, db=env.db("layers")) is None:
                        raise LayerNotFoundError(f"no such layer: {ref}")
                    low.diff_ids = [ref]
    finally:
        store.close()


def _serve(args: Args, mp: Path, ready: Callable[[], None]) -> None:
    """In the daemon: build the stack of lowers and serve it."""
    from ..overlay.dirlower import ChainedLayers, DirLayers
    from ..overlay.lower import MergedLowers, StoreLayers
    from ..store import Store

    store = None
    sources: list[Any] = []
    try:
        if any(low.path is None for low in args.lowers):
            store = Store.open(args.root, create=False)  # after the fork
        # runs of directories become one DirLayers, runs of store layers one StoreLayers
        runs: list[list[Lower]] = []
        for low in args.lowers:
            if runs and (runs[-1][0].path is None) == (low.path is None):
                runs[-1].append(low)
            else:
                runs.append([low])
        for run in runs:
            if run[0].path is not None:
                sources.append(DirLayers([low.path for low in run if low.path is not None]))
            else:
                assert store is not None
                top_first = [d for low in run for d in low.diff_ids]
                sources.append(StoreLayers(store, list(reversed(top_first))))
        layers = sources[0] if len(sources) == 1 else ChainedLayers(sources)
        fsname = args.fuse_options.pop("fsname", None) or args.source or PROG
        options = dict(args.fuse_options, nonempty=True)  # as fuse-overlayfs (libfuse3) allows
        daemon.serve_fuse(MergedLowers(layers), mp, upper=args.upper, work=args.work,
                          on_ready=ready, fsname=fsname, subtype=PROG,
                          allow_other=args.allow_other, debug=args.debug, extra=options,
                          log=args.log, copy_up=args.copy_up)
    finally:
        for s in sources:
            if isinstance(s, DirLayers):
                s.close()
        if store is not None:
            store.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print(__doc__.split("\n\n", 2)[2].split("\nImports:")[0].rstrip())
        return 0
    if any(a in ("-V", "--version") for a in argv):
        print(f"{PROG} (layerstore {__version__})")
        return 0

    def warn(msg: str) -> None:
        print(f"{PROG}: warning: {msg}", file=sys.stderr)

    try:
        args = parse_args(argv, warn)
        check(args)
        assert args.mountpoint is not None
        mp = daemon.check_mountpoint(args.mountpoint, allow_nonempty=True)
        daemon.spawn(lambda ready: _serve(args, mp, ready), mp, foreground=args.foreground,
                     log=args.log)
        return 0
    except LayerstoreError as exc:
        if os.environ.get("LAYERSTORE_DEBUG"):
            raise
        hint = " (set -o root=STORE or LAYERSTORE_ROOT)" if isinstance(exc, StoreAccessError) else ""
        print(f"{PROG}: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
