"""Containers: an image plus its own upper and work directories under the store root.

``containers`` maps the container id (64 hex characters, as bytes) to its record; names
are unique. The directories live at ``ROOT/containers/<id>/{upper,work}`` (same
filesystem, as overlayfs requires of upper and work).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path

import lmdb

from ..errors import AmbiguousNameError, ContainerNotFoundError, DuplicateNameError, UsageError
from .records import ContainerRecord
from .txn import Env

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


def all_containers(txn: lmdb.Transaction, env: Env) -> list[ContainerRecord]:
    with txn.cursor(db=env.db("containers")) as cur:
        return [ContainerRecord.decode(v) for _, v in cur]


def resolve_container(txn: lmdb.Transaction, env: Env, ref: str) -> ContainerRecord:
    """A container by name, full id or unique id prefix."""
    found = [c for c in all_containers(txn, env) if c.name == ref]
    if not found and re.fullmatch(r"[0-9a-f]{3,64}", ref):
        found = [c for c in all_containers(txn, env) if c.id.startswith(ref)]
        if len(found) > 1:
            raise AmbiguousNameError(f"container id prefix {ref!r} is ambiguous")
    if not found:
        raise ContainerNotFoundError(f"no such container: {ref}")
    return found[0]


def create_container(env: Env, root: Path, image_id: str, name: str | None) -> ContainerRecord:
    """Make the directories, then the record (so a record never lacks its directories)."""
    cid = secrets.token_hex(32)
    if name is not None and not _NAME_RE.match(name):
        raise UsageError(f"invalid container name {name!r} (letters, digits, _ . -)")
    name = name or f"{cid[:12]}"
    base = root / "containers" / cid
    for sub in ("upper", "work"):
        (base / sub).mkdir(parents=True, mode=0o755)
    os.chmod(base, 0o700)
    rec = ContainerRecord(id=cid, name=name, image_id=image_id, created=time.time(),
                          upper=str(base / "upper"), work=str(base / "work"))

    def put(txn: lmdb.Transaction) -> None:
        if any(c.name == name for c in all_containers(txn, env)):
            raise DuplicateNameError(f"container name {name!r} is already in use")
        txn.put(cid.encode(), rec.encode(), db=env.db("containers"))

    try:
        env.write(put)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return rec


def remove_container(env: Env, root: Path, rec: ContainerRecord) -> None:
    """Delete the record, then the directories (a crash in between leaves only a
    directory that no record names; gc removes those)."""
    env.write(lambda txn: txn.delete(rec.id.encode(), db=env.db("containers")))
    shutil.rmtree(root / "containers" / rec.id, ignore_errors=True)
