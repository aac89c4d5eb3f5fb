"""``streaming_llm``: attention sinks plus a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024). Keeps the first ``n_sink``
tokens (the sinks) and the most recent ones. As in the paper, positions are re-indexed within the cache (keys are
re-rotated), so the model can stream far past its window; ``rerotate=False`` keeps original positions instead
(kvpress's StreamingLLMPress), which cannot run past the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, check_sinks_fit, hp


@register
@dataclass
class StreamingLLM(Method):
    """Score = +inf for the first ``n_sink`` tokens of the stream, else the token's position (newer is higher).

    n_sink: number of initial tokens always kept (the paper uses 4; 0 gives a plain recent window).
    rerotate: positions within the cache (the paper) rather than original positions.
    """

    n_sink: int = hp(4, ge=0)
    rerotate: bool = True

    name = "streaming_llm"
    paper = "Xiao et al. 2024, arXiv:2309.17453"
    needs = "positions"
    simplifications = (
        "none: sinks + recent window, distances re-indexed within the cache as in the paper (keys stored at stream "
        "positions, each rotated by the evictions after it: only the sinks move); `rerotate=False` keeps original "
        "positions, as kvpress's press; refuses models with sliding-window layers when re-rotating"
    )

    def check_budget(self, tokens: int) -> None:
        check_sinks_fit(tokens, self.n_sink, self.name)

    def score(self, obs: Observation) -> torch.Tensor:
        check_sinks_fit(obs.budget, self.n_sink, self.name)
        scores = obs.positions.to(torch.float32)
        return scores.masked_fill(obs.positions < self.n_sink, float("inf"))
