"""Store commands: df, gc, check, prefetch."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import ContainerNotFoundError, ImageNotFoundError, NotFoundError, UsageError
from ..store.check import check
from ..store.containers import resolve_container
from ..store.filecache import ENV as FILE_CACHE_ENV
from ..store.filecache import FILL_FROM, FileCache, budget_from_env
from ..store.gc import collect
from ..store.images import resolve
from ..store.usage import usage
from . import open_store
from .output import counter, human_size, print_json, table

#: damage lines printed by ``check`` (all of them with --json)
MAX_SHOWN = 20


def register(sub: Any) -> None:
    p = sub.add_parser("df", help="disk usage: logical vs stored bytes, dedup ratio")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_df)

    p = sub.add_parser("gc", help="delete layers, files and chunks that nothing uses")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for running imports (default 30)")
    p.add_argument("--drop-file-cache", action="store_true",
                   help="also empty the file cache (whole copies of big lower files that "
                        "mounts pass through to the kernel; remade on use)")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("check", help="re-hash every chunk and file, verify every reference")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("prefetch", help="copy an image's big files into the file cache now, "
                       "so that mounts read them at the kernel's speed from the first read")
    p.add_argument("target", metavar="IMAGE|CONTAINER",
                   help="an image (name, tag or id), or a container (its image)")
    p.set_defaults(func=cmd_prefetch)



def cmd_df(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        u = usage(store.env)
        fc = FileCache(store.root)
        cached, cached_bytes = fc.usage()
    if args.json:
        print_json({**u.to_json(), "file_cache": {"files": cached, "bytes": cached_bytes,
                                                  "budget": fc.budget}})
        return 0
    print(table(["IMAGES", "LAYERS", "LOGICAL", "CONTENT", "STORED", "CHUNKS", "DEDUP"],
                [[str(u.images), str(u.layers), human_size(u.logical_bytes),
                  human_size(u.content_bytes), human_size(u.stored_bytes), str(u.chunk_count),
                  f"{u.dedup_ratio:.2f}x"]]))
    if u.per_image:
        print()
        print(table(["IMAGE ID", "NAMES", "SIZE", "UNIQUE"],
                    [[i.id.split(":")[1][:12], ",".join(i.names) or "<none>",
                      human_size(i.logical_bytes), human_size(i.unique_bytes)]
                     for i in u.per_image]))
    print()
    print(f"file cache: {cached} files, {human_size(cached_bytes)} "
          f"(budget {human_size(fc.budget)}: LAYERSTORE_FILE_CACHE, as a mount is made)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    with open_store(args) as store, store.collecting(args.wait):
        with counter("marking layers", "layer", args.quiet) as tick:
            r = collect(store.env, store.root, tick, drop_file_cache=args.drop_file_cache)
    print(f"removed {r.layers} layers, {r.files} files, {r.chunks} chunks "
          f"({human_size(r.bytes)})"
          + (f"; {r.cache_files} file cache copies ({human_size(r.cache_bytes)})"
             if r.cache_files else ""))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        with counter("checking chunks", "B", args.quiet) as tick:
            r = check(store.env, tick, store.root)
    if args.json:
        print_json({"clean": r.clean, "damage": r.damage, "chunks": r.chunks, "files": r.files,
                    "layers": r.layers, "images": r.images, "garbage_chunks": r.garbage_chunks,
                    "garbage_files": r.garbage_files, "garbage_layers": r.garbage_layers})
    else:
        for d in r.damage[:MAX_SHOWN]:
            print(f"DAMAGED: {d}")
        if len(r.damage) > MAX_SHOWN:
            print(f"... and {len(r.damage) - MAX_SHOWN} more (--json lists all)")
        garbage = r.garbage_chunks + r.garbage_files + r.garbage_layers
        print(f"checked {r.chunks} chunks, {r.files} files, {r.layers} layers, {r.images} images: "
              + ("clean" if r.clean else f"{len(r.damage)} problem(s)")
              + (f"; {garbage} unreferenced object(s), 'layerstore gc' removes them"
                 if garbage else ""))
    return 0 if r.clean else 90


def cmd_prefetch(args: argparse.Namespace) -> int:
    from ..overlay.lower import MergedLowers, StoreLayers  # (the mount's code: not at start)

    try:
        budget = budget_from_env(strict=True)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if budget <= 0:
        raise UsageError(f"the file cache is off ({FILE_CACHE_ENV}="
                         f"{os.environ.get(FILE_CACHE_ENV)}): nothing to fill")
    with open_store(args) as store, store.importing():
        with store.env.read() as txn:
            try:
                img = resolve(txn, store.env, args.target)
            except ImageNotFoundError:
                try:
                    c = resolve_container(txn, store.env, args.target)
                except ContainerNotFoundError:
                    raise NotFoundError(f"no such image or container: {args.target}") from None
                img = resolve(txn, store.env, c.image_id)
        lowers = MergedLowers(StoreLayers(store, img.diff_ids))
        try:
            with counter("prefetching", "B", args.quiet) as tick:
                r = lowers.prefetch(tick)
        finally:
            lowers.close()
    print(f"copied {r.copied} files of {FILL_FROM >> 20} MiB or more "
          f"({human_size(r.copied_bytes)}) into the file cache; {r.had} "
          f"({human_size(r.had_bytes)}) were there already"
          + (f"; {r.skipped} ({human_size(r.skipped_bytes)}) did not fit its budget of "
             f"{human_size(budget)} (LAYERSTORE_FILE_CACHE)" if r.skipped else ""))
    return 0
