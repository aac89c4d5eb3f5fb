"""``autopasta``: the model names the key sentence of its context, then attention in profiled heads is steered to it.

Zhang et al., "Model Tells Itself Where to Attend: Faithfulness Meets Automatic Attention Steering" (AutoPASTA,
2024, arXiv:2409.10790), on PASTA (Zhang et al. 2023, arXiv:2311.02262). Two stages:

1. **the model names the key sentence**: asked to copy the sentence of the context that answers the question
   (:func:`key_sentence`), its output is matched to the most similar context sentence (word overlap), whose tokens
   become the highlighted span (:func:`highlight`, stored in the cache's run state);
2. **PASTA steering**: in the profiled heads, the attention every query gives to the prompt tokens *outside* the
   span is multiplied by ``alpha`` and each row renormalised, i.e. ``log(alpha)`` is added to those logits
   (:meth:`Method.logit_bias`, as the other calibrations). ``alpha=1`` changes nothing (bitwise ``full``).

Heads: ``profile=`` a file written by :func:`profile_heads` (PASTA's head profiling on a small calibration set: each
layer steered alone, then each head of the best layers; the heads whose steering raises the log-probability of the
correct answer most are kept, ``n_heads`` of them), or ``heads=`` as for the other calibrations.

Simplifications: the calibration set is small (the bench's ``qa`` samples, the gold fact as the highlighted span)
and profiling scores heads by the answer's log-probability, not by task accuracy; matching the model's sentence to
the context is by word overlap; without a highlighted span (nothing called :func:`highlight` for this cache)
nothing is steered and the method is ``full`` (the bench cannot run stage 1; ``benchmarks/steering.py`` runs both).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import KVSieveError
from . import register
from .base import Observation, hp
from .families import Calibration

SHARED_KEY = "autopasta"
PROFILE_FORMAT = "kvsieve-autopasta-profile"
ASK = (
    "{context}\n\n{question}\nBefore answering, copy the one sentence of the text above that contains the answer, "
    "word for word. Sentence:"
)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def highlight(cache, spans: list[tuple[int, int]], prompt_tokens: int) -> None:
    """Steer toward the token ranges ``spans`` (``[start, end)`` stream positions) of a prompt of ``prompt_tokens``
    tokens: tokens of the prompt outside them are down-weighted; later (generated) tokens are not."""
    spans = [(int(a), int(b)) for a, b in spans]
    if not spans or any(not 0 <= a < b <= prompt_tokens for a, b in spans):
        raise KVSieveError(
            f"autopasta spans must be non-empty [start, end) ranges within the prompt of {prompt_tokens} tokens; got "
            f"{spans}"
        )
    cache.shared[SHARED_KEY] = {"spans": spans, "limit": int(prompt_tokens)}


def sentences(text: str) -> list[tuple[int, int]]:
    """Character ranges of the sentences of ``text`` (split at . ! ? and line breaks)."""
    return [(m.start(), m.end()) for m in _SENTENCE.finditer(text) if m.group().strip()]


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def best_sentence(context: str, named: str) -> tuple[int, int]:
    """The context sentence sharing the most words with ``named`` (ties: the earlier one), as a character range."""
    want = _words(named)
    best = max(sentences(context), key=lambda s: (len(want & _words(context[s[0] : s[1]])), -s[0]))
    return best


@torch.no_grad()
def key_sentence(
    model, tokenizer, context: str, question: str, max_new_tokens: int = 48
) -> tuple[str, tuple[int, int]]:
    """Stage 1: the model copies the sentence that answers ``question``; returns its words and the matched context
    sentence's character range."""
    text = ASK.format(context=context.rstrip(), question=question.strip())
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    named = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return named, best_sentence(context, named)


