"""The README's method tables are generated from the registry, so they cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

from kvsieve import list_methods
from kvsieve.catalog import markdown_tables, records

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- methods:begin -->\n", "<!-- methods:end -->"


def test_readme_method_tables_are_the_generated_ones():
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "README.md lost its method-table markers"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block.strip() == markdown_tables().strip(), (
        "README.md's method tables are out of date: paste `kvsieve methods --markdown` between the markers"
    )


def test_every_method_has_its_metadata_and_appears_once():
    table = markdown_tables()
    for cls in list_methods():
        assert cls.name and cls.family and cls.needs, cls
        assert cls.paper, f"{cls.name}: cite the paper (or '-')"
        assert cls.simplifications, f"{cls.name}: state the simplifications ('none: ...' if there are none)"
        assert table.count(f"| `{cls.name}` |") == 1, cls.name
    assert {r["name"] for r in records()} == {c.name for c in list_methods()}
