"""Output helpers for the CLI: human sizes, tables, JSON, progress bars (tqdm on stderr)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def human_size(n: float) -> str:
    """Sizes as docker prints them: 1000-based, three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}TB"


def human_age(ts: float) -> str:
    d = max(0, time.time() - ts)
    for secs, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"),
                       (86400, "day"), (3600, "hour"), (60, "minute")):
        if d >= secs:
            n = int(d // secs)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago" if d >= 1 else "Just now"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [headers, *rows]]
    return "\n".join(lines)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _no_bar(n: int) -> None:
    pass


def _bars_shown(quiet: bool) -> bool:
    """Bars go to stderr and only when it is a terminal (what tqdm's ``disable=None``
    decides). Without bars tqdm is not even imported: it costs ~40 ms of start-up."""
    try:
        return not quiet and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Factory of byte progress bars: ``progress(label, total) -> tick(n)``.

    Bars go to stderr and only when it is a terminal, so pipes and tests see clean output.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bars: list[Any] = []

    def __call__(self, label: str, total: int | None) -> Callable[[int], None]:
        self.close()
        if not _bars_shown(self.quiet):
            return _no_bar
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                   file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bars.append(bar)
        return bar.update

    def close(self) -> None:
        for b in self.bars:
            b.close()
        self.bars.clear()


@contextmanager
def progress_bars(quiet: bool = False) -> Iterator[Progress]:
    p = Progress(quiet)
    try:
        yield p
    finally:
        p.close()


@contextmanager
def counter(label: str, unit: str = "it", quiet: bool = False) -> Iterator[Callable[[int], None]]:
    if not _bars_shown(quiet):
        yield _no_bar
        return
    from tqdm import tqdm

    bar = tqdm(desc=label, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
               dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()