def token_span(tokenizer, prompt: str, char_span: tuple[int, int]) -> tuple[int, int]:
    """Token range ``[start, end)`` of ``prompt`` covering the characters ``char_span``."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > char_span[0] and a < char_span[1]]
    if not inside:
        raise KVSieveError(f"characters {char_span} of the prompt hold no token; pass a span inside the prompt")
    return inside[0], inside[-1] + 1


def load_heads(path: str | Path, n_heads: int) -> list[str]:
    """The ``n_heads`` best heads (``"layer.head"``) of an autopasta profile file."""
    p = Path(path)
    if not p.is_file():
        raise KVSieveError(
            f"autopasta profile {p} does not exist; write one with kvsieve.methods.autopasta.profile_heads(...) "
            "(see benchmarks/steering.py --profile)"
        )
    try:
        data = json.loads(p.read_text())
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError("format")
        heads = [h for h, gain in data["heads"] if gain > 0][:n_heads]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KVSieveError(
            f"{p} is not an autopasta profile ({PROFILE_FORMAT}); write one with profile_heads"
        ) from None
    if not heads:
        raise KVSieveError(f"autopasta profile {p} lists no head whose steering helped; profile on more samples")
    return heads


@register
@dataclass
class AutoPasta(Calibration):
    """PASTA's attention steering toward the highlighted span, in profiled heads (see the module docstring).

    alpha: in (0, 1]; the factor on the attention to non-highlighted prompt tokens (1 changes nothing).
    profile: a head profile from :func:`profile_heads` (its best ``n_heads`` heads are steered); None uses ``heads``.
    """

    alpha: float = hp(0.01, gt=0.0, le=1.0)
    profile: str | None = None
    n_heads: int = hp(8, ge=1)

    name: ClassVar[str] = "autopasta"
    family: ClassVar[str] = "calibration"
    paper: ClassVar[str] = "Zhang et al. 2024, arXiv:2409.10790 (PASTA: arXiv:2311.02262)"
    needs: ClassVar[str] = "a highlighted span per prompt (the model names it), head profile"
    simplifications: ClassVar[str] = (
        "heads profiled on a small qa calibration set by the answer's log-probability (not task accuracy); the "
        "model's sentence is matched to the context by word overlap; without a highlight (set by "
        "autopasta.highlight) nothing is steered"
    )

    def validate(self) -> None:
        super().validate()
        if self.profile is not None:
            self._profiled = load_heads(self.profile, self.n_heads)

    def selected_heads(self, obs: Observation) -> torch.Tensor:
        if self.profile is None:
            return super().selected_heads(obs)
        hq = obs.queries.shape[1]
        first = obs.head_start * obs.group_size
        chosen = torch.zeros(hq, dtype=torch.bool, device=obs.queries.device)
        for entry in self._profiled:
            layer, head = (int(x) for x in entry.split("."))
            if layer == obs.layer_idx and first <= head < first + hq:
                chosen[head - first] = True
        return chosen

    def calibration_bias(self, obs: Observation) -> torch.Tensor | None:
        setup = obs.shared.get(SHARED_KEY)
        if self.alpha == 1.0 or setup is None:
            return None
        chosen = self.selected_heads(obs)
        if not bool(chosen.any()):
            return None
        pos = obs.positions  # (B, h, T)
        inside = torch.zeros_like(pos, dtype=torch.bool)
        for a, b in setup["spans"]:
            inside |= (pos >= a) & (pos < b)
        damp = (pos >= 0) & (pos < setup["limit"]) & ~inside
        mask = damp.repeat_interleave(obs.group_size, dim=1) & chosen[None, :, None]  # (B, Hq, T)
        bias = mask.to(torch.float32) * math.log(self.alpha)
        b, hq, t = bias.shape
        return bias[:, :, None, :].expand(b, hq, obs.n_new, t)


# --- head profiling -----------------------------------------------------------------------------------------------
@torch.no_grad()
def _answer_logprob(model, ids: torch.Tensor, n_answer: int, heads: list[str] | str, span, alpha: float) -> float:
    """log p(answer | prompt) (the last ``n_answer`` tokens of ``ids``), steering ``heads`` toward ``span``."""
    from ..compat import cache_kwargs
    from ..sieve import Sieve

    n_prompt = ids.shape[1] - n_answer
    with Sieve(AutoPasta(alpha=alpha, heads=heads)).attach(model) as cache:
        highlight(cache, [span], n_prompt)
        logits = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits[0].float()
    logp = logits[n_prompt - 1 : -1].log_softmax(-1).gather(-1, ids[0, n_prompt:, None])
    return float(logp.sum())


def profile_heads(
    model, samples: list[tuple[torch.Tensor, int, tuple[int, int]]], out: str | Path, alpha: float = 0.01,
    top_layers: int = 4, meta: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """PASTA's head profiling, coarse to fine, written to ``out`` (JSON).

    ``samples``: ``(ids, n_answer, span)`` with ``ids`` ``(1, n)`` the prompt followed by the correct answer's
    ``n_answer`` tokens and ``span`` the highlighted token range. Each layer is steered alone (all its heads), then
    each head of the ``top_layers`` layers that gain most; a head's gain is the mean rise of log p(answer).
    """
    text = model.config.get_text_config()
    n_layers, n_heads = text.num_hidden_layers, text.num_attention_heads
    base = [_answer_logprob(model, ids, n, "all", span, 1.0) for ids, n, span in samples]

    def gain(heads: list[str]) -> float:
        got = [_answer_logprob(model, ids, n, heads, span, alpha) for ids, n, span in samples]
        return sum(g - b for g, b in zip(got, base, strict=True)) / len(samples)

    layers = {layer: gain([str(layer)]) for layer in range(n_layers)}
    best = sorted(layers, key=lambda layer: -layers[layer])[:top_layers]
    heads = sorted(
        ((f"{layer}.{h}", gain([f"{layer}.{h}"])) for layer in best for h in range(n_heads)), key=lambda x: -x[1]
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": PROFILE_FORMAT, "version": 1, "alpha": alpha, "samples": len(samples), "meta": meta or {},
        "layers": {str(k): round(v, 6) for k, v in layers.items()}, "heads": [[h, round(g, 6)] for h, g in heads],
    }  # fmt: skip
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
