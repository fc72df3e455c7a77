"""Root filesystem trees for the benchmarks: generated, churned, or real (debootstrap).

``generate(dest, size_mib, seed)``
    A deterministic tree shaped like a Debian root filesystem: packages that each bring
    ELF-like binaries and shared libraries (10 KiB .. 5 MiB, with compressible code and
    strings and incompressible sections), Python modules, man pages and changelogs (gzip-like,
    incompressible), config files under etc/, dpkg file lists, locale catalogs, a few big
    files (a locale archive, a database with zero pages, an opaque blob), symlinks
    (merged /usr, library sonames, alternatives), a few hard links, a setuid binary, empty
    files and directories. About 1 file per 40 KiB, like a real minbase image.

``churn(src, dst, version, seed)``
    Version N+1 from version N (``cp -a`` then edits): ~7% of the files under 1 MiB edited
    (in-place overwrites, small insertions that shift the rest of the file, appended lines,
    compressed files re-written from the edit on), 20% of the files of 1 MiB or more with
    1-3 small in-place edits, ~1% deleted, ~1.5% added.

``debootstrap_rootfs(cache)``
    A real ``debootstrap --variant=minbase bookworm`` tree, built once into ``cache`` from the
    mirror this machine's apt uses; None (with a message) when that fails.

CLI: ``python3 benchmarks/rootfs.py DEST --size-mib 200 --seed 1 [--versions 5]``
(``--versions N`` also writes DEST.v1 .. DEST.v(N-1), each churned from the one before;
``--debootstrap`` starts from the real tree instead of the generator).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import stat
import subprocess
import sys
from pathlib import Path

import blake3

MiB = 1 << 20
EPOCH = 1_700_000_000  # mtimes of generated trees (deterministic tars)
LANGS = ["de", "fr", "es", "it", "ja", "pt_BR", "ru", "zh_CN", "pl", "sv", "nl", "cs"]
ARCH_LIB = "usr/lib/x86_64-linux-gnu"


class Content:
    """Deterministic content of several kinds, all derived from one ``random.Random``."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        syll = ["ka", "to", "ri", "en", "al", "os", "ut", "ne", "mi", "st", "ar", "el", "in",
                "co", "de", "re", "pa", "lu", "th", "ch", "io", "x", "fo", "ba", "qu", "zy"]
        words = {"".join(rng.choices(syll, k=rng.choice((1, 2, 2, 3, 3, 4))))
                 for _ in range(4000)}
        self.words = sorted(words) + ["the", "of", "=", "(", ")", "{", "}", "if", "return",
                                      "def", "self", "#", "0", "1", "--", "\n", "\n", "\n",
                                      "\n    ", "\n\t"]
        # Zipf-like weights: a few words are very common, like in text and source code
        self.cum = []
        total = 0.0
        for i in range(len(self.words)):
            total += 1.0 / (i + 10)
            self.cum.append(total)
        # machine code: a skewed byte distribution (lots of 00, ff, REX prefixes, movs)
        # (zstd -1 keeps ~55% of it, like the .text of real binaries)
        common = [0x00] * 90 + [0xFF] * 16 + [0x48] * 14 + [0x89] * 12 + [0x8B] * 12 + \
            [0xE8] * 8 + [0x0F] * 8 + [0x24] * 6 + [0x44] * 6 + [0xC3] * 4 + [0x85] * 4 + \
            [0x74] * 4 + [0x83] * 6
        small = [rng.randrange(1, 0x40) for _ in range(33)]
        rest = [rng.randrange(256) for _ in range(256 - len(common) - len(small))]
        self.code_table = bytes(common + small + rest)

    def random(self, n: int) -> bytes:
        """Incompressible bytes (blake3 XOF keyed from the rng: fast and deterministic)."""
        if n <= 0:
            return b""
        return blake3.blake3(self.rng.getrandbits(128).to_bytes(16, "little")).digest(length=n)

    def text(self, n: int) -> bytes:
        if n <= 0:
            return b""
        k = n // 5 + 16
        out = " ".join(self.rng.choices(self.words, cum_weights=self.cum, k=k)).encode()
        while len(out) < n:
            out += self.text(n - len(out))
        return out[:n]

    def code(self, n: int) -> bytes:
        return self.random(n).translate(self.code_table)

    def identifiers(self, n: int) -> bytes:
        return self.text(n).replace(b" ", b"\0").replace(b"\n", b"_")

    def elf(self, n: int) -> bytes:
        """An ELF-like binary: header, code, strings, symbols, data, an opaque blob."""
        r = self.rng
        header = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x03\x00\x3e\x00" + self.random(44)
        shares = {"code": r.uniform(0.4, 0.65), "rodata": r.uniform(0.08, 0.2),
                  "symbols": r.uniform(0.04, 0.12), "data": r.uniform(0.03, 0.1),
                  "opaque": r.choice((0.0, 0.0, r.uniform(0.02, 0.25)))}
        total = sum(shares.values())
        parts = [header]
        for kind, share in shares.items():
            size = int((n - len(header)) * share / total)
            if kind == "code":
                parts.append(self.code(size))
            elif kind == "rodata":
                parts.append(self.text(size).replace(b"\n", b"\0"))
            elif kind == "symbols":
                parts.append(self.identifiers(size))
            elif kind == "data":
                zeros = int(size * r.uniform(0.3, 0.9))
                parts.append(bytes(zeros) + self.random(size - zeros))
            else:
                parts.append(self.random(size))
        out = b"".join(parts)
        return out + bytes(max(0, n - len(out)))

    def gz(self, n: int) -> bytes:
        """Looks like a gzip member (man pages, changelogs): incompressible."""
        return b"\x1f\x8b\x08\x00" + self.random(max(0, n - 4))

    def mixed(self, n: int) -> bytes:
        """4 KiB pages of zeros, text and random bytes (databases, archives, catalogs)."""
        pages = []
        for _ in range(0, n, 4096):
            kind = self.rng.random()
            pages.append(bytes(4096) if kind < 0.25 else
                         self.text(4096) if kind < 0.7 else self.random(4096))
        return b"".join(pages)[:n]


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


