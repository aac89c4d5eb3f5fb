"""The benchmark's defaults and presets, importable without torch (``kvsieve bench --help`` prints at once)."""

from __future__ import annotations

from typing import Any

DEFAULT_METHODS = ["full", "streaming_llm", "h2o", "snapkv", "tova", "knorm", "random"]
DEFAULT_COMPRESSIONS = [0.25, 0.5, 0.75]
HEADROOM = 256
"""Tokens a length must leave free in the model's window: chat template, question(s), answer prefix and answer."""

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"samples": 2},
    "standard": {"samples": 20},
}
"""Named runs. Both use the default tasks, methods, compressions and 2,048-token length; samples are spread evenly
over needle depths 0-100%, so ``standard`` puts a needle every ~5% of the context."""
