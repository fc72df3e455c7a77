"""``layerstore demo``: a guided tour on the embedded default image (no download)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import IntegrityError


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="build the embedded demo image and walk through the CLI",
                       description="Builds a small two-tag OCI image (made by layerstore, no "
                                   "download), imports it into a fresh store, and runs the "
                                   "main commands on it, printing each one.")
    p.add_argument("--keep", action="store_true", help="keep the demo directory")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..oci.sample import write_demo_layout
    from .main import main

    work = Path(tempfile.mkdtemp(prefix="layerstore-demo-"))
    root = args.root or work / "store"
    layout = work / "demo-oci"
    print(f"# building the demo image (an OCI layout with two tags) in {layout}")
    write_demo_layout(layout)

    def run(*argv: str) -> None:
        print(f"\n$ layerstore {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        rc = main(["--root", str(root), "--quiet", *argv])
        if rc != 0:
            raise IntegrityError(f"demo step failed: layerstore {' '.join(argv)}")

    run("import", str(layout))
    run("images")
    run("df")
    out = work / "exported"
    run("export", "demo:app", str(out))
    # the exported layers are the original uncompressed tars, byte for byte
    config = json.loads(next(p for p in (out / "blobs/sha256").iterdir()
                             if b'"rootfs"' in p.read_bytes()[:65536] and p.stat().st_size < 65536
                             ).read_bytes())
    for d in config["rootfs"]["diff_ids"]:
        blob = out / "blobs/sha256" / d.split(":")[1]
        ok = hashlib.sha256(blob.read_bytes()).hexdigest() == d.split(":")[1]
        print(f"# exported layer {d[:19]}... byte-identical to the imported tar: {ok}")
        if not ok:
            raise IntegrityError("exported layer differs from the imported one")
    if os.path.exists("/dev/fuse"):
        mnt = work / "mnt"
        mnt.mkdir()
        run("prefetch", "demo:app")  # its big files read by the kernel from the first read
        run("create", "demo:app", "--name", "demo")
        run("mount", "demo", str(mnt))
        try:
            print(f"\n$ ls {mnt}/etc && cat {mnt}/etc/os-release")
            print("  ".join(sorted(os.listdir(mnt / "etc"))))
            print((mnt / "etc/os-release").read_text(), end="")
            if (mnt / "bin/sh").exists() and shutil.which("chroot") and os.geteuid() == 0:
                print(f"$ chroot {mnt} /bin/sh /app/hello.sh", flush=True)
                subprocess.run(["chroot", str(mnt), "/bin/sh", "/app/hello.sh"], check=False)
            print(f"$ echo changed >> {mnt}/etc/os-release; rm {mnt}/etc/passwd")
            with open(mnt / "etc/os-release", "a") as f:
                f.write("changed\n")
            os.unlink(mnt / "etc/passwd")
            upper = next((Path(root) / "containers").iterdir()) / "upper" / "etc"
            print(f"# the container's upper directory, in kernel overlayfs format ({upper}):")
            for name in sorted(os.listdir(upper)):
                st = os.lstat(upper / name)
                kind = ("whiteout (char 0/0)" if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                        else f"file, {st.st_size} bytes")
                print(f"  etc/{name}: {kind}")
        finally:
            run("umount", str(mnt))
        run("rm", "demo")
    else:
        print("\n# /dev/fuse is missing: skipping the mount part of the demo")
    run("rmi", "demo:base")
    run("gc")
    run("check")
    print(f"\n# demo store: {root}" + ("" if args.keep else " (removed)"))
    if not args.keep and args.root is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0
