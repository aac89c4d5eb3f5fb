"""Rewrite the README's method tables (between the ``methods:begin`` / ``methods:end`` markers) from the registry."""

from __future__ import annotations

import sys
from pathlib import Path

from kvsieve.catalog import markdown_tables

BEGIN, END = "<!-- methods:begin -->\n", "<!-- methods:end -->"


def main() -> int:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print("update_readme_tables: README.md has no method-table markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + BEGIN + markdown_tables() + END + tail, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
