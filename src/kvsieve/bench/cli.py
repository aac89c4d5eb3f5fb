"""CLI subcommands of the benchmark: ``tasks``, ``bench``, ``report``."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the benchmark's subcommands on the main parser."""
