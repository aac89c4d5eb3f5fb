"""``finch``: prompt-guided SnapKV: the question's tokens are the observation window; keys re-rotated.

Corallo & Papotti, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language Models" (TACL 2024), as
kvpress's ``FinchPress``: the window of queries that vote is the prompt (question) itself, of whatever length it has
(a *dynamic* window); each window query's attention is multiplied by the number of keys it can see minus one, which
undoes the dilution of the softmax over a longer prefix (``normalize``); votes are averaged over the window and over
the query heads of each KV head; the window is kept; kept keys are re-rotated to their positions within the cache
(``rerotate``, kvpress's default), exactly, by the core.

Where the question is: kvpress inserts a delimiter token between context and question. Here:

- ``window=None`` (default): the question is a prefill pass that follows held tokens. Prefill the context inside
  ``cache.paused()`` (nothing evicted), then the question: that pass's tokens are the window and the pass compresses
  the whole cache (``seen x (1 - ratio)`` tokens kept, question included), as kvpress does in one pass;
- ``window=N``: the last ``N`` queries of each prefill pass (SnapKV's fixed window, e.g. for a chunked prefill).

At decoding steps that evict (a token budget) the window is the one new query.

Simplifications: kvpress's optional per-chunk selection (``chunk_length``) is not implemented; the paper's iterative
chunk-by-chunk processing with the prompt appended to each chunk is kvpress's single-pass version here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest, causal_allowed
from ..errors import KVSieveError
from . import register
from .base import Method, Observation, hp, recent_mask

VOTES = "finch_votes"
WINDOW = "finch_window"


@register
@dataclass
class Finch(Method):
    """Score = normalised attention of the question's queries (mean over window and GQA group); question kept.

    window: None for the dynamic window (the question pass after a paused context), or a fixed number of last
    queries. normalize: scale each query's attention by its visible keys minus one (kvpress: True). rerotate: keys
    re-indexed within the cache (kvpress: True).
    """

    window: int | None = hp(None, ge=1)
    normalize: bool = True
    rerotate: bool = True

    name = "finch"
    paper = "Corallo & Papotti 2024, arXiv:2408.00167"
    needs = "attention of the question's queries"
    simplifications = (
        "the question is the prefill pass after a paused context (or a fixed window); single pass as kvpress (no "
        "chunk-by-chunk prompt re-reading); no per-chunk selection; at decoding steps the window is the new query"
    )

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return AttentionRequest(last=1) if evicting else None  # decoding steps; prefill votes come from observe

    def window_of(self, obs: Observation) -> int | None:
        """Queries of this pass that vote: the fixed window, or the whole pass when it follows held tokens."""
        if self.window is not None:
            return min(self.window, obs.n_new)
        return obs.n_new if obs.seen > obs.n_new else None

    def observe(self, obs: Observation) -> None:
        if obs.n_new == 1:
            return
        w = self.window_of(obs)
        obs.layer_state[(WINDOW, obs.head_start)] = w
        if w is not None:
            obs.state[VOTES] = window_votes(obs.queries, obs.keys, obs.scaling, obs.valid, w, self.normalize)

    def score(self, obs: Observation) -> torch.Tensor:
        if obs.n_new == 1:
            votes, w = obs.attention_per_kv_head(), 1
        else:
            w = obs.layer_state.get((WINDOW, obs.head_start))
            if w is None:
                raise KVSieveError(
                    "finch's window is the question: prefill the context inside `with cache.paused():`, then the "
                    "question as its own pass (it compresses), or give a fixed window, e.g. finch(window=32)"
                )
            votes = obs.state[VOTES]
        return votes.masked_fill(recent_mask(obs.positions, w), float("inf"))


def window_votes(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, valid: torch.Tensor | None, w: int, normalize: bool
) -> torch.Tensor:
    """FINCH's votes ``(B, h, T)``: attention of the last ``w`` queries, each scaled by its visible keys minus one,
    averaged over the window and the query heads of each KV head."""
    b, hq, q, d = queries.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    qw = queries[:, :, q - w :].to(torch.float32).reshape(b, h, g * w, d)
    logits = (qw @ keys.to(torch.float32).transpose(-1, -2)).view(b, h, g, w, t) * scaling
    allowed = causal_allowed(q, t, valid, rows=slice(q - w, q), device=keys.device)  # (B|1, h|1, w, T)
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    if normalize:
        visible = allowed.sum(dim=-1).to(torch.float32) - 1.0  # (B|1, h|1, w): a query's index in kvpress
        probs = probs * visible[:, :, None, :, None]
    return probs.mean(dim=(2, 3))
