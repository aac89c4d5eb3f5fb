"""Steering, measured: ``pine`` against position bias on multi-document QA, ``autopasta`` on the bench's QA task.

Usage:
    python benchmarks/steering.py pine [--samples 10] [--docs 5] [--length 1000]
    python benchmarks/steering.py profile [--samples 8] [--out autopasta-profile.json]
    python benchmarks/steering.py autopasta --profile autopasta-profile.json [--samples 20] [--length 1000]

``pine``: ``multidoc_qa`` samples with the answer document at every position (the same ``--samples`` facts and
documents at each position: sample i at position k), answered greedily by ``full`` and by ``full`` with
``prefill="pine"`` (document token spans from :func:`kvsieve.tasks.multidoc.document_token_spans`). Prints accuracy
per position and the spread (max - min) for both; PINE should shrink the spread.

``profile``: PASTA's head profiling (:func:`kvsieve.methods.autopasta.profile_heads`) on ``qa`` samples of another
seed, the gold fact as the highlighted span; writes the profile file.

``autopasta``: on ``qa`` (and ``--tasks``), ``full`` vs AutoPASTA: the model first names the key sentence
(:func:`~kvsieve.methods.autopasta.key_sentence`), then answers with attention steered to it in the profiled heads.
Also reports how often the named sentence is the gold fact's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kvsieve import Sieve, load_model
from kvsieve.compat import cache_kwargs
from kvsieve.methods.autopasta import highlight, key_sentence, profile_heads, token_span
from kvsieve.methods.pine import set_segments
from kvsieve.tasks import get_task
from kvsieve.tasks.multidoc import MultiDocQATask, document_token_spans


def chat(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def answer(model, tokenizer, ids: torch.Tensor, sieve: Sieve, setup=None, max_new_tokens: int = 16) -> str:
    """Greedy answer under ``sieve``; ``setup(cache)`` runs before the prefill (segments, highlights)."""
    with sieve.attach(model) as cache:
        if setup is not None:
            setup(cache)
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        tokens = []
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if int(nxt) == tokenizer.eos_token_id:
                break
            tokens.append(int(nxt))
            out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache))
    return tokenizer.decode(tokens, skip_special_tokens=True)


def run_pine(model, tok, args) -> None:
    task = MultiDocQATask(n_documents=args.docs)
    scores = {"full": [[] for _ in range(args.docs)], "pine": [[] for _ in range(args.docs)]}
    for k in range(args.docs):
        depth = 100.0 * k / (args.docs - 1)
        for s in task.generate(tok, args.length, args.samples, args.seed, depth=depth):
            head = chat(tok, s.prompt)
            at = head.index(s.context)
            text = head + s.answer_prefix
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            spans = document_token_spans(tok, text, at, s)
            for name, prefill, setup in (
                ("full", None, None),
                ("pine", "pine", lambda cache, spans=spans: set_segments(cache, model, spans)),
            ):
                pred = answer(model, tok, ids, Sieve("full", prefill=prefill), setup)
                scores[name][k].append(task.score(s, pred))
        print(f"position {k + 1}: full {statistics.fmean(scores['full'][k]):.2f}, "
              f"pine {statistics.fmean(scores['pine'][k]):.2f}", flush=True)  # fmt: skip
    print(f"\nmultidoc_qa, {args.docs} documents, {args.length} tokens, {args.samples} samples per position")
    print(f"{'method':8s}" + "".join(f"  pos {k + 1}" for k in range(args.docs)) + "   mean  spread")
    for name, per in scores.items():
        acc = [statistics.fmean(x) for x in per]
        print(f"{name:8s}" + "".join(f"  {a:5.2f}" for a in acc)
              + f"  {statistics.fmean(acc):5.2f}  {max(acc) - min(acc):6.2f}")  # fmt: skip


def qa_parts(tok, s) -> tuple[str, int]:
    """The chat prompt plus answer prefix, and where the context starts in it."""
    head = chat(tok, s.prompt)
    return head + s.answer_prefix, head.index(s.context)


def run_profile(model, tok, args) -> None:
    task = get_task("qa")
    samples = []
    for s in task.generate(tok, args.length, args.samples, args.seed + 1000):
        text, at = qa_parts(tok, s)
        fact_at = s.context.index(s.meta["fact"])
        span = token_span(tok, text, (at + fact_at, at + fact_at + len(s.meta["fact"])))
        ids = tok(text + " " + s.answers[0], return_tensors="pt", add_special_tokens=False).input_ids
        n_answer = ids.shape[1] - tok(text, return_tensors="pt", add_special_tokens=False).input_ids.shape[1]
        samples.append((ids, n_answer, span))
    path = profile_heads(model, samples, args.out, alpha=args.alpha, meta={"task": "qa", "seed": args.seed + 1000})
    print(f"wrote {path}")


def run_autopasta(model, tok, args) -> None:
    spec = f"autopasta(alpha={args.alpha}, profile={args.profile!r}, n_heads={args.n_heads})"
    for name in args.tasks.split(","):
        task = get_task(name)
        full, steered, found = [], [], []
        for s in task.generate(tok, args.length, args.samples, args.seed):
            text, at = qa_parts(tok, s)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            full.append(task.score(s, answer(model, tok, ids, Sieve("full"))))
            _, (a, b) = key_sentence(model, tok, s.context, s.question)
            found.append(float(any(x.lower() in s.context[a:b].lower() for x in s.answers)))
            span = token_span(tok, text, (at + a, at + b))
            pred = answer(
                model, tok, ids, Sieve(spec), lambda cache, span=span, n=ids.shape[1]: highlight(cache, [span], n)
            )
            steered.append(task.score(s, pred))
        print(f"{name}: full {statistics.fmean(full):.3f}, autopasta {statistics.fmean(steered):.3f} "
              f"({len(full)} samples, {args.length} tokens); key sentence holds the answer in "
              f"{statistics.fmean(found):.0%}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["pine", "profile", "autopasta"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--docs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--profile", default="autopasta-profile.json")
    p.add_argument("--out", default="autopasta-profile.json")
    p.add_argument("--tasks", default="qa")
    args = p.parse_args()
    model, tok = load_model(args.model)
    {"pine": run_pine, "profile": run_profile, "autopasta": run_autopasta}[args.what](model, tok, args)


if __name__ == "__main__":
    main()
