"""``duoattention``: full KV cache for retrieval heads, attention sinks plus recent tokens for streaming heads.

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads" (2024). Heads
fall into two kinds: *retrieval heads*, which must see the whole context, keep every token; *streaming heads* keep
only the first ``n_sink`` tokens (attention sinks) and a window of recent ones. The paper picks the retrieval heads
by optimising a gate per head on synthetic passkey data; this implementation picks them from *diagnosed* retrieval
scores instead (see Simplifications). Storage is per KV head, so each head's memory is really what it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .base import hp
from .families import HeadwiseRetention


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

    ratio: float = hp(0.25, ge=0.0, le=1.0)

    name = "duoattention"
    simplifications = (
        "retrieval heads chosen from diagnosed retrieval scores (top `ratio` 0.25 of the KV heads), not by the paper's "
        "gate optimisation; streaming heads keep `n_sink` sinks + the sieve's budget of recent tokens; no per-head-type"
        " prefill or kernel, so the gain is memory (per head, real), not speed"
    )
    paper = "Xiao et al. 2024, arXiv:2410.10819"
