"""Layers: the changeset rules of one layer, and reading its entries back.

``LayerBuilder`` collects the entries of one layer as an importer reports them and
applies the OCI changeset rules in memory (image-spec layer.md):

- a later entry for the same path replaces an earlier one (dir over dir keeps children
  and takes the new attributes);
- ``whiteout(p)`` deletes ``p`` from the layers below; an entry of the same layer at ``p``
  is never hidden by it, whatever the order; a whiteout below a non-directory entry of
  the same layer (umoci: a directory replaced by a file) changes nothing and is dropped;
- ``opaque(d)`` hides every lower child of ``d`` (the marker's position does not matter);
- a directory recreated in the layer that also whites it out is opaque;
- parents not in the tar are made as *implicit* directories (the lower layer's
  attributes win in the merged view);
- an entry below a symlink of the same layer is placed where the symlink leads
  (what docker's extraction does); a chain that leaves the root is rejected;
- a hard link names an earlier entry of the same layer; the two become one inode.

``put_layer`` then writes the layer (entries, record, layer-number counter) inside the
transaction that makes its image visible, so a layer is there whole or not at all.
"""

from __future__ import annotations

import copy
import struct
import time
from collections.abc import Iterator

import lmdb

from ..errors import InvalidLayerError, StoreError
from .records import (
    DIR,
    IMPLICIT,
    NAME_MAX,
    OPAQUE,
    SYMLINK,
    WHITEOUT,
    Entry,
    LayerRecord,
    children_prefix,
    entry_key,
    join_vpath,
    layer_prefix,
    split_vpath,
)
from .txn import Env

MAX_SYMLINK_HOPS = 40
NEXT_LAYER_NO = b"next_layer_no"


def normalize_member_name(name: bytes) -> bytes:
    """A tar member name as a vpath: ``./a//b/`` -> ``/a/b``; rejects ``..`` and ``/x``."""
    short = name[2:] if name.startswith(b"./") else name
    if b".." not in short and b"//" not in short and b"\0" not in short \
            and not short.startswith((b"/", b"./")) and b"/./" not in short \
            and not short.endswith(b"/.") and short != b"." and len(short) <= NAME_MAX:
        return b"/" + short.rstrip(b"/")  # the common case: already normal
    if name.startswith(b"/"):
        raise InvalidLayerError(f"entry {_show(name)} has an absolute path")
    parts = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            raise InvalidLayerError(f"entry {_show(name)} contains '..'")
        if len(part) > NAME_MAX:
            raise InvalidLayerError(f"entry {_show(name)} has a name longer than {NAME_MAX} bytes")
        if b"\0" in part:
            raise InvalidLayerError(f"entry {_show(name)} contains a NUL byte")
        parts.append(part)
    return b"/" + b"/".join(parts)


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


