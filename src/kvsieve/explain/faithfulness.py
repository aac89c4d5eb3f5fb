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
def _prob(problem: Problem, keep: torch.Tensor, step: int) -> float:
    """p(target ``step``) with only the prompt tokens flagged in ``keep`` ``(n_prompt,)`` left in the prompt."""
    ids = problem.ids[0]
    prefix = ids[: problem.n_prompt][keep]
    seq = torch.cat([prefix, ids[problem.n_prompt : problem.n_prompt + step]])[None]
    logits = problem.model(input_ids=seq, use_cache=False).logits[0, -1].float()
    return float(logits.softmax(-1)[int(problem.targets[step])])


def top_prompt_tokens(scores: torch.Tensor, n_prompt: int, k: int) -> torch.Tensor:
    """``(n_prompt,)`` bool: the ``k`` prompt tokens with the highest scores (NaN lowest; ties to the earlier)."""
    s = scores[:n_prompt].double().nan_to_num(nan=-math.inf)
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    mask = torch.zeros(n_prompt, dtype=torch.bool)
    mask[order] = True
    return mask


def measure(
    problem: Problem, scores: dict[str, torch.Tensor], shares: Sequence[float] = SHARES, baseline: bool = True
) -> dict:
    """Comprehensiveness and sufficiency per method and share, averaged over the target tokens.

    Returns ``{"shares": [...], "p_full": mean p(target), "methods": {name: {"comprehensiveness": {share: v},
    "sufficiency": {share: v}}}}`` (share keys are strings such as ``"0.25"``).
    """
    shares = _check_shares(shares)
    all_scores = dict(scores)
    if baseline and "random" not in all_scores:
        all_scores["random"] = random_scores(problem)
    p_full = [float(p) for p in problem.target_probs()]
    methods = {}
    for name, s in all_scores.items():
        comp, suff = {}, {}
        for share in shares:
            k = n_tokens(share, problem.n_prompt)
            c, u = [], []
            for t in range(problem.n_steps):
                top = top_prompt_tokens(s[t], problem.n_prompt, k)
                c.append(p_full[t] - _prob(problem, ~top, t))
                u.append(p_full[t] - _prob(problem, top, t))
            comp[f"{share:g}"] = sum(c) / len(c)
            suff[f"{share:g}"] = sum(u) / len(u)
        methods[name] = {"comprehensiveness": comp, "sufficiency": suff}
    return {"shares": shares, "p_full": sum(p_full) / len(p_full), "methods": methods}
