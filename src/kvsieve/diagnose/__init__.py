"""``kvsieve diagnose``: where a model's attention goes, in numbers (JSON) and pictures (a self-contained HTML page).

- :func:`diagnose` (one forward pass, statistics computed chunk by chunk): sinks on token 0 and the first k tokens,
  hidden sinks beyond token 0, locality, entropy, heavy-hitter concentration, active vs dormant heads, massive
  activations, pooled attention maps;
- :func:`retrieval_scores`: the copy-paste retrieval score of every head on needle tasks (Wu et al. 2024);
- :class:`HeadProfile`: saved retrieval scores that the head-level methods (``razorattention``, ``duoattention``)
  read; one ships for the embedded smollm2-135m.

Submodules load on first use (the method registry imports :mod:`kvsieve.diagnose.profile` while it initialises).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DIAGNOSIS_FILE": "diagnosis",
    "STAT_TITLES": "diagnosis",
    "diagnose": "diagnosis",
    "head_profile_from": "diagnosis",
    "write_json": "diagnosis",
    "HeadProfile": "profile",
    "ProfileError": "profile",
    "load_profile": "profile",
    "shipped_profile_path": "profile",
    "ArgmaxTracer": "retrieval",
    "RetrievalResult": "retrieval",
    "masked_heads": "retrieval",
    "retrieval_scores": "retrieval",
    "sample_retrieval": "retrieval",
    "HEAD_STATS": "stats",
    "AttentionProfiler": "stats",
    "StatsConfig": "stats",
    "massive_activations": "stats",
    "write_report": "report",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvsieve.diagnose' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_EXPORTS)