class LayerBuilder:
    """The entries of one layer being imported, keyed by vpath."""

    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {}
        self._next_group = 1
        self._has_symlinks = False  #: resolve() has nothing to follow until one is added
        #: resolve()'s answers for parent paths; they depend only on this layer's
        #: symlinks, so the cache is emptied whenever one may have come or gone
        self._resolved: dict[bytes, bytes] = {}

    # -- paths -----------------------------------------------------------------------

    def resolve(self, vpath: bytes) -> bytes:
        """Follow this layer's symlinks in the *parents* of ``vpath``.

        Component by component, as the kernel would inside the layer's root: a ``..`` in
        a symlink target pops what the path has *resolved* to so far (never lexically
        across an unresolved symlink), and going above the root is an error.
        """
        if vpath == b"/" or not self._has_symlinks:
            return vpath
        parent, _, name = vpath.rpartition(b"/")
        cached = self._resolved.get(parent)
        if cached is not None:
            return cached + b"/" + name
        parts = vpath[1:].split(b"/")
        pending = parts[-2::-1]  #: parent components still to walk (a stack)
        cur = b""  #: the resolved parent path so far ("" is the root)
        hops = 0
        while pending:
            part = pending.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not cur:
                    raise InvalidLayerError(
                        f"entry {_show(vpath)} would be written outside the root through a symlink")
                cur = cur[:cur.rindex(b"/")]
                continue
            cand = cur + b"/" + part
            e = self.entries.get(cand)
            if e is not None and e.type == SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise InvalidLayerError(f"entry {_show(vpath)}: too many symlink levels")
                if e.target.startswith(b"/"):
                    cur = b""
                pending.extend(e.target.split(b"/")[::-1])
                continue
            cur = cand
        self._resolved[parent] = cur
        return cur + b"/" + parts[-1]

    def _ensure_parents(self, vpath: bytes) -> None:
        parent, _ = split_vpath(vpath)
        missing = []
        while parent:
            e = self.entries.get(parent)
            if e is not None and e.type == DIR:
                break
            if e is not None and e.type != WHITEOUT:
                raise InvalidLayerError(f"entry {_show(vpath)}: {_show(parent)} is not a directory")
            missing.append((parent, e is not None))
            parent, _ = split_vpath(parent)
            if parent == b"":
                break
        for p, was_whiteout in reversed(missing):
            flags = IMPLICIT | (OPAQUE if was_whiteout else 0)
            self.entries[p] = Entry(DIR, mode=0o755, flags=flags)

    # -- changes ---------------------------------------------------------------------

    def add(self, vpath: bytes, entry: Entry) -> bytes:
        """Add a real entry (not a whiteout); returns the vpath it was stored at."""
        vpath = self.resolve(vpath)
        if vpath != b"/":
            self._ensure_parents(vpath)
        old = self.entries.get(vpath)
        if entry.type == SYMLINK or (old is not None and old.type in (SYMLINK, DIR)):
            self._resolved.clear()  # a symlink may come, go, or be dropped with children
        if old is not None:
            if entry.type == DIR and old.type == DIR:
                entry.flags |= old.flags & OPAQUE
            elif entry.type == DIR and old.type == WHITEOUT:
                entry.flags |= OPAQUE
            elif old.type == DIR:
                self._drop_children(vpath)
        self.entries[vpath] = entry
        if entry.type == SYMLINK:
            self._has_symlinks = True
        return vpath

    def whiteout(self, vpath: bytes) -> None:
        vpath = self.resolve(vpath)
        if self._below_non_dir(vpath):
            # umoci writes ``opt/dir`` (now a file) and then ``opt/dir/.wh.y`` for the old
            # children: the entry already hides everything below it, the whiteout is moot.
            return
        self._ensure_parents(vpath)
        e = self.entries.get(vpath)
        if e is None:
            self.entries[vpath] = Entry(WHITEOUT, mode=0)
        elif e.type == DIR:
            # This layer's directory came first: it stays, but the lower one (with all
            # its children) is deleted, as when the whiteout comes first (see ``add``).
            e.flags |= OPAQUE

    def _below_non_dir(self, vpath: bytes) -> bool:
        """Is a parent of ``vpath`` a non-directory entry of this layer?"""
        parent, _ = split_vpath(vpath)
        while parent:
            e = self.entries.get(parent)
            if e is not None and e.type == DIR:
                return False
            if e is not None and e.type != WHITEOUT:
                return True
            parent, _ = split_vpath(parent)
        return False

    def opaque(self, dir_vpath: bytes) -> None:
        dir_vpath = self.resolve(dir_vpath + b"/x")[:-2] or b"/"
        e = self.entries.get(dir_vpath)
        if e is None or e.type == WHITEOUT:
            if dir_vpath != b"/":
                self._ensure_parents(dir_vpath)
            e = Entry(DIR, mode=0o755, flags=IMPLICIT)
            self.entries[dir_vpath] = e
        elif e.type != DIR:
            raise InvalidLayerError(f"opaque marker inside {_show(dir_vpath)}, which is not a directory")
        e.flags |= OPAQUE

    def hardlink(self, vpath: bytes, target: bytes) -> bytes:
        tgt = self.entries.get(self.resolve(target))
        if tgt is None or tgt.type == WHITEOUT:
            raise InvalidLayerError(f"hard link {_show(vpath)} points to missing {_show(target)}")
        if tgt.type == DIR:
            raise InvalidLayerError(f"hard link {_show(vpath)} points to a directory")
        if tgt.link_group == 0:
            tgt.link_group = self._next_group
            self._next_group += 1
        entry = copy.copy(tgt)
        entry.xattrs = dict(tgt.xattrs)
        return self.add(vpath, entry)

    def _drop_children(self, dir_vpath: bytes) -> None:
        prefix = dir_vpath.rstrip(b"/") + b"/"
        for p in [p for p in self.entries if p.startswith(prefix)]:
            del self.entries[p]

    # -- results ---------------------------------------------------------------------

    def content_size(self) -> int:
        seen: set[int] = set()
        total = 0
        for e in self.entries.values():
            if e.type == 0 and e.size:
                if e.link_group:
                    if e.link_group in seen:
                        continue
                    seen.add(e.link_group)
                total += e.size
        return total

    def link_groups(self) -> dict[int, list[bytes]]:
        """Hard-link group -> its paths, sorted (``LayerRecord.links``)."""
        groups: dict[int, list[bytes]] = {}
        for vpath, e in sorted(self.entries.items()):
            if e.link_group and e.type != WHITEOUT:
                groups.setdefault(e.link_group, []).append(vpath)
        return groups

    def content_digests(self) -> set[bytes]:
        return {e.digest for e in self.entries.values() if e.digest}


