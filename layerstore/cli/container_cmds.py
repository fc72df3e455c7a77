"""Container commands: create, ps, rm, mount, umount, diff, commit."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ContainerNotFoundError, ImageNotFoundError, InUseError, UsageError
from ..store.containers import (
    all_containers,
    create_container,
    remove_container,
    resolve_container,
)
from ..store.images import get_image, names_of, resolve
from . import open_store
from .output import human_age, print_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("create", help="create a container (an image plus its own upper layer)")
    p.add_argument("image")
    p.add_argument("--name", help="container name (default: the short id)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("--json", action="store_true")
    p.add_argument("-a", "--all", action="store_true", help="accepted for docker habits")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("mount", help="mount a container (FUSE); returns once the mount is live")
    p.add_argument("container")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--read-only", action="store_true", help="mount the image alone, read-only")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the terminal until unmounted")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users see the mount (default: only the mounting user)")
    p.add_argument("--copy-up", choices=("meta", "full", "lazy"), default="meta",
                   help="meta (default): chmod/chown/utime/xattrs, rename and link of a lower "
                        "file copy no data until the first write (kernel metacopy format); "
                        "full: copy the data too, like overlayfs without metacopy=on; "
                        "lazy: as meta, and the first write to a file of 1 MiB or more copies "
                        "only the 256 KiB blocks it touches (an upper kernel overlayfs cannot "
                        "read until committed)")
    p.add_argument("--debug", action="store_true", help="log every failing call (daemon.log)")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", aliases=["unmount"], help="unmount and wait for the daemon")
    p.add_argument("target", help="mountpoint or container")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("rm", help="remove containers and their upper layers")
    p.add_argument("containers", nargs="+")
    p.add_argument("--force", "-f", action="store_true")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("diff", help="paths a container added (A), changed (C) or deleted (D)")
    p.add_argument("container")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("commit", help="make a new image of a container's image plus its upper")
    p.add_argument("container")
    p.add_argument("name", help="NAME:TAG of the new image")
    p.add_argument("--pause", "-p", dest="pause", action="store_true", default=True,
                   help="pause a mounted container while its upper is read (default)")
    p.add_argument("--no-pause", dest="pause", action="store_false",
                   help="read the upper while the container keeps running")
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser("materialize", help="copy into a container's upper the image data its "
                       "lazily or metadata-only copied-up files still read from the store "
                       "(so kernel overlayfs can mount the upper)")
    p.add_argument("container")
    p.set_defaults(func=cmd_materialize)



def cmd_create(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        with store.env.read() as txn:
            img = resolve(txn, store.env, args.image)
        with store.importing():  # gc removes container directories without a record
            rec = create_container(store.env, store.root, img.id, args.name)
    print(rec.id)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    with open_store(args) as store, store.env.read() as txn:
        recs = sorted(all_containers(txn, store.env), key=lambda c: -c.created)
        names = names_of(txn, store.env)
    rows = [{"id": c.id, "name": c.name, "image_id": c.image_id,
             "image": (names.get(c.image_id) or [c.image_id.split(":")[1][:12]])[0],
             "created": c.created, "upper": c.upper} for c in recs]
    if args.json:
        print_json(rows)
        return 0
    print(table(["CONTAINER ID", "IMAGE", "CREATED", "NAME"],
                [[r["id"][:12], r["image"], human_age(r["created"]), r["name"]] for r in rows]))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ..fuse import daemon  # only these commands need it (start-up time)

    with open_store(args) as store:
        for ref in args.containers:
            with store.env.read() as txn:
                rec = resolve_container(txn, store.env, ref)
            state = daemon.read_state(store.root, rec.id)
            if state is not None:
                if not args.force:
                    raise InUseError(f"container {rec.name} is mounted at {state['mountpoint']} "
                                     "(umount it, or rm --force)")
                daemon.umount(store.root, rec.id, None)
            remove_container(store.env, store.root, rec)
            print(rec.name)
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from ..fuse import daemon  # only these commands need it (start-up time)

    with open_store(args) as store:
        with store.env.read() as txn:
            rec = resolve_container(txn, store.env, args.container)
            img = get_image(txn, store.env, rec.image_id)
        if img is None:
            raise ImageNotFoundError(f"image {rec.image_id} of container {rec.name} is missing")
        root = store.root
    # The store is closed here: the daemon opens its own after the fork.
    daemon.mount(root, rec.id, img.diff_ids, args.mountpoint, read_only=args.read_only,
                 foreground=args.foreground, allow_other=args.allow_other, debug=args.debug,
                 copy_up=args.copy_up)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from ..fuse import daemon  # only these commands need it (start-up time)

    with open_store(args) as store:
        target = Path(args.target)
        mounts = daemon.mounted_containers(store.root)
        cid = next((c for c, st in mounts.items()
                    if os.path.exists(args.target)
                    and Path(st["mountpoint"]) == target.absolute()), None)
        if cid is None:
            with store.env.read() as txn:
                try:
                    cid = resolve_container(txn, store.env, args.target).id
                except ContainerNotFoundError:
                    if not os.path.exists(args.target):
                        raise
                    cid = None
        root = store.root
    if cid is None:
        raise UsageError(f"{args.target} is not a layerstore mount")
    daemon.umount(root, cid, None)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from ..oci.commit import changes

    with open_store(args) as store:
        rows = changes(store, args.container)
    if args.json:
        print_json([{"kind": k, "path": p} for k, p in rows])
        return 0
    for k, p in rows:
        print(f"{k} {p}")
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    from ..oci.commit import materialize

    with open_store(args) as store:
        n = materialize(store, args.container)
    print(f"{n} file{'s' if n != 1 else ''} filled")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from ..oci.commit import commit
    from .output import progress_bars

    pause = None
    if args.pause:
        from ..fuse import daemon

        def pause(cid: str) -> Any:
            return daemon.paused(store.root, cid)

    with open_store(args) as store, progress_bars(getattr(args, "quiet", False)) as progress:
        image_id = commit(store, args.container, args.name, progress=progress, pause=pause,
                          warn=lambda msg: print(f"layerstore: warning: {msg}", file=sys.stderr))
    print(image_id)
    return 0
