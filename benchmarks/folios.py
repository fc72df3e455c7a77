"""Which folio sizes hold a file in the page cache, and how fast a warm read of it is.

    python3 benchmarks/folios.py FILE [FILE ...]     (root: reads /proc/kpageflags)

Reads each file twice with 1 MiB ``readinto`` calls (the second read is warm), maps
its first 64 MiB, touches every page, and counts through ``/proc/self/pagemap`` and
``/proc/kpageflags`` how many of those pages are the head or a tail of a compound
(large) folio and how many are single 4 KiB pages. On kernel 6.18, ext4 holds a big
file in large folios and a FUSE mount (layerstore's or fuse-overlayfs's) in 4 KiB
pages only, which is why warm sequential reads through FUSE run at ~0.3x of kernel
overlayfs here (``benchmarks/README.md``, session 7).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 1 << 15, 1 << 16
PAGE = os.sysconf("SC_PAGE_SIZE")


def warm_read_mb_s(path: str) -> list[float]:
    buf = bytearray(1 << 20)
    out = []
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        with open(path, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
        out.append(n / (time.perf_counter() - t0) / 1e6)
    return out


def folio_counts(path: str, limit: int = 64 << 20) -> tuple[int, int, int]:
    """(compound heads, compound tails, single pages) among the file's first pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = min(os.fstat(fd).st_size, limit) // PAGE * PAGE
        if size == 0:
            return 0, 0, 0
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            for off in range(0, size, PAGE):
                m[off]  # fault every page in
            ino = os.fstat(fd).st_ino
            start = None
            with open("/proc/self/maps") as maps:
                for line in maps:
                    f = line.split()
                    if len(f) >= 6 and int(f[4]) == ino and f[5] == os.path.realpath(path):
                        start = int(f[0].split("-")[0], 16)
                        break
            if start is None:
                raise RuntimeError("mapping not found in /proc/self/maps")
            heads = tails = small = 0
            with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
                for i in range(size // PAGE):
                    pm.seek((start // PAGE + i) * 8)
                    entry = struct.unpack("<Q", pm.read(8))[0]
                    if not entry >> 63:  # not present
                        continue
                    kf.seek((entry & ((1 << 55) - 1)) * 8)
                    flags = struct.unpack("<Q", kf.read(8))[0]
                    if flags & KPF_COMPOUND_HEAD:
                        heads += 1
                    elif flags & KPF_COMPOUND_TAIL:
                        tails += 1
                    else:
                        small += 1
            return heads, tails, small
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for path in argv:
        first, warm = warm_read_mb_s(path)
        heads, tails, small = folio_counts(path)
        print(f"{path}: read {first:,.0f} MB/s, again {warm:,.0f} MB/s; first 64 MiB: "
              f"{heads} large-folio heads, {tails} tails, {small} 4 KiB pages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
