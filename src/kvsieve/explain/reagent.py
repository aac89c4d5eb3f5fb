"""ReAGent (Zhao & Shan 2024, arXiv:2402.00794): recursive attribution by replacing tokens with a language model's
predictions.

Per target token and for ``num_probes`` independent probes: importance logits start random; each iteration
replaces a random ``replacing_ratio`` of the context tokens by a replacer LM's predictions and measures
``delta = p(target | original) - p(target | replaced)``; replaced tokens gain ``logit(0.5 + delta / 2)`` and kept
ones lose it, so tokens whose replacement hurts the target rise. A probe stops once keeping only its
``rational_size`` most important tokens (the rest replaced) puts the target back among the model's ``top_k``
predictions; the importance is the softmax of the logits, averaged over the probes that stopped. The defaults are
ReAGent's and inseq's (rational size 5, top-3 stopping, 30% replaced, 8 probes, at most 3,000 iterations).

Simplifications: the paper (and inseq's port) draw replacements from RoBERTa, a masked LM that sees both sides of
a token, or (inseq) uniformly among tokens of the same part of speech; here a causal LM proposes each replacement
from the *original* left context (one forward pass of the replacer per target token): the explained model itself by
default, or any model with the same vocabulary (``replacer=``). The original token is never drawn, and the first
token (which has no left context) is replaced by a uniformly drawn token. Seeded: the same seed gives the same
scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from .problem import Problem


@dataclass
class ReagentConfig:
    rational_size: int = 5
    top_k: int = 3
    replacing_ratio: float = 0.3
    num_probes: int = 8
    max_steps: int = 3000


@torch.no_grad()
def _proposals(replacer: torch.nn.Module, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Replacement distributions ``(n, vocab)`` for each position of ``ids`` ``(1, n)`` (the original token
    excluded)."""
    logits = replacer(input_ids=ids, use_cache=False).logits[0, :, :vocab].float()
    probs = torch.empty(ids.shape[1], vocab)
    probs[0] = 1.0 / vocab
    probs[1:] = logits[:-1].softmax(-1)
    probs[torch.arange(ids.shape[1]), ids[0]] = 0.0
    return probs / probs.sum(-1, keepdim=True)


@torch.no_grad()
def reagent(
    problem: Problem, replacer: torch.nn.Module | None = None, config: ReagentConfig | None = None
) -> tuple[torch.Tensor, dict]:
    """ReAGent scores ``(n_steps, width)`` and per-step diagnostics (iterations, probes that stopped)."""
    cfg = config or ReagentConfig()
    model = problem.model
    vocab = model.get_output_embeddings().weight.shape[0]
    replacer = replacer if replacer is not None else model
    r_vocab = replacer.get_output_embeddings().weight.shape[0]
    if r_vocab < vocab:
        raise KVSieveError(
            f"the replacer model has {r_vocab} output tokens, fewer than the explained model's {vocab}: it must share "
            "the tokenizer; pass a replacer of the same family, or none (the explained model replaces)"
        )
    out = problem.empty_scores()
    info = []
    for t in range(problem.n_steps):
        n = problem.n_prompt + t
        context = problem.ids[:, :n]
        target = int(problem.targets[t])
        gen = torch.Generator().manual_seed(problem.seed * 100_003 + t)
        proposals = _proposals(replacer, context, vocab)
        p_orig = model(input_ids=context, use_cache=False, logits_to_keep=1).logits[0, -1].float().softmax(-1)[target]
        b = cfg.num_probes
        logit_imp = torch.rand((b, n), generator=gen, dtype=torch.float64)
        stopped = torch.zeros(b, dtype=torch.bool)
        steps = 0
        keep_n = min(cfg.rational_size, n)
        while steps < cfg.max_steps:
            steps += 1
            sampled = torch.multinomial(proposals, b, replacement=True, generator=gen).T  # (b, n)
            replace = torch.rand((b, n), generator=gen) < cfg.replacing_ratio
            probe = torch.where(replace, sampled, context.expand(b, n))
            # the stopping check: keep each probe's current top tokens, replace the others
            importance = logit_imp.softmax(-1)
            top = importance.topk(keep_n, dim=-1).indices
            keep = torch.zeros((b, n), dtype=torch.bool).scatter_(1, top, True)
            sampled_stop = torch.multinomial(proposals, b, replacement=True, generator=gen).T
            rational = torch.where(keep, context.expand(b, n), sampled_stop)
            logits = model(input_ids=torch.cat([probe, rational]), use_cache=False, logits_to_keep=1).logits[:, -1]
            logits = logits.float()
            p_rep = logits[:b].softmax(-1)[:, target]
            delta = (p_orig - p_rep).double()[:, None]
            delta_score = torch.where(replace, delta, -delta)
            update = logit_imp + torch.logit((delta_score * 0.5 + 0.5).clamp(1e-6, 1 - 1e-6))
            logit_imp = torch.where(stopped[:, None], logit_imp, update)
            # ReAGent checks the stopping condition with the importance after this update
            importance = logit_imp.softmax(-1)
            top = importance.topk(keep_n, dim=-1).indices
            keep_now = torch.zeros((b, n), dtype=torch.bool).scatter_(1, top, True)
            if torch.equal(keep_now, keep):
                hit = (logits[b:].topk(cfg.top_k, dim=-1).indices == target).any(dim=-1)
            else:
                rational = torch.where(keep_now, context.expand(b, n), sampled_stop)
                again = model(input_ids=rational, use_cache=False, logits_to_keep=1).logits[:, -1].float()
                hit = (again.topk(cfg.top_k, dim=-1).indices == target).any(dim=-1)
            stopped |= hit
            if bool(stopped.all()):
                break
        final = logit_imp.softmax(-1)
        rows = final[stopped] if bool(stopped.any()) else final
        out[t, :n] = rows.mean(dim=0)
        info.append({"iterations": steps, "stopped_probes": int(stopped.sum()), "probes": b})
    return out, {"steps": info}
