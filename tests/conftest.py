"""Shared fixtures.

- ``root``: a fresh store root (a path; the store is created on first use).
- ``cli(*args, root=..., check=True)``: runs ``python -m layerstore --root ROOT ...`` in a
  subprocess, returns CompletedProcess (text). ``check=True`` asserts exit 0.
- ``store``: an open ``Store`` on ``root`` with a small map (64 MiB) so map growth runs.
- ``assert_clean(root)``: runs ``layerstore check`` and asserts it is clean. Tests that
  change the store call it at the end (s3ql's ``fsck`` after every test).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerstore.store import Store

#: the mount tests' shared fixtures (demo, mnt) live in helpers_mount.py
pytest_plugins = ["helpers_mount"]


def run_cli(*args: str | os.PathLike, root: Path, check: bool = True,
            timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "layerstore", "--root", str(root), *map(str, args)]
    e = dict(os.environ)
    e.pop("LAYERSTORE_DEBUG", None)
    if env:
        e.update(env)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    if check:
        assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def assert_clean(root: Path) -> None:
    p = run_cli("check", root=root, check=False)
    assert p.returncode == 0 and "clean" in p.stdout, f"check: {p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(root: Path):
    def _cli(*args, check: bool = True, **kw):
        kw.setdefault("root", root)
        return run_cli(*args, check=check, **kw)
    return _cli


@pytest.fixture
def store(root: Path):
    s = Store.open(root, map_size=64 << 20)
    yield s
    s.close()
