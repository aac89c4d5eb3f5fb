"""Retrieval heads of a model (Wu et al. 2024) and the causal test: mask them, or as many random heads, and measure.

1. Detection: the copy-paste retrieval score of every query head while the model answers ``--samples`` needle
   samples (``kvsieve.diagnose.retrieval_scores``).
2. Causal test: needle accuracy on ``--eval-samples`` *other* samples (another seed) with (a) no head masked, (b)
   the top ``--top-k`` retrieval heads masked (attention output zeroed), (c) ``--top-k`` random heads masked, for
   ``--random-draws`` seeded draws among the remaining heads. Printed side by side.
3. ``--write-profile [PATH]``: save the scores as the head profile the head-level methods read (default: the one
   shipped in the package for the embedded model).

    python benchmarks/retrieval_heads.py --write-profile
    python benchmarks/retrieval_heads.py --model smollm2-135m --task niah_single_number --length 1000 --samples 8
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from kvsieve.diagnose.profile import HeadProfile, shipped_profile_path
from kvsieve.diagnose.retrieval import chat_prompt, masked_heads, retrieval_scores
from kvsieve.models import load_model, model_label
from kvsieve.tasks import get_task


@torch.no_grad()
def needle_accuracy(model, tokenizer, task, samples, heads=(), max_new_tokens: int = 16) -> tuple[float, list[str]]:
    """Greedy answers with ``heads`` masked; mean task score and the predictions."""
    scores, preds = [], []
    eos = tokenizer.eos_token_id
    with masked_heads(model, heads):
        for sample in samples:
            ids = tokenizer(chat_prompt(tokenizer, sample), return_tensors="pt", add_special_tokens=False).input_ids
            out = model.generate(
                ids.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            pred = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            preds.append(pred)
            scores.append(task.score(sample, pred))
    return sum(scores) / len(scores), preds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="niah_single_number")
    p.add_argument("--length", type=int, default=1000, help="tokens of context + question per sample")
    p.add_argument("--samples", type=int, default=8, help="needle samples for detection")
    p.add_argument("--seed", type=int, default=0, help="seed of the detection samples")
    p.add_argument("--top-k", type=int, default=10, help="retrieval heads masked in the causal test")
    p.add_argument("--random-draws", type=int, default=3, help="random head sets of the same size")
    p.add_argument("--eval-samples", type=int, default=10, help="needle samples for the causal test (0: skip it)")
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the causal-test samples (not the detection's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument(
        "--write-profile",
        nargs="?",
        const=str(shipped_profile_path()),
        default=None,
        metavar="PATH",
        help="write the head profile (default: the one shipped for smollm2-135m)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/retrieval_heads.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    model, tokenizer = load_model(args.model)
    cfg = model.config.get_text_config()
    task = get_task(args.task)
    print(
        f"model {model_label(args.model)}: {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} query heads "
        f"({cfg.num_key_value_heads} KV heads); task {task.name}, {args.length} tokens",
        flush=True,
    )

    t0 = time.perf_counter()
    det = retrieval_scores(
        model, tokenizer, task, length=args.length, samples=args.samples, seed=args.seed, progress=True
    )
    scores = det.scores
    n_heads = scores.numel()
    order = sorted(range(n_heads), key=lambda i: (-float(scores.flatten()[i]), i))
    print(f"\ndetection: {det.samples} samples, model accuracy {det.accuracy:.2f}, {time.perf_counter() - t0:.0f} s")
    for thr in (0.1, 0.3, 0.5):
        print(f"  heads with retrieval score > {thr}: {int((scores > thr).sum())} of {n_heads}")
    print("  top heads (layer.head: score):")
    width = cfg.num_attention_heads
    top_list = [(i // width, i % width) for i in order[: max(args.top_k, 10)]]
    print("   " + ", ".join(f"{layer}.{h}: {float(scores[layer, h]):.2f}" for layer, h in top_list))

    result = {
        "command": command,
        "model": model_label(args.model),
        "task": task.name,
        "length": args.length,
        "detection": det.to_dict(),
        "top_heads": [f"{layer}.{h}" for layer, h in top_list],
    }
    if args.eval_samples > 0:
        samples = task.generate(tokenizer, length=args.length, n=args.eval_samples, seed=args.eval_seed)
        top = [(i // width, i % width) for i in order[: args.top_k]]
        rest = [(i // width, i % width) for i in order[args.top_k :]]
        rng = random.Random(f"retrieval-heads:{args.eval_seed}")
        rows = []
        t1 = time.perf_counter()
        acc, _ = needle_accuracy(model, tokenizer, task, samples)
        rows.append(("none", "-", acc))
        acc, preds = needle_accuracy(model, tokenizer, task, samples, top)
        rows.append((f"top-{args.top_k} retrieval heads", " ".join(f"{a}.{b}" for a, b in top), acc))
        random_accs = []
        for draw in range(args.random_draws):
            heads = sorted(rng.sample(rest, args.top_k))
            acc, _ = needle_accuracy(model, tokenizer, task, samples, heads)
            random_accs.append(acc)
            rows.append((f"{args.top_k} random heads (draw {draw + 1})", " ".join(f"{a}.{b}" for a, b in heads), acc))
        print(
            f"\ncausal test: needle accuracy on {len(samples)} samples (seed {args.eval_seed}), "
            f"{time.perf_counter() - t1:.0f} s"
        )
        print(f"  {'masked':<34} {'accuracy':>8}  heads")
        for name, heads, acc in rows:
            print(f"  {name:<34} {acc:>8.2f}  {heads}")
        mean_random = sum(random_accs) / len(random_accs) if random_accs else float("nan")
        print(f"  mean over random draws: {mean_random:.2f}; top-{args.top_k} retrieval heads: {rows[1][2]:.2f}")
        result["causal"] = {
            "eval_samples": len(samples),
            "eval_seed": args.eval_seed,
            "rows": [{"masked": n, "heads": h, "accuracy": a} for n, h, a in rows],
            "mean_random": mean_random,
            "top_masked_predictions": preds,
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.write_profile:
        profile = HeadProfile(
            model=model_label(args.model),
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
            retrieval=scores.tolist(),
            meta={
                "task": task.name,
                "length": args.length,
                "samples": det.samples,
                "seed": args.seed,
                "accuracy": det.accuracy,
                "score": "Wu et al. 2024 copy-paste retrieval score per query head (hits / needle tokens)",
                "command": command,
            },
        )
        print(f"\nwrote {profile.save(args.write_profile)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
