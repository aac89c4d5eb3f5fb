"""Prompts shared by the benchmark scripts, imported as a sibling module (they run as ``python benchmarks/X.py``)."""

from __future__ import annotations

import torch

from kvsieve.tasks import get_task


def prompt_ids(tokenizer, context: int) -> torch.Tensor:
    """A passkey haystack of exactly ``context`` tokens."""
    sample = get_task("passkey").generate(tokenizer, length=context + 64, n=1, seed=0)[0]
    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < context:
        raise SystemExit(f"could not build a {context}-token prompt (got {ids.shape[1]})")
    return ids[:, -context:]
