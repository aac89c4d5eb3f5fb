"""What an attribution explains: a prompt, a target continuation, and the model that reads them.

Every attribution method scores, for each target token ``t`` (a *step*), every token of its context: the prompt and
the target tokens before ``t``. The context of step ``t`` is ``ids[:n_prompt + t]`` and its target token
``ids[n_prompt + t]``. Scores come back as one ``(n_steps, n_prompt + n_steps - 1)`` tensor whose row ``t`` is
defined on the first ``n_prompt + t`` columns (the rest is NaN).

Checks done here, before any heavy work: an empty or untokenizable target, a prompt (plus target) beyond the
model's window, and an attribution that needs gradients on a model that cannot give them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ContextLengthError, KVSieveError


@dataclass
class Problem:
    """A tokenized prompt plus target, shared by every attribution method (with the tensors they share)."""

    model: torch.nn.Module
    tokenizer: Any
    ids: torch.Tensor  # (1, n_prompt + n_steps): the prompt, then the target
    n_prompt: int
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_steps(self) -> int:
        return int(self.ids.shape[1]) - self.n_prompt

    @property
    def width(self) -> int:
        """Columns of a score matrix: the longest context (the last step's)."""
        return int(self.ids.shape[1]) - 1

    @property
    def targets(self) -> torch.Tensor:
        return self.ids[0, self.n_prompt :]

    def query_position(self, step: int) -> int:
        """The position whose output predicts target ``step``."""
        return self.n_prompt + step - 1

    def empty_scores(self) -> torch.Tensor:
        return torch.full((self.n_steps, self.width), float("nan"), dtype=torch.float64)

    def tokens(self) -> list[str]:
        """Every token of prompt and target as text (byte-level pieces decoded one by one)."""
        return [self.tokenizer.decode([int(i)]) for i in self.ids[0]]

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Logits ``(N, vocab)`` of the whole sequence (one forward pass, cached)."""
        if "logits" not in self._cache:
            self._cache["logits"] = self.model(input_ids=self.ids, use_cache=False).logits[0].float()
        return self._cache["logits"]

    def target_probs(self) -> torch.Tensor:
        """p(target_t | context_t) for every step ``(n_steps,)``."""
        logits = self.logits()[self.n_prompt - 1 : -1]
        return logits.softmax(-1).gather(-1, self.targets[:, None])[:, 0]


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """The target continuation's token ids; KVSieveError when it is empty or cannot be tokenized faithfully."""
    if not isinstance(target, str) or not target.strip():
        raise KVSieveError("the target is empty; pass the continuation to explain (e.g. --target ' Paris'), or omit it")
    ids = tokenizer(target, add_special_tokens=False).input_ids
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise KVSieveError(
            f"the target {target!r} cannot be tokenized by this model's tokenizer (unknown characters); pass text the "
            "tokenizer can encode, or omit --target to explain the model's own continuation"
        )
    return list(ids)


def check_window(model: torch.nn.Module, n_tokens: int) -> None:
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if window is not None and n_tokens > window:
        raise ContextLengthError(
            f"the prompt and target are {n_tokens} tokens, beyond the model's window of {window}; shorten the prompt "
            f"to at most {window} tokens including the target"
        )


def check_gradients(model: torch.nn.Module, method: str) -> None:
    """KVSieveError unless autograd can reach the input embeddings of ``model``."""
    if torch.is_inference_mode_enabled():
        raise KVSieveError(
            f"{method} needs gradients, but it runs under torch.inference_mode(); call explain outside that block, or "
            "choose a gradient-free method (reagent, attention_rollout, ...)"
        )
    weight = model.get_input_embeddings().weight
    if weight.is_inference():
        raise KVSieveError(
            f"{method} needs gradients, but the model was loaded under torch.inference_mode() (its weights are "
            "inference tensors); load it without inference mode, or choose a gradient-free method (reagent, ...)"
        )
    if not weight.dtype.is_floating_point:
        raise KVSieveError(
            f"{method} needs gradients, but the model's embeddings are {weight.dtype} (quantised); load it in float "
            "precision, or choose a gradient-free method (reagent, attention_rollout, ...)"
        )