def encode_entries(builder: LayerBuilder) -> list[tuple[bytes, bytes]]:
    """A builder's entries as sorted (vpath, encoded entry) pairs, ready for ``put_layer``
    (compact: an import holds these for every new layer of an image until it commits)."""
    return sorted((vpath, e.encode()) for vpath, e in builder.entries.items())


def put_layer(txn: lmdb.Transaction, env: Env, items: list[tuple[bytes, bytes]],
              record: LayerRecord) -> LayerRecord:
    """Write a layer's entries, its record and the layer counter. Requires a write txn.

    If a layer with the same diff_id is already there (a concurrent import, or the same
    layer twice in one image), keep it and return its record.
    """
    key = bytes.fromhex(record.diff_id.split(":", 1)[1])
    entries_db, layers_db, meta_db = env.db("entries"), env.db("layers"), env.db("meta")
    existing = txn.get(key, db=layers_db)
    if existing is not None:
        return LayerRecord.decode(existing)
    raw = txn.get(NEXT_LAYER_NO, db=meta_db)
    layer_no = struct.unpack(">Q", raw)[0] if raw else 1
    txn.put(NEXT_LAYER_NO, struct.pack(">Q", layer_no + 1), db=meta_db)
    # The layer number is new and the largest so far, and the keys start with it: so
    # they sort after every stored key and go in with MDB_APPEND (no B-tree search
    # per entry; full pages).
    keyed = sorted((entry_key(layer_no, vpath), value) for vpath, value in items)
    _, added = txn.cursor(db=entries_db).putmulti(keyed, append=True)
    if added != len(keyed):
        raise StoreError(f"layer number {layer_no} is in use already (store damaged?)")
    rec = copy.copy(record)
    rec.layer_no = layer_no
    rec.created = time.time()
    txn.put(key, rec.encode(), db=layers_db)
    return rec


# --- reading ---------------------------------------------------------------------------


def lookup(txn: lmdb.Transaction, env: Env, layer_no: int, vpath: bytes) -> Entry | None:
    value = txn.get(entry_key(layer_no, vpath), db=env.db("entries"))
    return Entry.decode(value) if value is not None else None


def list_dir(txn: lmdb.Transaction, env: Env, layer_no: int, dir_vpath: bytes) -> list[tuple[bytes, Entry]]:
    """The children of one directory in one layer, sorted by name (one range scan)."""
    prefix = children_prefix(layer_no, dir_vpath)
    out = []
    with txn.cursor(db=env.db("entries")) as cur:
        if cur.set_range(prefix):
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                name = k[len(prefix):]
                if name:
                    out.append((name, Entry.decode(v)))
    return out


def walk(txn: lmdb.Transaction, env: Env, layer_no: int) -> list[tuple[bytes, Entry]]:
    """Every entry of a layer as (vpath, entry), parents before children, names sorted."""
    root = lookup(txn, env, layer_no, b"/")
    out: list[tuple[bytes, Entry]] = []
    if root is not None:
        out.append((b"/", root))
    stack = [b"/"]
    while stack:
        d = stack.pop()
        kids = list_dir(txn, env, layer_no, d)
        for name, e in kids:
            p = join_vpath(d, name)
            out.append((p, e))
        for name, e in reversed(kids):
            if e.type == DIR:
                stack.append(join_vpath(d, name))
    return out


def iter_layer_values(txn: lmdb.Transaction, env: Env, layer_no: int) -> Iterator[bytes]:
    """Raw entry values of a layer in key order (for gc/check marking)."""
    prefix = layer_prefix(layer_no)
    with txn.cursor(db=env.db("entries")) as cur:
        if cur.set_range(prefix):
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                yield v
