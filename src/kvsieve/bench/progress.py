"""Progress on stderr: a live bar on a terminal, plain lines otherwise (``kvsieve bench > log 2>&1`` shows progress)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

PLAIN_EVERY_SECONDS = 30.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


class PlainProgress:
    """Prints ``<name>: done/total (pct), elapsed, ETA`` every 10% of the total or every 30 s, and at the end."""

    def __init__(self, name: str, total: int, stream: TextIO, every: float = PLAIN_EVERY_SECONDS):
        self.name, self.total, self.stream, self.every = name, max(0, total), stream, every
        self.done = 0
        self.resumed = 0  # rows reported at once on start (already done by an earlier run): not part of the rate
        self.start = self.last_print = time.monotonic()
        self.last_tenth = -1

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.start < 1.0 and self.done == n:
            self.resumed = n
        tenth = 10 * self.done // self.total if self.total else 10
        if tenth != self.last_tenth or now - self.last_print >= self.every or self.done >= self.total:
            self.last_tenth, self.last_print = tenth, now
            self.print(now)

    def print(self, now: float) -> None:
        elapsed = now - self.start
        pct = 100 * self.done / self.total if self.total else 100.0
        line = f"{self.name}: {self.done}/{self.total} ({pct:.0f}%), {_clock(elapsed)} elapsed"
        fresh = self.done - self.resumed
        if fresh > 0 and self.done < self.total:
            line += f", ETA {_clock(elapsed / fresh * (self.total - self.done))}"
        print(line, file=self.stream, flush=True)


@contextmanager
def progress(name: str, total: int, stream: TextIO | None = None) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; a rich bar when ``stream`` (default stderr) is a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if not stream.isatty():
        plain = PlainProgress(name, total, stream)
        yield plain.advance
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=stream)) as bar:
        task = bar.add_task(name, total=total)
        yield lambda n=1: bar.advance(task, n)