class _Tree:
    def __init__(self, root: Path, content: Content):
        self.root = root
        self.c = content
        self.bytes = 0
        self.files: list[str] = []

    def write(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() or p.is_symlink():
            return  # name collision between packages: keep the first
        p.write_bytes(data)
        os.chmod(p, mode)
        os.utime(p, (EPOCH, EPOCH - self.c.rng.randrange(10**8)))
        self.bytes += len(data)
        self.files.append(rel)

    def symlink(self, rel: str, target: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not (p.exists() or p.is_symlink()):
            p.symlink_to(target)

    def mkdir(self, rel: str, mode: int = 0o755) -> None:
        p = self.root / rel
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)


def _package(t: _Tree, name: str) -> None:
    r, c = t.c.rng, t.c
    kind = r.choices(["lib", "tool", "python", "data", "doc"], [35, 30, 15, 10, 10])[0]
    owned: list[str] = []

    def add(rel: str, data: bytes, mode: int = 0o644) -> None:
        t.write(rel, data, mode)
        owned.append("/" + rel)

    if kind == "lib":
        for i in range(r.choice((1, 1, 2, 3))):
            so = f"lib{name}{i or ''}.so"
            major = f"{so}.{r.randrange(1, 7)}"
            full = f"{major}.{r.randrange(20)}.{r.randrange(10)}"
            add(f"{ARCH_LIB}/{full}", c.elf(_lognormal(r, 90 << 10, 1.4, 10 << 10, 5 << 20)))
            t.symlink(f"{ARCH_LIB}/{major}", full)
            if r.random() < 0.3:
                t.symlink(f"{ARCH_LIB}/{so}", major)
        for lang in r.sample(LANGS, r.choice((0, 0, 3, 8))):
            add(f"usr/share/locale/{lang}/LC_MESSAGES/{name}.mo",
                c.mixed(_lognormal(r, 20 << 10, 0.8, 1 << 10, 400 << 10)))
    elif kind == "tool":
        bindir = r.choice(("usr/bin", "usr/bin", "usr/bin", "usr/sbin"))
        for i in range(r.choice((1, 1, 2, 3, 6))):
            prog = name if i == 0 else f"{name}-{c.text(8).split()[0].decode()}"
            add(f"{bindir}/{prog}", c.elf(_lognormal(r, 40 << 10, 1.3, 10 << 10, 2 << 20)), 0o755)
            add(f"usr/share/man/man1/{prog}.1.gz",
                c.gz(_lognormal(r, 3 << 10, 0.7, 300, 64 << 10)))
        for i in range(r.choice((0, 1, 1, 3))):
            add(f"etc/{name}/{name}{i or ''}.conf",
                c.text(_lognormal(r, 700, 1.0, 20, 32 << 10)))
        if r.random() < 0.3:
            add(f"usr/lib/{name}/{name}-helper.sh",
                b"#!/bin/sh\n" + c.text(_lognormal(r, 2 << 10, 1, 50, 64 << 10)), 0o755)
    elif kind == "python":
        base = f"usr/lib/python3/dist-packages/{name}"
        add(f"{base}/__init__.py", c.text(r.choice((0, 0, 40, 400))))
        subs = [""] + [f"{c.text(10).split()[0].decode()}/" for _ in range(r.randrange(3))]
        for i in range(r.randrange(4, 60)):
            sub = r.choice(subs)
            add(f"{base}/{sub}mod{i}.py",
                c.text(_lognormal(r, 4 << 10, 1.2, 30, 512 << 10)))
        for sub in subs[1:]:
            add(f"{base}/{sub}__init__.py", b"")
    elif kind == "data":
        shape = r.choice(("small-binary", "icons", "text"))
        for i in range(r.randrange(20, 300)):
            d = f"usr/share/{name}/{['a', 'b', 'c', 'd'][i % 4]}"
            if shape == "small-binary":
                add(f"{d}/f{i}", c.mixed(_lognormal(r, 1 << 10, 0.8, 50, 16 << 10)))
            elif shape == "icons":
                add(f"{d}/i{i}.png", c.random(_lognormal(r, 3 << 10, 1.0, 100, 64 << 10)))
            else:
                add(f"{d}/t{i}.txt", c.text(_lognormal(r, 2 << 10, 1.2, 10, 256 << 10)))
    # every package: docs and its dpkg bookkeeping
    add(f"usr/share/doc/{name}/copyright", c.text(_lognormal(r, 4 << 10, 0.9, 200, 64 << 10)))
    add(f"usr/share/doc/{name}/changelog.Debian.gz",
        c.gz(_lognormal(r, 2 << 10, 1.0, 200, 128 << 10)))
    t.write(f"var/lib/dpkg/info/{name}.list", "\n".join(sorted(owned)).encode() + b"\n")
    md5 = "".join(f"{c.random(16).hex()}  {p[1:]}\n" for p in sorted(owned))
    t.write(f"var/lib/dpkg/info/{name}.md5sums", md5.encode())


def generate(dest: Path | str, size_mib: float = 200, seed: int = 1) -> Path:
    """Write a deterministic root filesystem of about ``size_mib`` MiB of file content."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    t = _Tree(dest, Content(rng))
    budget = int(size_mib * MiB)

    # the skeleton of a Debian root
    for d, mode in [("usr/bin", 0o755), ("usr/sbin", 0o755), (ARCH_LIB, 0o755),
                    ("usr/lib64", 0o755), ("usr/share/doc", 0o755), ("usr/include", 0o755),
                    ("etc/alternatives", 0o755), ("var/log", 0o755), ("var/cache", 0o755),
                    ("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o700), ("home", 0o755),
                    ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
                    ("mnt", 0o755), ("srv", 0o755), ("opt", 0o755)]:
        t.mkdir(d, mode)
    for link, target in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")]:
        t.symlink(link, target)
    t.symlink("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    t.write(f"{ARCH_LIB}/ld-linux-x86-64.so.2", t.c.elf(220 << 10), 0o755)
    for name in ("passwd", "group", "hostname", "hosts", "os-release", "fstab", "shells",
                 "nsswitch.conf", "profile", "bash.bashrc", "login.defs", "adduser.conf"):
        t.write(f"etc/{name}", t.c.text(_lognormal(rng, 500, 1.0, 10, 16 << 10)))
    t.write("etc/shadow", t.c.text(600), 0o640)
    t.write("etc/machine-id", b"")
    t.write("usr/bin/passwd", t.c.elf(60 << 10), 0o4755)  # setuid
    t.write("var/log/dpkg.log", t.c.text(_lognormal(rng, 200 << 10, 0.5, 1, 4 << 20)))

    # packages until ~78% of the budget; the rest is a few big files
    n = 0
    while t.bytes < budget * 0.78:
        _package(t, f"{t.c.text(12).split()[0].decode()}{n}")
        n += 1
    big = budget - t.bytes
    shares = [rng.uniform(1.0, 2.0), rng.uniform(0.5, 1.5), rng.uniform(0.3, 0.7)]
    makers = [("usr/lib/locale/locale-archive", t.c.mixed),
              ("var/lib/appdb/data.db", t.c.mixed),
              ("opt/vendor/bundle.bin", t.c.random)]
    for (rel, make), share in zip(makers, shares, strict=True):
        size = int(big * share / sum(shares))
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:  # written in pieces: a 1 GiB tree never sits in memory
            for off in range(0, size, 16 * MiB):
                f.write(make(min(16 * MiB, size - off)))
        os.utime(p, (EPOCH, EPOCH))
        t.bytes += size
        t.files.append(rel)

    # a few hard links (like gzip/gunzip) and alternatives symlinks
    bins = sorted(f for f in t.files if f.startswith("usr/bin/") and f != "usr/bin/passwd")
    for i, target in enumerate(rng.sample(bins, min(5, len(bins)))):
        link = dest / f"usr/bin/hardlink{i}-{Path(target).name}"
        if not link.exists():
            os.link(dest / target, link)
    for target in rng.sample(bins, min(12, len(bins))):
        t.symlink(f"etc/alternatives/{Path(target).name}", f"/{target}")
    _fix_dir_mtimes(dest, EPOCH)
    return dest


def _fix_dir_mtimes(root: Path, when: int) -> None:
    """Directories and symlinks get ``when`` as mtime (deterministic tars)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                os.utime(p, (when, when), follow_symlinks=False)
        os.utime(dirpath, (when, when))


# -- churn ---------------------------------------------------------------------------

def _regular_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if stat.S_ISREG(p.lstat().st_mode):
                out.append(p)
    return out


def _edit(p: Path, rng: random.Random, c: Content) -> str:
    """Edit one file in place (same inode: hard links see it). Returns the edit kind."""
    data = p.read_bytes()
    n = len(data)
    if n == 0:
        new, kind = c.text(rng.randrange(10, 200)), "fill-empty"
    elif data[:2] == b"\x1f\x8b":
        # a re-compressed document differs from the first changed byte on
        cut = rng.randrange(n)
        new, kind = data[:cut] + c.random(max(16, int((n - cut) * rng.uniform(0.9, 1.2)))), \
            "recompress"
    elif b"\0" not in data[:4096]:
        kind = rng.choice(("replace-line", "insert-lines", "append"))
        if kind == "append":
            new = data + c.text(rng.randrange(40, 2000))
        else:
            at = data.find(b"\n", rng.randrange(n)) + 1 or n
            end = at
            if kind == "replace-line":
                end = data.find(b"\n", at) + 1 or n
            new = data[:at] + c.text(rng.randrange(10, 400)) + b"\n" + data[end:]
    else:
        kind = rng.choice(("overwrite", "insert"))
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(n)
            if kind == "overwrite":  # version strings, build ids, relocated addresses
                patch = c.code(rng.randrange(8, 512))
                buf[at:at + len(patch)] = patch[:max(0, n - at)]
            else:  # code that grew or shrank: the rest of the file shifts
                buf[at:at + rng.randrange(0, 256)] = c.code(rng.randrange(16, 4096))
        new = bytes(buf)
    with open(p, "r+b") as f:
        f.write(new)
        f.truncate()
    return kind


def churn(src: Path | str, dst: Path | str, version: int, seed: int = 1,
          modify: float = 0.07, delete: float = 0.01, add: float = 0.015,
          big_edit: float = 0.2, big_size: int = 1 * MiB) -> dict[str, int]:
    """Make version ``version`` in ``dst`` from the tree ``src`` (untouched)."""
    src, dst = Path(src), Path(dst)
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)
    rng = random.Random(f"churn:{seed}:{version}")
    c = Content(random.Random(f"content:{seed}:{version}"))
    when = EPOCH + version * 86400 * 30
    files = _regular_files(dst)
    stats = {"files_before": len(files), "modified": 0, "big_edited": 0, "deleted": 0,
             "added": 0}
    big = [p for p in files if p.lstat().st_size >= big_size]
    small = [p for p in files if p.lstat().st_size < big_size]
    for p in rng.sample(small, int(len(small) * modify)):
        _edit(p, rng, c)
        os.utime(p, (when, when))
        stats["modified"] += 1
    for p in rng.sample(big, max(1, round(len(big) * big_edit)) if big else 0):
        with open(p, "r+b") as f:  # a few small in-place edits in a big file
            size = p.lstat().st_size
            for _ in range(rng.randrange(1, 4)):
                f.seek(rng.randrange(size) // 4096 * 4096)
                f.write(c.mixed(rng.randrange(64, 4096)))
        os.utime(p, (when, when))
        stats["big_edited"] += 1
    untouched = [p for p in small if p.exists()]
    for p in rng.sample(untouched, int(len(untouched) * delete)):
        p.unlink()
        stats["deleted"] += 1
    dirs = sorted({p.parent for p in small if p.parent.exists()})
    for i in range(int(len(files) * add)):
        d = rng.choice(dirs)
        size = _lognormal(rng, 3 << 10, 1.6, 0, 2 << 20)
        maker = rng.choice((c.text, c.text, c.elf, c.mixed, c.gz))
        p = d / f"new-v{version}-{i}"
        p.write_bytes(maker(size))
        os.utime(p, (when, when))
        stats["added"] += 1
    _fix_dir_mtimes(dst, when)
    return stats


# -- real data -----------------------------------------------------------------------

def apt_mirror(default: str = "http://deb.debian.org/debian") -> str:
    """The Debian mirror apt uses here (the one carrying bookworm, not -security)."""
    paths = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for p in paths:
        try:
            text = p.read_text()
        except OSError:
            continue
        if p.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                uris = re.search(r"^URIs:\s*(.+)$", stanza, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                if uris and suites and "bookworm" in suites.group(1).split():
                    return uris.group(1).split()[0]
        else:
            for line in text.splitlines():
                f = line.split("#")[0].split()
                f = [x for x in f if not x.startswith("[")]
                if len(f) >= 3 and f[0] == "deb" and f[2] == "bookworm":
                    return f[1]
    return default


#: what ``debootstrap_rootfs(include=BUILD_TOOLS)`` adds to minbase: about what
#: docker's ``buildpack-deps:bookworm`` images carry (compilers, Python, git)
BUILD_TOOLS = ("build-essential", "python3", "git")


def debootstrap_rootfs(cache: Path | str = "/var/tmp/layerstore-bench/debootstrap-bookworm-minbase",
                       quiet: bool = False, include: tuple[str, ...] = ()) -> Path | None:
    """A debootstrap minbase bookworm tree (plus the packages ``include``), made once in
    ``cache``; None if that fails.

    The .deb files debootstrap leaves in var/cache/apt/archives and the apt lists are
    removed, as image builders (debuerreotype) do."""
    cache = Path(cache)
    if (cache / "etc/os-release").exists():
        return cache
    tmp = cache.with_name(cache.name + ".tmp")
    subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=True)
    mirror = apt_mirror()
    cmd = ["debootstrap", "--variant=minbase",
           *([f"--include={','.join(include)}"] if include else []), "bookworm", str(tmp), mirror]
    if not quiet:
        print(f"making a real root filesystem: {' '.join(cmd)}", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        print(f"debootstrap failed ({exc}): falling back to the generator", file=sys.stderr)
        return None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        print(f"debootstrap failed (exit {proc.returncode}): falling back to the "
              f"generator\n{tail}", file=sys.stderr)
        subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)])
        return None
    for junk in [*(tmp / "var/cache/apt/archives").glob("*.deb"),
                 *(tmp / "var/lib/apt/lists").glob("*_*")]:
        junk.unlink()
    tmp.rename(cache)
    return cache


