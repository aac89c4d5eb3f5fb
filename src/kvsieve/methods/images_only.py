"""``images_only``: a cache method's eviction restricted to image tokens on vision-language prompts.

On a VLM most of the prompt is image tokens, and the cache-compression literature for VLMs often compresses those
alone, keeping the text (the system prompt, the question) whole. This wrapper ranks every text token above every
image token, keeping the wrapped method's order within each modality, so the budget is spent on image tokens first:
text tokens are evicted only when the budget is smaller than the text. The tokens' modality comes from the tags the
sequence action point records for each stream position (:func:`kvsieve.sequence.stream_modality`); on a prompt
without images (or a text model) the wrapped method runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sequence import MODALITY, stream_modality
from . import register
from .base import Observation, Wrapper


@register
@dataclass
class ImagesOnly(Wrapper):
    """Wraps an evicting method ``inner``: its scores, with every text token ranked above every image/video token."""

    name = "images_only"
    family = "modality"
    paper = "kvsieve (image-token-only compression, as in the VLM cache-compression literature)"
    needs = "the wrapped method's needs; the tokens' modality tags"
    simplifications = (
        "text tokens rank above image tokens by a shift of the scores (the wrapped method's order is kept within "
        "each modality); tokens the wrapped method always keeps (infinite scores, e.g. snapkv's window) stay on top; "
        "when the budget is below the number of text tokens, text is evicted too"
    )
    default_inner = "snapkv"
    own_kind = "evict"

    def score(self, obs: Observation) -> torch.Tensor:
        scores = self._in.score(obs)
        modality = stream_modality(obs)
        if modality is None:
            return scores
        text = (modality == MODALITY["text"]).to(scores.device)
        finite = scores.masked_fill(~torch.isfinite(scores), 0.0)
        lift = (finite.amax() - finite.amin()).abs() + 1.0
        return torch.where(text, scores + lift, scores)
