"""ZeroTuning and ACT against full attention on the bench tasks: does attention calibration help this model?

For each task of the mix, ``--samples`` samples of ``--length`` tokens (seeded) are scored with every method spec
(``full`` first). By default the scoring is teacher-forced, one forward pass per sample and method over the prompt
followed by the reference answer (the answers joined by ", "): the mean negative log-likelihood of the answer tokens
(lower is better; it moves even when no answer flips) and whether greedy decoding would reproduce the answer (every
answer token is the argmax). ``--generate`` instead answers greedily and applies the task's metric (RULER's
string_match_all), which costs a decoding loop per sample and method. Printed as a table per task and method, with
the difference to ``full``, per-sample wins/losses, and the forward time ratio to ``full`` measured in the same run.

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

from kvsieve.compat import cache_kwargs
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


@torch.no_grad()
def teacher_forced(model, tokenizer, prompt_ids: torch.Tensor, answer: str, sieve: Sieve) -> dict:
    """One forward pass over prompt + answer: the answer's mean NLL and whether every answer token is the argmax."""
    target = tokenizer(answer, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([prompt_ids, target], dim=1).to(model.device)
    n = target.shape[1]
    t0 = time.perf_counter()
    with sieve.attach(model) as cache:
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=n + 1).logits
    seconds = time.perf_counter() - t0
    logp = logits[0, :-1].float().log_softmax(-1)  # predictions of the n answer tokens
    gold = target[0].to(logp.device)
    nll = float(-logp.gather(-1, gold[:, None]).mean())
    exact = float(bool((logp.argmax(-1) == gold).all()))
    return {"nll": nll, "exact": exact, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASK_MIX)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="calibration specs compared with full")
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--samples", type=int, default=3, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32, help="cap on each task's answer length")
    p.add_argument("--generate", action="store_true", help="greedy answers scored by the task metric")
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
                if args.generate:
                    cap = min(args.max_new_tokens, sample.max_new_tokens)
                    out = generate(model, tokenizer, ids, sieves[spec], max_new_tokens=cap)
                    row = {
                        "score": task.score(sample, out.text),
                        "seconds": out.prefill_seconds,
                        "prediction": out.text,
                    }
                else:
                    row = teacher_forced(model, tokenizer, ids, " " + ", ".join(sample.answers), sieves[spec])
                results.append({"task": task_name, "index": sample.index, "method": spec, **row})
            mine = [r for r in results if r["task"] == task_name and r["index"] == sample.index]
            key = "score" if args.generate else "nll"
            print(f"{task_name} #{sample.index}: " + "  ".join(f"{r['method']}={r[key]:.3f}" for r in mine), flush=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    print(
        f"\n{model_label(args.model)}, {args.length} tokens, {args.samples} samples per task (seed {args.seed}), "
        f"{time.perf_counter() - t_start:.0f} s\n"
    )
    metric = "task score" if args.generate else "answer exact-match (teacher-forced)"
    print(
        f"columns: {metric} per task, its mean and change vs full; answer NLL and its change; samples won/lost "
        "vs full; forward time / full's\n"
    )
    header = (
        f"{'method':<40}"
        + "".join(f"{t[:16]:>17}" for t in args.tasks)
        + f"{'mean':>8}{'vs full':>9}{'NLL':>9}{'vs full':>9}{'won/lost':>10}{'time x':>8}"
    )
    print(header)
    key = "score" if args.generate else "exact"
    full_rows = {(r["task"], r["index"]): r for r in results if r["method"] == "full"}
    full_time = mean([r["seconds"] for r in results if r["method"] == "full"])
    full_mean = mean([r[key] for r in full_rows.values()])
    full_nll = mean([r.get("nll", float("nan")) for r in full_rows.values()])
    table = []
    for spec in specs:
        mine = [r for r in results if r["method"] == spec]
        per_task = [mean([r[key] for r in mine if r["task"] == t]) for t in args.tasks]
        overall = mean([r[key] for r in mine])
        if args.generate:
            won = sum(r["score"] > full_rows[(r["task"], r["index"])]["score"] for r in mine)
            lost = sum(r["score"] < full_rows[(r["task"], r["index"])]["score"] for r in mine)
        else:  # a sample is won when the answer's NLL drops by more than 1%
            won = sum(r["nll"] < 0.99 * full_rows[(r["task"], r["index"])]["nll"] for r in mine)
            lost = sum(r["nll"] > 1.01 * full_rows[(r["task"], r["index"])]["nll"] for r in mine)
        nll = mean([r.get("nll", float("nan")) for r in mine])
        ratio = mean([r["seconds"] for r in mine]) / full_time
        table.append(
            {
                "method": spec,
                "per_task": dict(zip(args.tasks, per_task, strict=True)),
                "mean": overall,
                "delta": overall - full_mean,
                "nll": nll,
                "nll_delta": nll - full_nll,
                "won": won,
                "lost": lost,
                "time_ratio": ratio,
            }
        )
        print(
            f"{spec:<40}"
            + "".join(f"{v:>17.2f}" for v in per_task)
            + f"{overall:>8.3f}{overall - full_mean:>+9.3f}"
            + f"{nll:>9.3f}{nll - full_nll:>+9.3f}"
            + f"{f'{won}/{lost}':>10}{ratio:>8.2f}"
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
