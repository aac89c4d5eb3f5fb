"""Result files that a crash can never corrupt: JSON lines, each row written whole, flushed and synced.

A row is one ``os.write`` of ``json + "\\n"`` on a file opened for appending, followed by ``fsync``, so a crash leaves
either the whole row or a torn last line without its newline. :meth:`ResultsFile.recover` (run before a resumed run
reads or appends anything) moves every line that is not a complete JSON object into ``<name>.partial`` (appended
there, never dropped) and cuts the file back to its complete rows, so the rerun redoes exactly the lost rows and
never glues a new row onto a torn one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KVSieveError


@dataclass
class Recovery:
    """What :meth:`ResultsFile.recover` set aside."""

    lines: int  # lines moved to the .partial file
    partial: Path

    def message(self, path: Path) -> str:
        return (
            f"{path}: {self.lines} incomplete line(s) from an interrupted run moved to {self.partial}; "
            "their rows are redone"
        )


class ResultsFile:
    """An append-only JSON-lines file of result rows."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")

    def recover(self) -> Recovery | None:
        """Set aside torn or unreadable lines (see the module docstring); ``None`` when the file is sound."""
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: empty unless the last write was torn
        bad = [line for line in lines if line.strip() and not _is_row(line)]
        if tail:  # a torn last write (kept even when blank: the next row must start on a line of its own)
            bad.append(tail)
        if not bad:
            return None
        with self.partial.open("ab") as f:
            for line in bad:
                f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        good = [line for line in lines if line.strip() and _is_row(line)]
        if len(good) == len([line for line in lines if line.strip()]):
            # only the last line was torn: cut it off in place
            with self.path.open("r+b") as f:
                f.truncate(len(data) - len(tail))
                os.fsync(f.fileno())
        else:  # unreadable lines in the middle (an older kvsieve glued rows together): rewrite atomically
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("wb") as f:
                f.write(b"".join(line + b"\n" for line in good))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return Recovery(lines=len(bad), partial=self.partial)

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row; a torn last line (a run still writing, or killed) is not a row."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().split(b"\n"):
            if line.strip() and _is_row(line):
                out.append(json.loads(line))
        return out

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line in one ``write``, then ``fsync``: it is on disk whole, or not at all."""
        data = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):  # regular files write everything at once; this is for exotic filesystems
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_row(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def prepare_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create the output directory, or explain in one line why it cannot be used (before any heavy work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise KVSieveError(f"{flag} {out} is a file, not a directory; pass a directory path (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KVSieveError(
            f"{flag} {out} cannot be created ({exc.strerror}); pass a directory you can write to"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise KVSieveError(f"{flag} {out} is not writable; pass a directory you can write to")
    return out
