"""Retrieval heads of a model (Wu et al. 2024) and the causal test: mask them, or as many random heads, and measure.

1. Detection: the copy-paste retrieval score of every query head while the model answers ``--samples`` needle
   samples (``kvsieve.diagnose.retrieval_scores``).
2. Causal test: needle accuracy on ``--eval-samples`` *other* samples (another seed) with (a) no head masked, (b)
   the top ``--top-k`` retrieval heads masked (attention output zeroed), (c) ``--top-k`` random heads masked, for
   ``--random-draws`` seeded draws among the remaining heads. Printed side by side.
3. ``--write-profile [PATH]``: save the scores as the head profile the head-level methods read (default: the one
   shipped in the package for the embedded model).
4. ``--methods``: the head-level methods (and baselines) at ``--compression`` on the causal-test samples: needle
   accuracy, KV bytes held (measured from the cache's tensors) relative to ``full``, and how many KV heads hold the
   whole context. The head methods read the profile written in step 3 (or the shipped one).

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
from kvsieve.diagnose.retrieval import RetrievalResult, chat_prompt, masked_heads, retrieval_scores
from kvsieve.generation import generate
from kvsieve.models import load_model, model_label
from kvsieve.sieve import Sieve
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
    p.add_argument(
        "--methods",
        nargs="*",
        default=["razorattention", "duoattention", "streaming_llm(rerotate=False)"],
        help="methods compared with full on the causal-test samples (empty: skip)",
    )
    p.add_argument("--compression", type=float, default=0.75, help="compression of the methods in step 4")
    p.add_argument("--no-causal", action="store_true", help="skip the causal test (step 2)")
    p.add_argument("--from-profile", type=Path, default=None, help="skip detection: use the scores of this profile")
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
    if args.from_profile is not None and args.write_profile:
        p.error("--from-profile reuses saved scores; it cannot be combined with --write-profile")
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
    if args.from_profile is not None:
        saved = HeadProfile.load(args.from_profile)
        det = RetrievalResult(
            scores=saved.scores(),
            task=saved.meta.get("task", "?"),
            length=saved.meta.get("length", 0),
            samples=saved.meta.get("samples", 0),
            seed=saved.meta.get("seed", 0),
            accuracy=saved.meta.get("accuracy", float("nan")),
        )
        print(f"scores from {args.from_profile} ({saved.meta.get('command', '')})")
    else:
        det = retrieval_scores(
            model, tokenizer, task, length=args.length, samples=args.samples, seed=args.seed, progress=True
        )
    scores = det.scores
    n_heads = scores.numel()
    order = sorted(range(n_heads), key=lambda i: (-float(scores.flatten()[i]), i))
    how = "saved detection" if args.from_profile is not None else f"detection, {time.perf_counter() - t0:.0f} s"
    print(f"\n{how}: {det.samples} samples, model accuracy {det.accuracy:.2f}")
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
    samples = []
    if args.eval_samples > 0:
        samples = task.generate(tokenizer, length=args.length, n=args.eval_samples, seed=args.eval_seed)
    if samples and not args.no_causal:
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
    if args.methods and samples:
        used = args.from_profile or args.write_profile
        custom = used is not None and Path(used).resolve() != shipped_profile_path().resolve()
        profile_arg = f"profile={str(used)!r}" if custom else ""
        result["methods"] = head_methods(model, tokenizer, task, samples, args.methods, args.compression, profile_arg)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


@torch.no_grad()
def head_methods(model, tokenizer, task, samples, methods, compression, profile_arg) -> list[dict]:
    """Needle accuracy and KV bytes held of each method at ``compression`` vs full, on the same samples."""
    rows = []
    specs = ["full", *methods]
    for spec in specs:
        name = spec.split("(")[0]
        if profile_arg and name in ("razorattention", "duoattention") and "(" not in spec:
            spec = f"{name}({profile_arg})"
        sieve = Sieve(spec) if spec == "full" else Sieve(spec, compression=compression)
        scores, kv_bytes, full_heads, t0 = [], [], [], time.perf_counter()
        for sample in samples:
            ids = tokenizer(chat_prompt(tokenizer, sample), return_tensors="pt", add_special_tokens=False).input_ids
            out = generate(model, tokenizer, ids, sieve, max_new_tokens=16)
            scores.append(task.score(sample, out.text))
            kv_bytes.append(out.kv_bytes)
            n_kv = model.config.get_text_config().num_key_value_heads
            per_head = [h for layer in out.kv_tokens for h in (layer if isinstance(layer, list) else [layer] * n_kv)]
            full_heads.append(sum(h >= out.prompt_tokens for h in per_head))
        rows.append(
            {
                "method": spec if spec == "full" else f"{spec} @ {compression:g}",
                "accuracy": sum(scores) / len(scores),
                "kv_bytes": sum(kv_bytes) / len(kv_bytes),
                "kv_heads_full": sum(full_heads) / len(full_heads),
                "seconds": time.perf_counter() - t0,
            }
        )
    base = rows[0]["kv_bytes"]
    print(
        f"\nhead-level methods on the same {len(samples)} samples (query-aware: the whole prompt is prefilled, then "
        "the cache is compressed; KV bytes measured after generation)"
    )
    print(f"  {'method':<44} {'accuracy':>8} {'KV bytes':>12} {'vs full':>8} {'KV heads full':>14}")
    for r in rows:
        r["bytes_ratio"] = r["kv_bytes"] / base
        print(
            f"  {r['method']:<44} {r['accuracy']:>8.2f} {r['kv_bytes']:>12,.0f} {r['bytes_ratio']:>8.3f} "
            f"{r['kv_heads_full']:>14.1f}"
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
