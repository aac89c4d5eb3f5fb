"""Retrieval heads: the copy-paste score of Wu et al. 2024, and masking heads for the causal test.

Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality" (arXiv:2404.15574). While the model
generates the answer to a needle-in-a-haystack question, a head *hits* at a decoding step when its highest attention
(argmax over the context) falls on a needle token that equals the token being generated; its retrieval score on a
sample is hits / needle length. Here the needle is the answer value's tokens in the context (the RULER-style tasks of
:mod:`kvsieve.tasks` hide ``"... for {key} is: {value}."`` and ask for the value), so a head that copies every answer
token scores 1. Scores are averaged over samples, per layer and *query* head.

The argmax is read by a non-evicting method (:class:`ArgmaxTracer`) from the last query of every forward pass, so
no attention matrix is materialised: during decoding that is one query row against the keys.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compat import cache_kwargs
from ..errors import KVSieveError
from ..generation import prefill
from ..methods.base import Method, Observation
from ..sieve import Sieve
from ..tasks import Sample, Task, get_task
from .stats import check_heads, decoder_layers


class ArgmaxTracer(Method):
    """Keeps every token; records, per layer, where each query head's last query attends most: ``(Hq,)`` positions."""

    name = "diagnose-argmax"
    family = "analysis"
    own_kind = "keep-all"

    def __init__(self) -> None:
        self.argmax: dict[int, torch.Tensor] = {}

    def spec(self) -> str:
        return self.name

    @torch.no_grad()
    def observe(self, obs: Observation) -> None:
        b, hq, _, d = obs.queries.shape
        h = obs.keys.shape[1]
        g = hq // h
        q = obs.queries[:, :, -1].to(torch.float32).reshape(b, h, g, d)
        logits = q @ obs.keys.to(torch.float32).transpose(-1, -2)  # (B, h, g, T); the last query sees every key
        if obs.valid is not None:
            logits = logits.masked_fill(~obs.valid[:, :, None, :], float("-inf"))
        idx = logits.argmax(dim=-1)  # (B, h, g)
        pos = obs.positions.gather(2, idx.reshape(b, h, g))  # original positions
        prev = self.argmax.get(obs.layer_idx)
        part = pos.reshape(b, h * g)[0]
        if obs.head_start == 0 or prev is None:
            self.argmax[obs.layer_idx] = part
        else:  # per-head segments: append in head order
            self.argmax[obs.layer_idx] = torch.cat([prev, part])


def chat_prompt(tokenizer: Any, sample: Sample) -> str:
    """``context + question`` in the chat template (when the tokenizer has one), then the answer prefix."""
    user = sample.context + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = user + "\n"
    return text + sample.answer_prefix


def needle_span(tokenizer: Any, text: str, value: str) -> tuple[torch.Tensor, list[int]]:
    """Token ids of ``text`` and the token indices covering the (last) occurrence of ``value`` before the question.

    The answer value occurs once in a needle task's context (the tasks check it); the prefix and question never
    contain it.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.rfind(value)
    if start < 0:
        raise KVSieveError(f"the answer {value!r} does not occur in the prompt; is this a needle task?")
    end = start + len(value)
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return torch.tensor([enc["input_ids"]]), span


@dataclass
class RetrievalResult:
    """Retrieval scores ``(L, Hq)`` averaged over samples, with what the model answered."""

    scores: torch.Tensor
    task: str
    length: int
    samples: int
    seed: int
    accuracy: float
    predictions: list[str] = field(default_factory=list)
    per_sample_hits: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "length": self.length,
            "samples": self.samples,
            "seed": self.seed,
            "accuracy": self.accuracy,
            "predictions": self.predictions,
            "seconds": round(self.seconds, 2),
            "scores": [[round(float(x), 5) for x in row] for row in self.scores],
        }


@torch.no_grad()
def sample_retrieval(
    model: torch.nn.Module, tokenizer: Any, sample: Sample, max_new_tokens: int | None = None
) -> tuple[torch.Tensor, str, int]:
    """One sample's per-head retrieval score ``(L, Hq)``, the generated text and the total hits."""
    if len(sample.answers) != 1:
        raise KVSieveError(f"retrieval scores need a single-answer needle task; {sample.task} has several answers")
    text = chat_prompt(tokenizer, sample)
    input_ids, span = needle_span(tokenizer, text, sample.answers[0])
    ids = input_ids[0]
    span_set = torch.tensor(span)
    cfg = model.config.get_text_config()
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    hits = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    tracer = ArgmaxTracer()
    eos = set(_as_list(getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id))
    steps = max_new_tokens or min(sample.max_new_tokens, len(span) + 8)
    new_ids: list[int] = []
    with Sieve(tracer).attach(model) as cache:
        logits = prefill(model, input_ids.to(model.device), cache)
        for _ in range(steps):
            token = int(logits[0].argmax())
            new_ids.append(token)
            for layer, pos in tracer.argmax.items():
                pos = pos.cpu()
                in_needle = torch.isin(pos, span_set)
                same = ids[pos.clamp(max=len(ids) - 1)] == token
                hits[layer] += (in_needle & same & (pos < len(ids))).to(torch.float64)
            if token in eos or len(new_ids) == steps:
                break
            step = torch.tensor([[token]], device=model.device)
            out = model(input_ids=step, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            logits = out.logits[:, -1]
    return hits / max(len(span), 1), tokenizer.decode(new_ids, skip_special_tokens=True), int(hits.sum())


def retrieval_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str | Task = "niah_single_number",
    *,
    length: int = 1000,
    samples: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> RetrievalResult:
    """Wu et al.'s retrieval score per layer and query head, averaged over ``samples`` needle samples."""
    task_obj = get_task(task) if isinstance(task, str) else task
    drawn = task_obj.generate(tokenizer, length=length, n=samples, seed=seed)
    t0 = time.perf_counter()
    total, preds, per_hits, correct = None, [], [], 0.0
    for i, sample in enumerate(drawn):
        score, pred, n_hits = sample_retrieval(model, tokenizer, sample)
        total = score if total is None else total + score
        preds.append(pred)
        per_hits.append(n_hits)
        correct += task_obj.score(sample, pred)
        if progress:
            print(f"  retrieval sample {i + 1}/{len(drawn)}: {task_obj.score(sample, pred):.0f} {pred!r}", flush=True)
    if total is None:
        raise KVSieveError("retrieval scores need at least one sample")
    return RetrievalResult(
        scores=total / len(drawn),
        task=task_obj.name,
        length=length,
        samples=len(drawn),
        seed=seed,
        accuracy=correct / len(drawn),
        predictions=preds,
        per_sample_hits=per_hits,
        seconds=time.perf_counter() - t0,
    )


@contextmanager
def masked_heads(model: torch.nn.Module, heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Zero the attention output of query heads ``(layer, head)`` (a pre-hook on ``o_proj``); removed on exit."""
    cfg = model.config.get_text_config()
    n_heads = cfg.num_attention_heads
    heads = list(heads)
    check_heads(heads, cfg.num_hidden_layers, n_heads)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)
    layers = decoder_layers(model)
    handles = []

    def pre_hook_for(chosen: Sequence[int]):
        index = torch.tensor(sorted(set(chosen)))

        def pre_hook(module, args):
            x = args[0]
            shaped = x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads).clone()
            shaped[..., index.to(x.device), :] = 0
            return (shaped.view_as(x), *args[1:])

        return pre_hook

    try:
        for layer, chosen in by_layer.items():
            handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook_for(chosen)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [int(x)]
