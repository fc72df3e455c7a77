"""Container commands: create, ps, rm (mounting comes with the FUSE view)."""

from __future__ import annotations

import argparse
from typing import Any

from ..store.containers import (
    all_containers,
    create_container,
    remove_container,
    resolve_container,
)
from ..store.images import names_of, resolve
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

    p = sub.add_parser("rm", help="remove containers and their upper layers")
    p.add_argument("containers", nargs="+")
    p.add_argument("--force", "-f", action="store_true")
    p.set_defaults(func=cmd_rm)


def _store(args: argparse.Namespace) -> Any:
    from .main import open_store

    return open_store(args)


def cmd_create(args: argparse.Namespace) -> int:
    with _store(args) as store:
        with store.env.read() as txn:
            img = resolve(txn, store.env, args.image)
        with store.importing():  # gc removes container directories without a record
            rec = create_container(store.env, store.root, img.id, args.name)
    print(rec.id)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    with _store(args) as store, store.env.read() as txn:
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
    with _store(args) as store:
        for ref in args.containers:
            with store.env.read() as txn:
                rec = resolve_container(txn, store.env, ref)
            remove_container(store.env, store.root, rec)
            print(rec.name)
    return 0
