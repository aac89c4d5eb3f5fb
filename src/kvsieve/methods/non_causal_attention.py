"""``non_causal_attention``: chunked non-causal attention received, times ``||v||`` (Compactor's attention half).

Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores"
(2025); kvpress's ``NonCausalAttnPress``. The prompt is cut into chunks of ``chunk`` tokens; within a chunk every
query attends to every key of the chunk, *including later ones* (no causal mask); a key's score is the attention it
receives summed over the chunk's queries, averaged over the GQA group, times ``||v||``, averaged over 3 stream
neighbours (zeros beyond the edges) and z-normalised.

The column sums are computed when tokens arrive (``observe``, per pass, on the queries of that pass) and kept with
the tokens, so a shared-prefill replay and later evictions reuse them. Simplifications: chunks are counted in stream
positions (``position // chunk``; kvpress: from the start of the pass, the same for a prompt); in a chunk cut by a
pass boundary (chunked prefill) or a decoding step only that pass's tokens attend to each other; the last partial
chunk has no padding entries (kvpress masks them with -1e-9, which lets padding take attention); the z-score runs per
batch row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, hp
from .qk_stats import zero_padded_pool, zscore


def chunk_column_sums(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, chunk: int, scaling: float):
    """Non-causal attention received per key, summed over the queries of its chunk: ``(h, n)``.

    queries ``(h*g, n, D)`` and keys ``(h, n, D)`` of the same ``n`` consecutive real tokens at ``positions`` ``(n,)``;
    result averaged over each KV head's ``g`` query heads.
    """
    hq, n, d = queries.shape
    h = keys.shape[0]
    g = hq // h
    out = torch.zeros(h, n, dtype=torch.float32, device=keys.device)
    groups = positions // chunk
    start = 0
    while start < n:
        stop = start + int((groups[start:] == groups[start]).sum())
        q = queries[:, start:stop].to(torch.float32).reshape(h, g * (stop - start), d)
        k = keys[:, start:stop].to(torch.float32)
        probs = ((q @ k.transpose(-1, -2)) * scaling).softmax(dim=-1)  # (h, g*r, r)
        out[:, start:stop] = probs.sum(dim=1) / g
        start = stop
    return out


def observe_chunk_attention(obs: Observation, key: str, chunk: int) -> None:
    """Store the chunked non-causal column sums of this pass's real tokens in ``obs.state[key]``."""
    b, h, t, _ = obs.keys.shape
    n = obs.n_new
    state = obs.state.get(key)
    if state is None:
        state = torch.zeros(b, h, t, dtype=torch.float32, device=obs.keys.device)
    state = state.clone()
    for row in range(b):
        n_real = n if obs.valid is None else int(obs.valid[row, 0, t - n :].sum())
        if n_real == 0:
            continue
        sl = slice(t - n_real, t)  # the pass's real tokens: left padding comes first
        queries = obs.queries[row, :, n - n_real :]
        state[row, :, sl] = chunk_column_sums(
            queries, obs.keys[row, :, sl], obs.positions[row, 0, sl], chunk, obs.scaling
        )
    obs.state[key] = state


def attention_scores(obs: Observation, key: str, keep) -> torch.Tensor:
    """z-scored, 3-pooled ``column sums x ||v||`` over the tokens ``keep`` ``(B, h, T)`` (or every real token)."""
    scores = obs.state[key] * obs.values.to(torch.float32).norm(dim=-1)
    pooled = zero_padded_pool(scores, obs.positions, 3, keep)
    return zscore(pooled, keep)


@register
@dataclass
class NonCausalAttention(Method):
    """Score = z-scored, neighbour-averaged (chunked non-causal attention received x ``||v||``).

    chunk: chunk size in tokens (256).
    """

    chunk: int = hp(256, ge=1)

    name = "non_causal_attention"
    paper = "Chari & Van Durme 2025, arXiv:2507.08143"
    needs = "queries and keys of each pass (non-causal within chunks), values"
    simplifications = (
        "column sums taken per pass when tokens arrive (chunks by stream position; a decoding token's chunk is "
        "itself); no padded entries in the last chunk (kvpress masks them with -1e-9); z-score per batch row"
    )

    def observe(self, obs: Observation) -> None:
        observe_chunk_attention(obs, self.name, self.chunk)

    def score(self, obs: Observation) -> torch.Tensor:
        return attention_scores(obs, self.name, obs.valid)