def tree_stats(root: Path) -> dict[str, int]:
    s = {"files": 0, "bytes": 0, "symlinks": 0, "dirs": 0, "hardlinked": 0}
    for dirpath, dirnames, filenames in os.walk(root):
        s["dirs"] += 1
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                s["symlinks"] += 1
            elif stat.S_ISREG(st.st_mode):
                s["files"] += 1
                s["bytes"] += st.st_size
                s["hardlinked"] += st.st_nlink > 1
    return s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--size-mib", type=float, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--versions", type=int, default=1,
                    help="also write DEST.v1 .. DEST.v(N-1), each churned from the previous")
    ap.add_argument("--debootstrap", action="store_true",
                    help="start from a real debootstrap minbase tree (copied into DEST)")
    a = ap.parse_args(argv)
    if a.dest.exists():
        sys.exit(f"{a.dest} exists")
    base = debootstrap_rootfs() if a.debootstrap else None
    if base is not None:
        subprocess.run(["cp", "-a", "--", str(base), str(a.dest)], check=True)
    else:
        generate(a.dest, a.size_mib, a.seed)
    print(a.dest, tree_stats(a.dest))
    prev = a.dest
    for v in range(1, a.versions):
        nxt = a.dest.with_name(f"{a.dest.name}.v{v}")
        print(nxt, churn(prev, nxt, v, a.seed))
        prev = nxt


if __name__ == "__main__":
    main()
