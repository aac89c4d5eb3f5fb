"""Gradient attributions of the target token's probability to the input embeddings: ``saliency``,
``input_x_gradient``, ``integrated_gradients``.

They follow inseq's defaults (which run Captum's implementations), so that ``benchmarks/vs_inseq.py`` can compare
the scores one to one: the attributed function is the target token's softmax probability, the gradient is taken
with respect to the input embeddings (``model.get_input_embeddings()``), and a token's score is the L2 norm of its
embedding-sized attribution vector (inseq's ``vnorm`` aggregation; inseq's default view then also divides each step's
scores by their sum, which changes no ranking). Integrated gradients uses Gauss-Legendre quadrature over ``n_steps``
points (Captum's default method) and, by default, a zero-embedding baseline (Captum's default). inseq's default
baseline differs: the embedding of the tokenizer's UNK token at every position except EOS tokens, which keep their
own; pass ``baseline=`` (the baseline's embeddings) to reproduce it, as ``benchmarks/vs_inseq.py`` does.

The model is causal, so one forward pass over prompt + target serves every step: the probability of target ``t``
depends only on the tokens before it, and its gradient is taken with one backward pass of that position alone.
"""

from __future__ import annotations

import numpy as np
import torch

from .problem import Problem, check_gradients


def _embeds(problem: Problem) -> torch.Tensor:
    return problem.model.get_input_embeddings()(problem.ids).detach()


def _step_probs(problem: Problem, embeds: torch.Tensor) -> torch.Tensor:
    """p(target_t) ``(B, n_steps)`` for a batch of embedded sequences (same tokens, other embeddings)."""
    logits = problem.model(inputs_embeds=embeds, use_cache=False).logits[:, problem.n_prompt - 1 : -1].float()
    probs = logits.softmax(-1)
    index = problem.targets[None, :, None].expand(embeds.shape[0], -1, 1)
    return probs.gather(-1, index)[..., 0]


def _per_step_grads(problem: Problem, embeds: torch.Tensor) -> torch.Tensor:
    """Gradients ``(n_steps, B, N, D)`` of each step's target probability (summed over the batch rows, which are
    independent) with respect to ``embeds`` ``(B, N, D)``."""
    embeds = embeds.clone().requires_grad_(True)
    with torch.enable_grad():
        probs = _step_probs(problem, embeds)
        grads = []
        for t in range(problem.n_steps):
            (g,) = torch.autograd.grad(probs[:, t].sum(), embeds, retain_graph=t < problem.n_steps - 1)
            grads.append(g)
    return torch.stack(grads)


def _to_scores(problem: Problem, per_token: torch.Tensor) -> torch.Tensor:
    """``(n_steps, N, D)`` attribution vectors -> ``(n_steps, width)`` L2 norms, NaN beyond each step's context."""
    out = problem.empty_scores()
    norms = per_token.float().norm(dim=-1).double()
    for t in range(problem.n_steps):
        n = problem.n_prompt + t
        out[t, :n] = norms[t, :n]
    return out


def saliency(problem: Problem) -> torch.Tensor:
    """|d p(target) / d embedding|, as an L2 norm per token (Simonyan et al. 2014)."""
    check_gradients(problem.model, "saliency")
    grads = _per_step_grads(problem, _embeds(problem))[:, 0]
    return _to_scores(problem, grads)


def input_x_gradient(problem: Problem) -> torch.Tensor:
    """embedding x gradient, as an L2 norm per token (Shrikumar et al. 2016)."""
    check_gradients(problem.model, "input_x_gradient")
    embeds = _embeds(problem)
    grads = _per_step_grads(problem, embeds)[:, 0]
    return _to_scores(problem, grads * embeds[0])


def integrated_gradients(
    problem: Problem, n_steps: int = 50, batch: int = 10, baseline: torch.Tensor | None = None
) -> torch.Tensor:
    """(embedding - baseline) x the path integral of the gradient from the baseline to the embedding (Sundararajan
    et al. 2017), with Gauss-Legendre quadrature over ``n_steps`` points; an L2 norm per token. ``baseline``: the
    baseline's embeddings ``(N, D)`` (one row per token of prompt + target); zeros when None."""
    check_gradients(problem.model, "integrated_gradients")
    embeds = _embeds(problem)
    base = torch.zeros_like(embeds) if baseline is None else baseline.detach().to(embeds.dtype).reshape(embeds.shape)
    delta = embeds - base
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    alphas = torch.tensor(0.5 * (nodes + 1.0), dtype=embeds.dtype)
    w = torch.tensor(0.5 * weights, dtype=torch.float64)
    total = torch.zeros((problem.n_steps, *embeds.shape[1:]), dtype=torch.float64)
    for start in range(0, n_steps, batch):
        a = alphas[start : start + batch]
        grads = _per_step_grads(problem, base + a[:, None, None] * delta)  # (S, b, N, D)
        total += (grads.double() * w[start : start + batch, None, None]).sum(dim=1)
    return _to_scores(problem, total * delta[0].double())
