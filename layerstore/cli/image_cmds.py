"""Image commands: import, images, tag, rmi, inspect, export."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import InUseError
from ..store.images import all_images, image_key, names_of, normalize_name, resolve
from ..store.records import ContainerRecord, LayerRecord
from . import open_store
from .output import human_age, human_size, print_json, progress_bars, table


def register(sub: Any) -> None:
    p = sub.add_parser("import", help="import an OCI layout, docker-save tar, layer tar or directory",
                       description="Import images from PATH: an OCI image layout (directory or "
                                   "tar), a docker-save tar, a single layer tar (plain, gzip or "
                                   "zstd) or a directory (a root filesystem).")
    p.add_argument("path", type=Path)
    p.add_argument("--tag", "-t", help="name the image NAME[:TAG] (inputs with one image)")
    p.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from an index "
                                      "(default: this machine's)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("images", help="list images")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-trunc", action="store_true", help="show full image ids")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("source", help="image name or id")
    p.add_argument("target", help="new NAME[:TAG]")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("rmi", help="remove images (untag; the last name removes the image)")
    p.add_argument("images", nargs="+")
    p.add_argument("--force", "-f", action="store_true",
                   help="also remove the containers that use the image")
    p.set_defaults(func=cmd_rmi)

    p = sub.add_parser("inspect", help="show an image's config, layers and sizes (JSON)")
    p.add_argument("image")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write an image as an OCI image layout (dir, or .tar)")
    p.add_argument("image")
    p.add_argument("dest", type=Path, help="a new directory, or a file name ending in .tar")
    p.set_defaults(func=cmd_export)



def cmd_import(args: argparse.Namespace) -> int:
    from ..oci.importer import import_path

    with open_store(args) as store, progress_bars(args.quiet) as progress:
        results = import_path(store, args.path, tag=args.tag, platform=args.platform,
                              progress=progress)
    for r in results:
        print(r.image_id + ("  " + " ".join(r.names) if r.names else ""))
    return 0


def _layer_map(txn: Any, env: Any) -> dict[str, LayerRecord]:
    out = {}
    with txn.cursor(db=env.db("layers")) as cur:
        for _, v in cur:
            rec = LayerRecord.decode(v)
            out[rec.diff_id] = rec
    return out


def cmd_images(args: argparse.Namespace) -> int:
    with open_store(args) as store, store.env.read() as txn:
        images = sorted(all_images(txn, store.env), key=lambda i: -i.created)
        names = names_of(txn, store.env)
        layers = _layer_map(txn, store.env)
    rows: list[dict[str, Any]] = []
    for img in images:
        size = sum(layers[d].tar_size for d in img.diff_ids if d in layers)
        for n in names.get(img.id, []) or [None]:  # type: ignore[list-item]
            repo, tag = (n.rsplit(":", 1) if n else ("<none>", "<none>"))
            rows.append({"id": img.id, "repository": repo, "tag": tag, "name": n,
                         "created": img.created, "size": size, "layers": len(img.diff_ids)})
    if args.json:
        print_json(rows)
        return 0
    shown = [[r["repository"], r["tag"],
              r["id"].split(":")[1] if args.no_trunc else r["id"].split(":")[1][:12],
              human_age(r["created"]), human_size(r["size"])] for r in rows]
    print(table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], shown))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    target = normalize_name(args.target)
    with open_store(args) as store:
        def fn(txn: Any) -> None:
            img = resolve(txn, store.env, args.source)
            txn.put(target.encode(), img.id.encode(), db=store.env.db("names"))
        store.env.write(fn)
    return 0


def _containers_of(txn: Any, env: Any, image_id: str) -> list[ContainerRecord]:
    with txn.cursor(db=env.db("containers")) as cur:
        return [c for c in (ContainerRecord.decode(v) for _, v in cur) if c.image_id == image_id]


def cmd_rmi(args: argparse.Namespace) -> int:
    rc = 0
    with open_store(args) as store:
        env = store.env
        for ref in args.images:
            def fn(txn: Any) -> list[str]:
                img = resolve(txn, env, ref)
                names = names_of(txn, env).get(img.id, [])
                try:
                    by_name = normalize_name(ref)
                except Exception:
                    by_name = None
                out = []
                if by_name in names and len(names) > 1:
                    txn.delete(by_name.encode(), db=env.db("names"))
                    return [f"Untagged: {by_name}"]
                users = _containers_of(txn, env, img.id)
                if users and not args.force:
                    raise InUseError(
                        f"image {ref} is used by container(s) "
                        f"{', '.join(c.name for c in users)} (use --force to remove them too)")
                for c in users:
                    txn.delete(c.id.encode(), db=env.db("containers"))
                    removed.append(c)
                    out.append(f"Removed container: {c.name}")
                for n in names:
                    txn.delete(n.encode(), db=env.db("names"))
                    out.append(f"Untagged: {n}")
                txn.delete(image_key(img.id), db=env.db("images"))
                out.append(f"Deleted: {img.id}")
                return out

            removed: list[ContainerRecord] = []
            for line in env.write(fn):
                print(line)
            for c in removed:  # directories after the records (see remove_container)
                shutil.rmtree(store.root / "containers" / c.id, ignore_errors=True)
        print("(run 'layerstore gc' to free the space of unused layers)")
    return rc


def cmd_inspect(args: argparse.Namespace) -> int:
    with open_store(args) as store, store.env.read() as txn:
        img = resolve(txn, store.env, args.image)
        names = names_of(txn, store.env).get(img.id, [])
        layers = _layer_map(txn, store.env)
    config = json.loads(img.config)
    out = {
        "Id": img.id,
        "RepoTags": names,
        "Created": config.get("created"),
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Size": sum(layers[d].tar_size for d in img.diff_ids if d in layers),
        "Source": img.source,
        "ManifestMediaType": img.manifest_media_type,
        "Layers": [
            {"DiffID": d, "Size": layers[d].tar_size, "ContentSize": layers[d].content_size,
             "Entries": layers[d].entry_count,
             "Sources": [{"MediaType": s[0], "Digest": s[1], "Size": s[2]}
                         for s in layers[d].sources]}
            for d in img.diff_ids if d in layers
        ],
        "Config": config,
    }
    print_json([out])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..oci.exporter import export_image

    with open_store(args) as store, progress_bars(args.quiet) as progress:
        image_id = export_image(store, args.image, args.dest, progress=progress)
    print(image_id)
    return 0
