"""Prefill cost of ``kvzip`` / ``kvzip_plus`` (the repeat passes) against a plain prefill, measured in one run.

For each of ``--samples`` prompts of ``--length`` tokens (the bench's task mix, seeded), the prefill time of each
method at ``--compression`` is measured with ``kvsieve.prefill`` (best of ``--repeats``), next to ``full`` (no
compression) and ``snapkv``; printed per method: mean prefill seconds and the ratio to ``full`` in the same run.

    python benchmarks/kvzip_cost.py --length 1024 --samples 1          # smoke
    python benchmarks/kvzip_cost.py --length 2048 --samples 5 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch

import kvsieve
from kvsieve.methods.kvzip import KVzip, KVzipPlus
from kvsieve.sieve import Sieve
from kvsieve.tasks import DEFAULT_TASK_MIX, get_task


def prompts(tokenizer, length: int, samples: int, seed: int) -> list[torch.Tensor]:
    out = []
    tasks = list(DEFAULT_TASK_MIX)
    for i in range(samples):
        sample = get_task(tasks[i % len(tasks)]).generate(tokenizer, length, 1, seed=seed + i)[0]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.context + sample.question}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids)
    return out


CLASSES = {"kvzip": KVzip, "kvzip_plus": KVzipPlus}  # by class: they work whether registered or not


def prefill_seconds(model, tokenizer, spec: str, compression: float, ids: torch.Tensor, repeats: int) -> float:
    method = CLASSES[spec]() if spec in CLASSES else spec
    sieve = Sieve(method) if spec == "full" else Sieve(method, compression=compression)
    best = float("inf")
    for _ in range(repeats):
        with sieve.attach(model) as cache:
            t0 = time.perf_counter()
            kvsieve.prefill(model, ids, cache, tokenizer=tokenizer)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compression", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["full", "snapkv", "kvzip", "kvzip_plus"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = kvsieve.load_model(args.model)
    ids = prompts(tokenizer, args.length, args.samples, args.seed)
    seconds = {m: 0.0 for m in args.methods}
    for prompt in ids:
        for method in args.methods:
            seconds[method] += prefill_seconds(model, tokenizer, method, args.compression, prompt, args.repeats)
    base = seconds.get("full") or next(iter(seconds.values()))
    print(f"prefill cost, {args.samples} prompts of ~{args.length} tokens, compression {args.compression}")
    print(f"{'method':<14}{'s/prompt':>10}{'x full':>9}")
    for method, total in seconds.items():
        print(f"{method:<14}{total / len(ids):>10.3f}{total / base:>9.2f}")


if __name__ == "__main__":
    main()
