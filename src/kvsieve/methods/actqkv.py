"""``actqkv``: an activation-aware probe query retrieves the KV pairs each decoding step reads; each layer reads as
many as its information density needs.

Xiao et al., "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs Inference" (2025,
arXiv:2502.13542). The cache is kept whole (the paper's KV store); at each decoding step a *probe query* built from
the queries of the current window retrieves the KV pairs the step attends to. The probe is not the window's plain
mean query (InfLLM's): each query is weighted by its *Activation Bias*, how far it lies from the window's mean, so
the anchor tokens of the window dominate. At decoding, a *dynamic KV cut-off* guided by each layer's information
density sets how many pairs the layer reads: few where the probe's attention is concentrated, more where it spreads.

Here, per query head: the window is the last ``window`` queries seen (the prompt's last ones, then the decoded ones,
sliding); activation bias ``b_i = ||q_i - mean(q)||_2``; probe ``= sum_i b_i q_i / sum_i b_i`` (the plain mean when
every bias is 0). Each held token's relevance is the probe's attention on it (softmax over the held keys, mean over
the GQA group); a layer reads the first ``n_init`` and last ``n_local`` tokens, plus the fewest most relevant tokens
whose relevance sums to ``density`` of the total in every head (the cut-off), at most the read budget.

Simplifications: only the abstract and secondary summaries of the paper were available here: the bias as the L2
distance of a query to the window mean, the weighting by the bias, and the cut-off as a cumulative attention mass
(``density``) are this implementation's reading of them. The whole cache stays on the device (the paper offloads it);
retrieval is per token (the paper, on InfLLM, retrieves blocks) and dense tensor ops read every key at each step;
batch size 1 (the cut-off is per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BudgetError
from . import register
from .base import Observation, hp
from .families import SelectiveMethod, edge_mask


@register
@dataclass
class ActQKV(SelectiveMethod):
    """Reads, per decoding step, the tokens an activation-bias-weighted probe query needs up to a ``density`` cut-off.

    window: queries the probe is built from (sliding over decoding; 32). density: share of the probe's attention mass
    a layer's reads must cover (0.9; 1.0 reads the whole read budget). n_init / n_local: first and most recent tokens
    always read (4 / 16).
    """

    window: int = hp(32, ge=1)
    density: float = hp(0.9, gt=0.0, le=1.0)
    n_init: int = hp(4, ge=0)
    n_local: int = hp(16, ge=1)

    name = "actqkv"
    batch = "single"  # the cut-off is per sequence: rows of a batch would read different numbers of tokens
    paper = "Xiao et al. 2025, arXiv:2502.13542"
    needs = "queries and keys at decode time (a window of recent queries per layer)"
    simplifications = (
        "from the abstract: activation bias = L2 distance of a query to its window's mean, probe = bias-weighted mean "
        "query, cut-off = fewest tokens covering `density` of the probe's attention per layer (at most the read "
        "budget); per-token retrieval (the paper: InfLLM blocks); cache kept on the device; batch size 1"
    )

    def validate(self) -> None:
        super().validate()
        if isinstance(self.read_budget, int) and self.read_budget < self.n_init + self.n_local + 1:
            raise BudgetError(self._too_small(self.read_budget))

    def _too_small(self, budget: int) -> str:
        return (
            f"actqkv reads {self.n_init} initial + {self.n_local} local tokens besides the retrieved ones: a read "
            f"budget of {budget} leaves nothing to retrieve; use at least {self.n_init + self.n_local + 1} tokens or "
            "lower n_init/n_local"
        )

    def observe(self, obs: Observation) -> None:
        """Slide this segment's window of queries: ``(B, Hq_segment, <= window, D)``."""
        state = self._state(obs, "window")
        new = obs.queries[:, :, -self.window :].to(torch.float32)
        old = state.get("queries")
        if old is not None and old.shape[:2] == new.shape[:2]:
            new = torch.cat([old, new], dim=2)[:, :, -self.window :]
        state["queries"] = new
        super().observe(obs)  # the wrapped evicting method's own statistics

    def reads(self, obs: Observation) -> torch.Tensor | None:
        t = obs.keys.shape[2]
        budget = obs.read_budget
        if budget is None or budget >= t:
            return None
        k_sel = budget - self.n_init - self.n_local
        if k_sel < 1:
            raise BudgetError(self._too_small(budget))
        window = obs.queries.to(torch.float32)  # this step's query joins the window (observe runs after the reads)
        seen = self._state(obs, "window").get("queries")
        if seen is not None and seen.shape[:2] == window.shape[:2]:
            window = torch.cat([seen, window], dim=2)[:, :, -self.window :]
        forced = edge_mask(obs.positions, obs.valid, self.n_init, self.n_local)
        n_forced = int(forced.sum(dim=-1).max())
        fixed = forced.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :n_forced]
        relevance = probe_attention(probe_query(window), obs.keys, obs.scaling, obs.valid)  # (B, h, T)
        relevance = relevance.masked_fill(forced, -1.0)
        if obs.valid is not None:
            relevance = relevance.masked_fill(~obs.valid, -1.0)
        k = min(k_sel, cutoff(relevance.clamp(min=0.0), self.density))
        order = relevance.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.cat([fixed, order], dim=-1)


def probe_query(window: torch.Tensor) -> torch.Tensor:
    """``(B, Hq, D)``: the window's queries ``(B, Hq, w, D)`` weighted by their activation bias (distance to mean)."""
    bias = (window - window.mean(dim=2, keepdim=True)).norm(dim=-1)  # (B, Hq, w)
    total = bias.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, bias / total.clamp(min=1e-12), torch.full_like(bias, 1.0 / bias.shape[-1]))
    return (weights[..., None] * window).sum(dim=2)


def probe_attention(
    probe: torch.Tensor, keys: torch.Tensor, scaling: float, valid: torch.Tensor | None
) -> torch.Tensor:
    """The probe's attention on the held keys ``(B, h, T, D)``, mean over each KV head's query heads: ``(B, h, T)``."""
    b, h, _, d = keys.shape
    g = probe.shape[1] // h
    logits = probe.view(b, h, g, 1, d) @ keys.to(torch.float32)[:, :, None].transpose(-1, -2) * scaling  # (B,h,g,1,T)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)[:, :, :, 0].mean(dim=2)


def cutoff(relevance: torch.Tensor, density: float) -> int:
    """The fewest top tokens whose relevance ``(B, h, T)`` covers ``density`` of each row's total, in every row."""
    ranked = relevance.sort(dim=-1, descending=True).values
    mass = ranked.cumsum(dim=-1)
    total = mass[..., -1:]
    need = (mass < density * total - 1e-12).sum(dim=-1) + 1  # tokens until the mass is reached
    return int(need.max())
