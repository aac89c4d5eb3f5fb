"""``tidaldecode``: position-persistent sparse attention, tokens chosen by a few token-selection layers.

Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention" (ICLR 2025).
The tokens that attention favours overlap strongly between consecutive layers, so only a few *token-selection
layers* choose them. At each decoding step: the first ``dense_layers`` layers (2 in the paper) attend to every token;
the next layer attends to every token and selects the top ``budget - 1`` tokens by attention score; every later layer
attends only to those tokens (plus the new one), except the *re-selection layer* mid-depth, which again attends to
everything and selects anew for the layers after it (the paper's best choice for Llama-3-8B is layer 13 of 32).
Where a selection layer is a sliding-window layer (Gemma 3), which kvsieve leaves to transformers, the next
full-attention layer selects instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .base import Observation, top_slots
from .families import SelectiveMethod, remap_by_position

SHARED = "tidaldecode"


def group_attention(obs: Observation, stop: int) -> torch.Tensor:
    """Attention probabilities of the decoding query over held tokens ``[0, stop)``, summed over each KV head's
    query-head group: ``(B, h, stop)``. Padding gets -inf.

    The softmax runs over all ``T`` held tokens (the distribution the layer's attention uses), then is cut to
    ``[0, stop)``.
    """
    b, h, _, d = obs.keys.shape
    q = obs.queries[:, :, -1].view(b, h, -1, d)  # (B, h, g, D)
    logits = (q @ obs.keys.transpose(-1, -2)).to(torch.float32) * obs.scaling  # (B, h, g, T), keys read once
    if obs.valid is not None:
        allowed = obs.valid.clone()
        allowed[..., -1] = True
        logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    probs = logits.softmax(dim=-1).sum(dim=2)[..., :stop]
    if obs.valid is not None:
        probs = probs.masked_fill(~obs.valid[..., :stop], float("-inf"))
    return probs


@register
@dataclass
class TidalDecode(SelectiveMethod):
    """Full attention in a few token-selection layers; every other layer reads only the tokens they chose.

    dense_layers: layers ``0 .. dense_layers - 1`` attend to everything (paper: 2); layer ``dense_layers`` is the
    first token-selection layer. reselect_layer: the mid-depth re-selection layer; None takes
    ``round(13 / 32 * n_layers)`` (the paper's layer 13 of 32, layer 12 of SmolLM2's 30); -1 disables re-selection.

    Simplifications: GQA (the paper's models are mostly multi-head): each KV head reads its own top tokens, ranked
    by the attention probabilities of its query heads summed; the selection layer computes those scores in a second
    pass over the keys (the paper fuses it with the attention kernel); no KV-cache correction (the paper's optional
    periodic refill of sparsely decoded tokens). Composed with eviction, later layers find the chosen tokens by
    position among the tokens they still hold, and fill slots of tokens they evicted with their most recent others.
    """

    dense_layers: int = 2
    reselect_layer: int | None = None

    name = "tidaldecode"
    paper = "Yang et al. 2024, arXiv:2410.05076"
    needs = "attention of the decoding query in the selection layers"
    simplifications = (
        "GQA: each KV head reads its own top tokens by its query heads' summed probabilities; the selection layer "
        "computes those scores in a second pass over the keys; no KV-cache correction; composed with eviction, later "
        "layers find the chosen tokens by position"
    )

    def validate(self) -> None:
        super().validate()
        if self.dense_layers < 0:
            raise KVSieveError(f"tidaldecode: dense_layers must be >= 0, got {self.dense_layers}")
        if self.reselect_layer is not None and self.reselect_layer != -1 and self.reselect_layer <= self.dense_layers:
            raise KVSieveError(
                f"tidaldecode: reselect_layer ({self.reselect_layer}) must come after the first selection layer "
                f"(layer {self.dense_layers}); use -1 for no re-selection"
            )

    def selection_layers(self, n_layers: int) -> tuple[int, ...]:
        """Indices of the token-selection layers of a model with ``n_layers`` layers."""
        again = round(13 / 32 * n_layers) if self.reselect_layer is None else self.reselect_layer
        layers = [self.dense_layers]
        if again > self.dense_layers and again < n_layers:
            layers.append(again)
        return tuple(layer for layer in layers if layer < n_layers)

    def reads(self, obs: Observation) -> torch.Tensor | None:
        if obs.layer_idx < self.dense_layers:
            return None
        h, t = obs.keys.shape[1], obs.keys.shape[2]
        budget = obs.read_budget
        step = obs.positions[:, 0, -1].clone()  # the newest token's position identifies this decoding step
        shared = obs.shared.setdefault(SHARED, {})
        if shared.get("step") is None or not torch.equal(shared["step"], step):
            shared.clear()  # a new decoding step (positions only grow): no selection yet
        # The layer selects if it is the first one at or after a selection layer (a selection layer may be a
        # sliding-window layer, which kvsieve does not handle) or another segment of the layer that is selecting.
        due = max(s for s in self.selection_layers(obs.n_layers) if s <= obs.layer_idx)
        made_at = shared.get("made_at")
        if made_at is None or made_at < due or made_at == obs.layer_idx:
            shared.update(step=step, made_at=obs.layer_idx)
            if budget >= t:
                return None
            order = top_slots(group_attention(obs, t - 1), budget - 1)  # (B, h, budget - 1), best first
            heads = shared.setdefault("heads", {})
            for i in range(h):  # per KV head, so a later layer split into per-head segments finds its own
                heads[obs.head_start + i] = (order[:, i], obs.positions[:, i].gather(-1, order[:, i]), t)
            return None  # a selection layer attends to every token
        if budget >= t:
            return None
        heads = shared.get("heads", {})
        picked = [heads.get(obs.head_start + i) for i in range(h)]
        if any(p is None for p in picked):
            return None
        if self.inner is None and all(p[2] == t for p in picked):  # same held tokens as the selection layer
            return torch.stack([p[0][:, : budget - 1] for p in picked], dim=1)
        k0 = min(p[1].shape[-1] for p in picked)  # heads held different numbers of tokens (head-wise eviction)
        wanted = torch.stack([p[1][:, :k0] for p in picked], dim=1)
        newest = torch.zeros(1, 1, t, dtype=torch.bool, device=obs.keys.device)
        newest[..., -1] = True
        return remap_by_position(wanted[..., : budget - 1], obs.positions, obs.valid, newest, budget)
