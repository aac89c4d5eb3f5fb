"""``kvgrad``: KVzip's repeat passes, each KV pair scored by input x gradient of the final hidden states.

KVgrad (OpenReview, https://openreview.net/forum?id=cg1wTCJjjk); kvpress's ``KVgradPress``. Like ``kvzip`` the
context is prefilled in full, then the model is prompted to repeat it chunk by chunk (the same prompts); during each
repeat pass the score of context KV pair ``c`` of layer ``l`` is

    S_{l,c} = max_{p, query head} A^l_{p,c} x ||v^l_c W_O^l||_2 x ||d Phi / d a^l_p||_2,

``A`` the attention of repeat token ``p`` on ``c`` (the repeat queries attend to the first ``n_sink`` tokens, the chunk
being reconstructed and themselves, causally, as in KVzip), ``||v W_O||`` the norm of what the pair writes into the
residual stream (per query head) and ``a^l_p`` the attention output of layer ``l`` at ``p``, whose gradient measures
how much the objective ``Phi = sum_p ||h^L_p||^2`` (``h^L`` the last decoder layer's output, before the final norm)
depends on it. So ``A x ||v W_O||`` is what the pair contributes to ``a_p`` and the gradient norm how much ``a_p``
matters. The sinks are always kept; budgets, selection and decoding as ``kvzip`` (top scores across all layers and
heads by default).

How it runs: from :func:`kvsieve.prefill` (``post_prefill``). Each repeat pass runs through the kvsieve cache with
autograd on (parameters frozen for the pass, the prompt's embeddings the only leaf that requires grad, so no weight
gradient is computed), followed by one backward pass; the pass is then rolled back. Gradients flow through the repeat
tokens' own keys and values (as in kvpress, where the context KV pairs are read-only and the repeat ones are not).
Cost: about three to four prefills (kvpress says the same); peak memory holds one repeat pass's activations for
backward, so ``chunk`` (512, kvpress's) bounds it.

Refused with a KVSieveError before any work (at the first layer of the prefill): ``torch.inference_mode()`` (tensors
made there can never be part of a backward pass) and quantised weights (no float ``o_proj.weight``; a model whose
config names a quantisation is refused when the repeat passes start).

Simplifications: as ``kvzip`` (the whole context is reconstructed, kvpress leaves the chat template's prefix unscored;
decoding-time tokens rank above context tokens, oldest first; per-layer shares rounded per head; batch size 1); the
attention logits use the model's attention scaling (kvpress: 1/sqrt(head_dim), equal for Llama/Qwen).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .base import Observation, hp
from .kvzip import FIRST, LATER, OVERLAP, KVzip, _per_query_head_norms

PASS = "kvgrad_pass"  # in cache.shared while a repeat pass runs: the chunk and the per-layer captures
ROWS = 256  # repeat queries per block when computing attention: memory O(ROWS x keys) per head


@register
@dataclass
class KVgrad(KVzip):
    """Score = max over repeat tokens and query heads of attention x ||v W_O|| x ||grad of Phi at the attention out||.

    chunk: context tokens per repeat pass (512, kvpress's). n_sink: first tokens always kept (4). layerwise: keep
    the same share in every layer (False: top scores across all layers, kvpress's default).
    """

    chunk: int = hp(512, ge=1)

    name = "kvgrad"
    paper = "KVgrad, OpenReview cg1wTCJjjk (kvpress KVgradPress)"
    needs = "repeat passes with a backward pass after the prefill (kvsieve.prefill); gradients"
    simplifications = (
        "as kvzip: whole context reconstructed (kvpress skips the template prefix), decoding-time tokens rank above "
        "context tokens, per-layer shares rounded per head, batch size 1; model's attention scaling"
    )

    def after_prefill(self, model: torch.nn.Module, cache, input_ids: torch.Tensor, tokenizer) -> None:
        """Score every held context token by repeat passes with a backward pass each, then compress once."""
        from ..compat import cache_kwargs
        from ..reconstruction import repeat_prompts, will_evict
        from ..sequence import decoder_layers

        if not will_evict(self, cache, input_ids):  # nothing to evict (e.g. compression 0): no repeat passes
            return
        n = input_ids.shape[1]
        check_gradients(model)
        layers = decoder_layers(model)
        if not layers:
            raise KVSieveError(f"{self.name} found no decoder layers in {type(model).__name__}")
        last = max(layers, key=lambda item: item[0])[1]
        scores: dict = {}
        embed = model.get_input_embeddings()
        for start, prompt in repeat_prompts(input_ids[0], self.chunk, tokenizer, FIRST, LATER, OVERLAP):
            stop = min(n, start + self.chunk)
            run = {"start": start, "stop": stop, "attention": {}, "outputs": {}, "final": None}
            mark = cache.checkpoint()
            cache.shared[PASS] = run
            hooks = [last.register_forward_hook(_capture_final(run))]
            hooks += [layer.self_attn.register_forward_hook(_capture_output(run)) for _, layer in layers]
            try:
                with torch.enable_grad(), frozen(model), cache.paused():
                    embeds = embed(prompt[None].to(input_ids.device)).detach().requires_grad_(True)
                    model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
                    objective = run["final"].to(torch.float32).square().sum()  # Phi = sum_p ||h^L_p||^2
                    captured = sorted(run["attention"])
                    outputs = [run["outputs"][i] for i in captured]
                    grads = torch.autograd.grad(objective, outputs, allow_unused=True)
            finally:
                for hook in hooks:
                    hook.remove()
                cache.shared.pop(PASS, None)
            cache.restore(mark)  # the repeat is never kept
            detach_storage(cache)
            for layer_idx, grad in zip(captured, grads, strict=True):
                for head_start, weighted in run["attention"][layer_idx].items():
                    if grad is None:  # the layer's output does not reach Phi: nothing it keeps matters to it
                        grad_norm = torch.zeros(weighted.shape[0], weighted.shape[3], device=weighted.device)
                    else:
                        grad_norm = grad.detach().to(torch.float32).norm(dim=-1)  # (B, q)
                    best = (weighted * grad_norm[:, None, None, :, None]).amax(dim=(2, 3))  # (B, h, chunk)
                    total = scores.get((layer_idx, head_start))
                    if total is None:
                        total = torch.zeros(*best.shape[:2], n, dtype=torch.float32, device=best.device)
                        scores[(layer_idx, head_start)] = total
                    total[..., start:stop] = best
        self.compress_scored(model, cache, scores)

    def observe(self, obs: Observation) -> None:
        """During a repeat pass: ``A x ||v W_O||`` of the chunk's pairs, per query head and repeat token."""
        run = obs.shared.get(PASS)
        if run is None:  # the prefill: refuse at its first layer, before the work, what cannot take gradients
            if torch.is_inference_mode_enabled():
                raise KVSieveError(_INFERENCE_MODE)
            weight = getattr(getattr(obs.module, "o_proj", None), "weight", None)
            if obs.module is not None and (weight is None or not weight.dtype.is_floating_point):
                raise KVSieveError(_QUANTISED)
            return
        with torch.no_grad():
            q = obs.n_new
            t = obs.keys.shape[2]
            ctx = t - q
            if not torch.equal(obs.positions[0, 0, :ctx], torch.arange(ctx, device=obs.positions.device)):
                raise KVSieveError(f"{self.name} reconstructs a context held in order; prefill it with kvsieve.prefill")
            start, stop = run["start"], run["stop"]
            sink = min(self.n_sink, start)
            cols = torch.cat([torch.arange(sink), torch.arange(start, stop), torch.arange(ctx, t)]).to(obs.keys.device)
            keys = obs.keys[:, :, cols].detach().to(torch.float32)
            b, h, _, d = keys.shape
            g = obs.group_size
            n_cols, width = cols.numel(), stop - start
            probs = torch.empty(b, h, g, q, width, dtype=torch.float32, device=keys.device)
            for r0 in range(0, q, ROWS):
                r1 = min(q, r0 + ROWS)
                query = obs.queries[:, :, r0:r1].detach().to(torch.float32).reshape(b, h, g, r1 - r0, d)
                logits = (query @ keys[:, :, None].transpose(-1, -2)) * obs.scaling  # (B, h, g, r, cols)
                future = torch.ones(r1 - r0, q, dtype=torch.bool, device=keys.device).triu(r0 + 1)
                logits[..., n_cols - q :] = logits[..., n_cols - q :].masked_fill(future, float("-inf"))
                probs[:, :, :, r0:r1] = logits.softmax(dim=-1)[..., sink : sink + width]
            value_norm = _per_query_head_norms(obs, obs.values[:, :, start:stop].detach())  # (B, h, g, chunk)
            run["attention"].setdefault(obs.layer_idx, {})[obs.head_start] = probs * value_norm[:, :, :, None, :]


_INFERENCE_MODE = (
    "kvgrad needs gradients, but it runs under torch.inference_mode(), whose tensors can never take part in a "
    "backward pass; run it under torch.no_grad() instead (kvsieve.prefill and the bench do), or use kvzip"
)


_QUANTISED = (
    "kvgrad needs gradients through the model, but its weights are quantised; load it in float precision, or use "
    "kvzip (no gradients)"
)


def check_gradients(model: torch.nn.Module) -> None:
    """KVSieveError unless a backward pass through ``model`` is possible (one line, with the fix)."""
    if torch.is_inference_mode_enabled():
        raise KVSieveError(_INFERENCE_MODE)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise KVSieveError(_QUANTISED)
    weight = model.get_input_embeddings().weight
    if weight.is_inference():
        raise KVSieveError(
            "kvgrad needs gradients, but the model was loaded under torch.inference_mode() (its weights are inference "
            "tensors); load it outside inference mode, or use kvzip"
        )
    if not weight.dtype.is_floating_point:
        raise KVSieveError(f"kvgrad needs gradients, but the model's embeddings are {weight.dtype}; load it in float")


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No weight gradients during the pass (only activations' gradients are needed); restored on exit."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def detach_storage(cache) -> None:
    """The repeat pass wrote tensors that require grad into the storage buffers in place, which gives the buffers an
    autograd history; after the rollback, drop it so later passes do not extend it."""
    for layer in cache.sieve_layers():
        for seg in layer.segments:
            for attr in ("_k", "_v"):
                buf = getattr(seg, attr, None)
                if isinstance(buf, torch.Tensor) and buf.requires_grad:
                    setattr(seg, attr, buf.detach())


def _capture_final(run: dict):
    def hook(module, args, output):
        run["final"] = output[0] if isinstance(output, tuple) else output

    return hook


def _capture_output(run: dict):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        run["outputs"][int(module.layer_idx)] = out

    return hook
