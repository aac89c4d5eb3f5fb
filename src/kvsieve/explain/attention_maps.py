"""Attention-derived attributions: ``attention_last_layer``, ``attention_rollout``, ``attention_chain`` (UQAC),
``fai`` and ``waad`` (Preplan-and-Anchor).

All of them read the attention probabilities of one forward pass over prompt + target. They are captured with
forward hooks on the attention modules while the model runs transformers' eager attention (the only implementation
that returns the probabilities); the model's own implementation is restored and the hooks removed on exit, also
after an error. The probabilities are kept as ``(L, H, N, N)`` float32 (about 390 MB for 600 tokens on SmolLM2).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .problem import Problem


@contextmanager
def _eager(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Run ``model`` with eager attention inside the block; yields the list each layer's probabilities go to."""
    before = model.config._attn_implementation
    maps: list[torch.Tensor] = []
    handles = []

    def keep(_module, _args, output):
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            maps.append(output[1][0].detach().float())

    for module in model.modules():
        if hasattr(module, "o_proj") and hasattr(module, "layer_idx"):
            handles.append(module.register_forward_hook(keep))
    try:
        model.set_attn_implementation("eager")
        yield maps
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(before)


def attention_maps(problem: Problem) -> torch.Tensor:
    """Attention probabilities ``(L, H, N, N)`` of every layer and query head over prompt + target (cached)."""
    if "attention" not in problem._cache:
        with _eager(problem.model) as maps, torch.no_grad():
            out = problem.model(input_ids=problem.ids, use_cache=False)
        problem._cache.setdefault("logits", out.logits[0].float())
        problem._cache["attention"] = torch.stack(maps)
    return problem._cache["attention"]


def _rows(problem: Problem, matrix: torch.Tensor) -> torch.Tensor:
    """Row ``query_position(t)`` of an ``(N, N)`` matrix for every step, restricted to each step's context."""
    out = problem.empty_scores()
    for t in range(problem.n_steps):
        p = problem.query_position(t)
        out[t, : p + 1] = matrix[p, : p + 1].double()
    return out


def attention_last_layer(problem: Problem) -> torch.Tensor:
    """The last layer's attention from the position predicting the target, averaged over heads."""
    return _rows(problem, attention_maps(problem)[-1].mean(dim=0))


def attention_rollout(problem: Problem) -> torch.Tensor:
    """Abnar & Zuidema (2020): per layer ``0.5 A + 0.5 I`` (heads averaged, rows renormalised), multiplied from the
    first layer up; the row of the position predicting the target."""
    maps = attention_maps(problem).mean(dim=1).double()
    n = maps.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    rollout = eye
    for layer in maps:
        a = 0.5 * layer + 0.5 * eye
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
    return _rows(problem, rollout)


# --- Preplan-and-Anchor -------------------------------------------------------------------------------------------
def _head_distance(maps: torch.Tensor) -> torch.Tensor:
    """Mean backward attention distance ``sum_j A[i, j] (i - j)`` of each head, averaged over queries: ``(L, H)``."""
    n = maps.shape[-1]
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0).float()
    return (maps * dist).sum(-1).mean(-1)


