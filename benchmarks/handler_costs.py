"""What each FUSE request of a create costs in the daemon's Python, without a mount.

``open(O_CREAT) + write + close`` of a new file in a FUSE mount is five requests on
kernel 6.18: the GETATTR of its directory (a create invalidates the directory's mode,
which ``default_permissions`` checks again), the LOOKUP of the new name, the CREATE, the
GETXATTR ``security.capability`` before the first write, and the RELEASE. This feeds
those five, for ``--files`` new names in one directory, straight to the session's
dispatcher (``wire._Session._dispatch``, the code each request runs once the transport
has it), with an overlay over the embedded demo image in a scratch store, and prints
the median time of each. No kernel, no transport, no client: what is left is the
handlers' own cost. In a mount each request also pays its round trip (~10 us on this VM,
``benchmarks/README.md``, "Session 17") and runs with colder caches (~1.2-1.5x these).

    python3 benchmarks/handler_costs.py [--files 3000] [--dir /dev/shm] [--profile tottime]

``--profile`` runs the files under cProfile and prints its top functions by that key.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from layerstore.fuse import wire
from layerstore.fuse.lowlevel import LowLevelOperations
from layerstore.oci.sample import write_demo_layout
from layerstore.overlay.fs import META, OverlayFS
from layerstore.overlay.lower import MergedLowers, StoreLayers
from layerstore.store import Store
from layerstore.store.images import resolve

OPS = ("GETATTR", "LOOKUP", "CREATE", "GETXATTR", "RELEASE")
LOOKUP, GETATTR, MKDIR, RELEASE, GETXATTR, CREATE = 1, 3, 9, 18, 22, 35
WARM_UP = 200


class Feeder:
    """A ``wire._Session`` with no connection: requests go in as bytes, replies are kept."""

    def __init__(self, ops: LowLevelOperations):
        s = object.__new__(wire._Session)
        s.ops, s.read_into, s.fd, s.flags, s.stopped = ops, None, -1, 0, False
        s.lister, s.passthrough = wire._Lister(ops), wire._Passthrough(-1)
        s.lock, s.current, s.queues = threading.Lock(), threading.local(), []
        s._send_pieces = self._reply  # type: ignore[method-assign]
        self.session = s
        self.unique = 0
        self.last: tuple[int, bytes] = (0, b"")

    def _reply(self, unique: int, pieces: list[Any], error: int = 0) -> None:
        self.last = (error, b"".join(bytes(p) for p in pieces))

    def __call__(self, opcode: int, nodeid: int, body: bytes) -> tuple[int, bytes]:
        self.unique += 1
        head = wire.IN_HEADER.pack(wire.IN_HEADER.size + len(body), opcode, self.unique,
                                   nodeid, 0, 0, os.getpid(), 0, 0)
        self.session._dispatch(memoryview(head + body))
        return self.last


def _expect(got: tuple[int, bytes], what: str) -> bytes:
    if got[0] != 0:
        raise SystemExit(f"{what}: errno {-got[0]}")
    return got[1]


def run(feed: Feeder, parent: int, names: list[bytes],
        times: dict[str, list[int]] | None) -> None:
    """The five requests of a create of each name in directory node ``parent``."""
    clock = time.perf_counter_ns
    getattr_in = struct.pack("<IIQ", 0, 0, 0)
    create_in = wire.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0o022, 0)
    cap = wire.XATTR_IN.pack(0, 0) + b"security.capability\0"
    for name in names:
        t0 = clock()
        _expect(feed(GETATTR, parent, getattr_in), "GETATTR")
        t1 = clock()
        err, out = feed(LOOKUP, parent, name + b"\0")
        if err != -2 and (err != 0 or struct.unpack_from("<Q", out)[0] != 0):
            raise SystemExit(f"LOOKUP of a new name: errno {-err}, or found")
        t2 = clock()
        out = _expect(feed(CREATE, parent, create_in + name + b"\0"), "CREATE")
        t3 = clock()
        node = struct.unpack_from("<Q", out)[0]
        fh = struct.unpack_from("<Q", out, wire.ENTRY_OUT.size)[0]
        if feed(GETXATTR, node, cap)[0] != -61:  # ENODATA: a new file has no capability
            raise SystemExit("GETXATTR security.capability of a new file: not ENODATA")
        t4 = clock()
        feed(RELEASE, node, wire.RELEASE_IN.pack(fh, 0, 0, 0))
        t5 = clock()
        if times is not None:
            for op, t in zip(OPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[op].append(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3000, help="creates to time (default 3000)")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the scratch store and upper go (default /dev/shm: the "
                         "upper's file system is not what is measured)")
    ap.add_argument("--profile", metavar="KEY", help="cProfile the run, sorted by KEY "
                    "(tottime, cumtime, ...)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="layerstore-requests-", dir=args.dir))
    try:
        root = tmp / "store"
        write_demo_layout(tmp / "demo-oci")
        subprocess.run([sys.executable, "-m", "layerstore", "--root", str(root), "-q",
                        "import", str(tmp / "demo-oci")], check=True, stdout=subprocess.DEVNULL)
        store = Store.open(root)
        with store.env.read() as txn:
            img = resolve(txn, store.env, "demo:app")
        for d in ("upper", "work"):
            (tmp / d).mkdir()
        fs = OverlayFS(MergedLowers(StoreLayers(store, img.diff_ids)), tmp / "upper",
                       tmp / "work", META)
        try:
            feed = Feeder(LowLevelOperations(fs))
            out = _expect(feed(MKDIR, 1, struct.pack("<II", 0o755, 0o022) + b"new\0"), "MKDIR")
            parent = struct.unpack_from("<Q", out)[0]
            run(feed, parent, [b"w%05d" % i for i in range(WARM_UP)], None)
            names = [b"f%05d" % i for i in range(args.files)]
            times: dict[str, list[int]] = {op: [] for op in OPS}
            prof = cProfile.Profile() if args.profile else None
            t0 = time.perf_counter_ns()
            if prof is not None:
                prof.enable()
            run(feed, parent, names, times)
            if prof is not None:
                prof.disable()
            total = (time.perf_counter_ns() - t0) / 1e3 / args.files
            for op in OPS:
                print(f"{op:9} median {statistics.median(times[op]) / 1e3:6.1f} us")
            print(f"{'all five':9} median sum {sum(statistics.median(v) for v in times.values()) / 1e3:.1f} us,"
                  f" mean per file {total:.1f} us ({args.files} files"
                  f"{', under cProfile' if prof else ''})")
            if prof is not None:
                pstats.Stats(prof).sort_stats(args.profile).print_stats(30)
        finally:
            fs.close()
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
