"""ZeroTuning and ACT against full attention on the bench tasks: does attention calibration help this model?

For each task of the mix, ``--samples`` samples of ``--length`` tokens (seeded) are answered greedily with every
method spec (``full`` first); the score is the task's metric (RULER's string_match_all). Printed as a table of mean
score per task and method, with the difference to ``full`` and the per-sample wins/losses, and the prefill time
ratio to ``full`` measured in the same run.

    python benchmarks/calibration.py
    python benchmarks/calibration.py --methods "zerotuning(gamma=0.5)" "act(beta=0.4, heads=['3-10'])" --samples 4
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from kvsieve.diagnose.retrieval import chat_prompt
from kvsieve.generation import generate
from kvsieve.models import load_model, model_label
from kvsieve.sieve import Sieve
from kvsieve.tasks import DEFAULT_TASK_MIX, get_task

DEFAULT_METHODS = [
    "zerotuning(gamma=0.5)",
    "zerotuning(gamma=0.7)",
    "zerotuning(gamma=1.5)",
    "zerotuning(gamma=0.7, heads=['0-11'])",
    "act(beta=0.4)",
    "act(beta=0.4, heads=['3-10'])",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASK_MIX)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="calibration specs compared with full")
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--samples", type=int, default=3, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32, help="cap on each task's answer length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every result to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/calibration.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    model, tokenizer = load_model(args.model)
    specs = ["full", *[m for m in args.methods if m != "full"]]
    sieves = {spec: Sieve(spec) for spec in specs}  # bad specs fail before any compute
    results: list[dict] = []
    t_start = time.perf_counter()
    for task_name in args.tasks:
        task = get_task(task_name)
        samples = task.generate(tokenizer, length=args.length, n=args.samples, seed=args.seed)
        for sample in samples:
            ids = tokenizer(chat_prompt(tokenizer, sample), return_tensors="pt", add_special_tokens=False).input_ids
            for spec in specs:
                out = generate(
                    model, tokenizer, ids, sieves[spec], max_new_tokens=min(args.max_new_tokens, sample.max_new_tokens)
                )
                score = task.score(sample, out.text)
                results.append(
                    {
                        "task": task_name,
                        "index": sample.index,
                        "method": spec,
                        "score": score,
                        "prefill_s": out.prefill_seconds,
                        "prediction": out.text,
                    }
                )
            row = [r for r in results if r["task"] == task_name and r["index"] == sample.index]
            print(
                f"{task_name} #{sample.index}: " + "  ".join(f"{r['method']}={r['score']:.2f}" for r in row), flush=True
            )

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    print(
        f"\n{model_label(args.model)}, {args.length} tokens, {args.samples} samples per task (seed {args.seed}), "
        f"{time.perf_counter() - t_start:.0f} s\n"
    )
    header = (
        f"{'method':<40}"
        + "".join(f"{t[:16]:>17}" for t in args.tasks)
        + f"{'mean':>8}{'vs full':>9}"
        + f"{'won/lost':>10}{'prefill x':>10}"
    )
    print(header)
    full_scores = {(r["task"], r["index"]): r["score"] for r in results if r["method"] == "full"}
    full_prefill = mean([r["prefill_s"] for r in results if r["method"] == "full"])
    full_mean = mean(list(full_scores.values()))
    table = []
    for spec in specs:
        mine = [r for r in results if r["method"] == spec]
        per_task = [mean([r["score"] for r in mine if r["task"] == t]) for t in args.tasks]
        overall = mean([r["score"] for r in mine])
        won = sum(r["score"] > full_scores[(r["task"], r["index"])] for r in mine)
        lost = sum(r["score"] < full_scores[(r["task"], r["index"])] for r in mine)
        prefill = mean([r["prefill_s"] for r in mine]) / full_prefill
        table.append(
            {
                "method": spec,
                "per_task": dict(zip(args.tasks, per_task, strict=True)),
                "mean": overall,
                "delta": overall - full_mean,
                "won": won,
                "lost": lost,
                "prefill_ratio": prefill,
            }
        )
        print(
            f"{spec:<40}"
            + "".join(f"{v:>17.2f}" for v in per_task)
            + f"{overall:>8.3f}{overall - full_mean:>+9.3f}"
            + f"{f'{won}/{lost}':>10}{prefill:>10.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "model": model_label(args.model),
                    "length": args.length,
                    "samples": args.samples,
                    "seed": args.seed,
                    "table": table,
                    "results": results,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
