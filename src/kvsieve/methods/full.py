"""``full``: the uncompressed baseline. Keeps every token; with it kvsieve must equal plain transformers exactly."""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .base import Method


@register
@dataclass
class Full(Method):
    """No compression: every token is kept. The baseline every method is compared with."""

    name = "full"
    family = "baseline"
    paper = "-"
    needs = "nothing"
    simplifications = "none: bitwise identical to transformers (tested on four architectures)"
    own_kind = "keep-all"
