"""``duoattention``: full KV cache for retrieval heads, attention sinks plus recent tokens for streaming heads.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads" (2024). Heads
fall into two kinds: *retrieval heads*, which must see the whole context, keep every token; *streaming heads* keep
only the first ``n_sink`` tokens (attention sinks) and a window of recent ones. The paper picks the retrieval heads
by optimising a gate per head on synthetic passkey data; this implementation picks them from *diagnosed* retrieval
scores instead (see Simplifications). Storage is per KV head, so each head's memory is really what it keeps.

The module also holds :class:`HeadwiseRetention`, the policy shared with ``razorattention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diagnose.profile import HeadProfile, load_profile
from ..errors import KVSieveError
from . import register
from .base import Method, Observation, check_sinks_fit


@dataclass
class HeadwiseRetention(Method):
    """Retrieval KV heads keep every token; the others keep ``n_sink`` sinks and the most recent tokens.

    The sieve's budget (``budget=N`` or ``compression=r``) is what each *streaming* head holds; retrieval heads hold
    everything, so the bytes held are ``share x full + (1 - share) x budget``, measured from the per-head tensors.
    Retrieval heads are the ``round(ratio x layers x KV heads)`` KV heads with the highest diagnosed retrieval scores
    across the whole model; with GQA a KV head's score is the maximum over the query heads that share it.

    profile: path of a head profile JSON (``kvsieve diagnose ... --task niah_single_number`` writes one); None uses
    the profile shipped for the embedded smollm2-135m. ratio: share of KV heads kept in full. n_sink: sink tokens.
    """

    profile: str | None = None
    ratio: float = 0.5
    n_sink: int = 4

    family = "head-wise"
    needs = "head profile (diagnosed retrieval scores), positions"
    extra_slots = 0  # tokens a streaming head keeps besides sinks and the recent window (razorattention: 1)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise KVSieveError(f"ratio is the share of KV heads kept in full and must be in [0, 1], got {self.ratio}")
        if int(self.n_sink) != self.n_sink or self.n_sink < 0:
            raise KVSieveError(f"n_sink must be a whole number >= 0, got {self.n_sink!r}")
        self._profile: HeadProfile = load_profile(self.profile)
        self._retrieval: torch.Tensor = self._profile.top_kv_heads(float(self.ratio))  # (L, H_kv) bool

    def check_budget(self, tokens: int) -> None:
        check_sinks_fit(tokens, self.n_sink + self.extra_slots, self.name)

    def retrieval_heads(self, obs: Observation) -> torch.Tensor:
        """``(h,)`` bool: which KV heads of this segment are retrieval heads (checks the profile fits the model)."""
        h = obs.keys.shape[1]
        prof = self._profile
        if (
            obs.n_layers != prof.n_layers
            or obs.group_size != prof.group
            or obs.keys.shape[-1] != prof.head_dim
            or obs.head_start + h > prof.n_kv_heads
            or (obs.head_start == 0 and h > 1 and h != prof.n_kv_heads)
        ):
            n_kv = h if obs.head_start == 0 and h > 1 else obs.head_start + h
            prof.check(obs.n_layers, n_kv, obs.group_size, obs.keys.shape[-1])
        return self._retrieval[obs.layer_idx, obs.head_start : obs.head_start + h].to(obs.keys.device)

    def score(self, obs: Observation) -> torch.Tensor:
        """+inf for every token of a retrieval head and for sinks; otherwise the position (newer is higher)."""
        check_sinks_fit(obs.budget, self.n_sink + self.extra_slots, self.name)
        retrieval = self.retrieval_heads(obs)
        scores = obs.positions.to(torch.float32)
        scores = scores.masked_fill(obs.positions < self.n_sink, float("inf"))
        return scores.masked_fill(retrieval[None, :, None], float("inf"))

    def select(self, scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
        """A head whose scores are all infinite (a retrieval head) keeps every token; others their top ``budget``.

        One multi-head segment whose heads keep different numbers of tokens comes back as one ``(B, 1, k_h)`` tensor
        per head, which splits the layer into per-head storage.
        """
        out = []
        for s in scores:
            heads = [_keep_head(s[:, h], budget) for h in range(s.shape[1])]
            same = len({i.shape[-1] for i in heads}) == 1
            if same:
                out.append(torch.cat(heads, dim=1))
            elif len(scores) == 1:
                return heads
            else:
                raise KVSieveError(f"{self.name} cannot split one of several multi-head segments")
        return out


def _keep_head(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices ``(B, 1, k)`` (sorted) kept by one head with scores ``(B, T)``."""
    b, t = scores.shape
    if not bool(torch.isfinite(scores).any()):
        return torch.arange(t, device=scores.device).expand(b, 1, t)
    return scores.topk(min(budget, t), dim=-1).indices.sort(dim=-1).values[:, None, :]


@register
@dataclass
class DuoAttention(HeadwiseRetention):
    """DuoAttention with retrieval heads chosen from diagnosed retrieval scores (top ``ratio`` of KV heads).

    Simplifications: the paper learns a gate per head by optimisation on synthetic passkey data (distillation
    against full attention) and thresholds it; here the retrieval heads are instead the KV heads with the highest
    diagnosed copy-paste retrieval scores (Wu et al. 2024; ``kvsieve diagnose --task``), ``ratio`` of them across the
    model (default 0.25, the paper's MHA setting; on SmolLM2 only 26 of 90 KV heads score above 0, so the paper's
    GQA setting of one half would fill up with heads of score 0, picked by index). Streaming heads keep ``n_sink``
    sinks plus the recent window given by the sieve's budget (the paper: 64 sinks + 256 recent at 100k-token scale);
    prefill is not chunked per head type and there is no custom kernel, so the saving is memory (per head, real),
    not speed.
    """

    ratio: float = 0.25

    name = "duoattention"
    paper = "Xiao et al. 2024, arXiv:2410.10819"