def _split_heads(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Globally and locally focused heads (above / at most the median mean attention distance): ``(L*H,)`` bools."""
    d = _head_distance(maps).flatten()
    median = d.median()
    return d > median, d <= median


def fai(problem: Problem) -> torch.Tensor:
    """Future Attention Influence: the mean attention a token receives from the tokens after it (up to the position
    predicting the target), in the globally focused heads (above-median mean attention distance), averaged."""
    maps = attention_maps(problem)
    flat = maps.flatten(0, 1)
    global_heads, _ = _split_heads(maps)
    a = flat[global_heads].mean(dim=0).double()  # (N, N)
    received = a.cumsum(dim=0)  # received[p, j] = sum_{i <= p} a[i, j]
    out = problem.empty_scores()
    for t in range(problem.n_steps):
        p = problem.query_position(t)
        j = torch.arange(p + 1)
        later = (p - j).clamp(min=1).double()  # queries i in (j, p]
        # sum over i in (j, p] of a[i, j] = received[p, j] - received[j, j]
        out[t, : p + 1] = (received[p, : p + 1] - received[j, j]) / later
    return out


def waad(problem: Problem, window: int = 10) -> torch.Tensor:
    """Windowed Average Attention Distance of each context token: ``sum_j A[i, j] min(i - j, window)`` (how far back
    token ``i`` reaches), in the locally focused heads (at most the median mean attention distance), averaged. A
    property of the token, the same for every step (the paper's "preplan" tokens have high WAAD)."""
    maps = attention_maps(problem)
    _, local_heads = _split_heads(maps)
    a = maps.flatten(0, 1)[local_heads].mean(dim=0).double()
    n = a.shape[-1]
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0, max=window).double()
    per_token = (a * dist).sum(-1)
    out = problem.empty_scores()
    for t in range(problem.n_steps):
        n_ctx = problem.n_prompt + t
        out[t, :n_ctx] = per_token[:n_ctx]
    return out


# --- UQAC attention chain -------------------------------------------------------------------------------------------
_STOP_TEXT = (
    "a an the of to in on at by for with and or but is are was were be been being it its this that these those as "
    "from into than then so if not no do does did have has had i you he she we they me him her us them my your our "
    "their what which who whom whose when where why how"
)
STOP_WORDS = frozenset(_STOP_TEXT.split(" "))
_PUNCT = re.compile(r"^[\W_]*$")


def _stop_mask(tokens: list[str]) -> torch.Tensor:
    return torch.tensor([t.strip().lower() in STOP_WORDS or bool(_PUNCT.match(t.strip())) for t in tokens])


def _reduced_rows(maps: torch.Tensor, n_heads: int) -> torch.Tensor:
    """UQAC's reduction: per query row, the ``n_heads`` (layer, head) pairs of lowest entropy after dropping token 0
    (the sink) and the query itself and renormalising, averaged: ``(N, N)``."""
    flat = maps.flatten(0, 1).clone()  # (LH, N, N)
    n = flat.shape[-1]
    flat[..., 0] = 0.0
    flat[:, torch.arange(n), torch.arange(n)] = 0.0
    flat = flat / (flat.sum(-1, keepdim=True) + 1e-12)
    entropy = -(flat * (flat + 1e-12).log()).sum(-1)  # (LH, N)
    k = min(n_heads, flat.shape[0])
    chosen = entropy.topk(k, dim=0, largest=False).indices  # (k, N)
    rows = flat[chosen, torch.arange(n)[None, :]]  # (k, N, N)
    return rows.mean(dim=0)


def attention_chain(
    problem: Problem,
    n_heads: int = 8,
    buffer: int = 3,
    threshold: float = 0.1,
    min_length: int = 5,
    min_similarity: float = 0.0,
    max_prob: float = 0.95,
    max_iterations: int = 1000,
) -> torch.Tensor:
    """UQAC's attention chain (Li et al. 2025), backtracked from each target token down to the input.

    From the position predicting the target, the most attended tokens (lowest-entropy heads, no stop words or
    punctuation) join the chain with their accumulated attention as score, up to ``buffer`` per iteration while the
    score is at least ``threshold`` or the chain is shorter than ``min_length``; each chosen token is then traced
    from the position that predicted it, until no new token qualifies. Filters: a chain token whose output logits
    have cosine similarity to the target position's below ``min_similarity`` is dropped (UQAC's similarity
    filter), and so is one the model predicts with probability above ``max_prob`` (UQAC's probability threshold:
    near-certain tokens carry no evidence). Tokens off the chain score 0.
    """
    maps = attention_maps(problem)
    reduced = _reduced_rows(maps, n_heads).double()
    logits = problem.logits()
    probs = logits[:-1].softmax(-1).gather(-1, problem.ids[0, 1:, None])[:, 0]  # p(token k | prefix) for k >= 1
    stop = _stop_mask(problem.tokens())
    out = problem.empty_scores()
    for t in range(problem.n_steps):
        p = problem.query_position(t)
        scores = torch.zeros(p + 1, dtype=torch.float64)
        chain: set[int] = set()
        processed: set[int] = set()
        sources = [p]
        for _ in range(max_iterations):
            if not sources:
                break
            processed.update(sources)
            gathered = torch.zeros(p + 1, dtype=torch.float64)
            for src in sources:
                row = reduced[src, : src + 1]
                for rank, k in enumerate(row.argsort(descending=True).tolist()):
                    if rank >= 5 and (bool((gathered > 0).any()) or len(chain) >= min_length):
                        break
                    if k == src or (k - 1) in processed or bool(stop[k]) or row[k] <= 0:
                        continue
                    gathered[k] += row[k]
            picked = []
            for k in gathered.argsort(descending=True).tolist():
                score = float(gathered[k])
                if score <= 0 or len(picked) >= buffer:
                    break
                if score < threshold and len(chain) + len(picked) >= min_length:
                    break
                picked.append(k)
                scores[k] += score
                chain.add(k)
            sources = [k - 1 for k in picked if k >= 1]
        if chain:
            idx = torch.tensor(sorted(chain))
            sims = torch.cosine_similarity(logits[idx].double(), logits[p].double()[None], dim=-1)
            drop = sims < min_similarity
            certain = torch.tensor([k >= 1 and float(probs[k - 1]) > max_prob for k in idx.tolist()])
            scores[idx[drop | certain]] = 0.0
        out[t, : p + 1] = scores
    return out
