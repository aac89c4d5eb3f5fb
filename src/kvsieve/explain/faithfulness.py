"""Faithfulness of token scores: comprehensiveness and sufficiency (DeYoung et al. 2020), as ReAGent evaluates them.

For a share ``k`` of the prompt's tokens (10%, 25%, 50%) and each target token, the ``ceil(k x n_prompt)`` prompt
tokens a method scores highest for that target token are

- **removed** (deleted from the sequence): *comprehensiveness* = ``p(target | prompt) - p(target | prompt without
  them)``; higher means the method found tokens the output depends on;
- **kept alone** (every other prompt token deleted): *sufficiency* = ``p(target | prompt) - p(target | only them)``;
  lower means those tokens alone carry the output.

The target tokens before the scored one stay in place (teacher forcing), so every method and every cache method is
judged on the same sequences. A seeded random ranking is always measured as the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import KVSieveError
from .attribution import random_scores
from .problem import Problem

SHARES = (0.1, 0.25, 0.5)


def _check_shares(shares: Sequence[float]) -> list[float]:
    out = [float(s) for s in shares]
    if not out or any(not (0.0 < s < 1.0) for s in out):
        raise KVSieveError(f"faithfulness shares must be fractions in (0, 1), e.g. 0.1,0.25,0.5; got {list(shares)}")
    return out


def n_tokens(share: float, n_prompt: int) -> int:
    return max(1, min(n_prompt, math.ceil(share * n_prompt - 1e-9)))


@torch.no_grad()
def _probs(problem: Problem, masks: list[torch.Tensor], batch: int) -> torch.Tensor:
    """p(target t | the prompt tokens flagged in mask, then target tokens < t) for every mask and step,
    ``(len(masks), n_steps)``.

    One sequence per mask (the kept prompt tokens, then every target token but the last) gives every step at once:
    attention is causal, so the logits at the kept prompt's end + t see exactly step t's context. Masks keeping the
    same number of tokens give sequences of one length, so they run ``batch`` at a time without padding. Equal to
    one forward pass per (mask, step) up to float rounding (tests/test_explain.py checks it at 300 tokens).
    """
    ids = problem.ids[0]
    prompt, tail = ids[: problem.n_prompt], ids[problem.n_prompt : -1]
    targets = problem.targets
    out = torch.empty(len(masks), problem.n_steps, dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for i, mask in enumerate(masks):
        by_length.setdefault(int(mask.sum()), []).append(i)
    for rows in by_length.values():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            seqs = torch.stack([torch.cat([prompt[masks[i]], tail]) for i in chunk])
            # logits only where a step is predicted: positions kept - 1 .. kept + n_steps - 2 (the last n_steps)
            logits = problem.model(input_ids=seqs, use_cache=False, logits_to_keep=problem.n_steps).logits.float()
            probs = logits.softmax(-1).gather(-1, targets.expand(len(chunk), -1)[..., None])[..., 0]
            out[chunk] = probs.double()
    return out


def top_prompt_tokens(scores: torch.Tensor, n_prompt: int, k: int) -> torch.Tensor:
    """``(n_prompt,)`` bool: the ``k`` prompt tokens with the highest scores (NaN lowest; ties to the earlier)."""
    s = scores[:n_prompt].double().nan_to_num(nan=-math.inf)
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    mask = torch.zeros(n_prompt, dtype=torch.bool)
    mask[order] = True
    return mask


def measure(
    problem: Problem,
    scores: dict[str, torch.Tensor],
    shares: Sequence[float] = SHARES,
    baseline: bool = True,
    batch: int = 8,
) -> dict:
    """Comprehensiveness and sufficiency per method and share, averaged over the target tokens.

    Every distinct perturbed prompt (methods often agree, and a cache method ranks the same for every step) runs
    once, ``batch`` sequences per forward pass.

    Returns ``{"shares": [...], "p_full": mean p(target), "methods": {name: {"comprehensiveness": {share: v},
    "sufficiency": {share: v}}}}`` (share keys are strings such as ``"0.25"``).
    """
    shares = _check_shares(shares)
    all_scores = dict(scores)
    if baseline and "random" not in all_scores:
        all_scores["random"] = random_scores(problem)
    p_full = [float(p) for p in problem.target_probs()]
    masks: dict[bytes, int] = {}  # a perturbed prompt's keep mask -> its row in `mask_list`
    mask_list: list[torch.Tensor] = []
    wanted: dict[tuple[str, str, str, int], int] = {}  # (method, share, metric, step) -> row

    def row(keep: torch.Tensor) -> int:
        key = keep.numpy().tobytes()
        if key not in masks:
            masks[key] = len(mask_list)
            mask_list.append(keep)
        return masks[key]

    for name, s in all_scores.items():
        for share in shares:
            k = n_tokens(share, problem.n_prompt)
            for t in range(problem.n_steps):
                top = top_prompt_tokens(s[t], problem.n_prompt, k)
                wanted[name, f"{share:g}", "comprehensiveness", t] = row(~top)
                wanted[name, f"{share:g}", "sufficiency", t] = row(top)
    probs = _probs(problem, mask_list, batch)
    methods = {}
    for name in all_scores:
        methods[name] = {
            metric: {
                f"{share:g}": sum(p_full[t] - float(probs[wanted[name, f"{share:g}", metric, t], t])
                                  for t in range(problem.n_steps)) / problem.n_steps
                for share in shares
            }
            for metric in ("comprehensiveness", "sufficiency")
        }  # fmt: skip
    return {"shares": shares, "p_full": sum(p_full) / len(p_full), "methods": methods}
