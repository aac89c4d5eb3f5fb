"""Prefill time with token pruning inside the forward pass (the sequence action point), against no pruning, one run.

The same prompt (a passkey haystack of ``--context`` tokens) is prefilled with ``full`` and with each sequence
method at each keep share after layer ``--layer``; runs are interleaved round-robin over ``--repeats`` rounds and the
median is reported, so load on the machine affects every configuration alike. Printed: prefill seconds, the ratio
to no pruning (speed-up, higher is faster), the tokens the last layer's cache holds, and the linear estimate,
the speed-up if the pruned layers cost exactly their share of tokens: ``L / ((K + 1) + (L - K - 1) x keep)``
(single-stage pruning beats it where attention, quadratic in tokens, is a large part of a layer).

    python benchmarks/token_pruning.py          # 4096 tokens, every in-LLM method at keep 0.5 and 0.25 after layer 2
    python benchmarks/token_pruning.py --context 2048 --keeps 0.5 --repeats 1 --methods fastv

Progressive methods (transprune, psigmoid, aim) prune in several stages starting after ``--layer`` and reach the
keep share only at their last stage, so they stay below the estimate. Accuracy next to snapkv at the same number of
kept tokens (needle tasks, query-aware: the question is never pruned) is measured by the bench:

    kvsieve bench --model smollm2-135m --tasks passkey,niah_single_number,niah_multikey --lengths 4096 --samples 10 \
        --mode aware --methods full --sequence "none,fastv(layer=2, keep=0.25),transprune(layer=2, keep=0.25),\
    gsearch(layer=2, keep=0.25),psigmoid(layer=2, keep=0.25),aim(layer=2, keep=0.25, merge=1.0)" --out bench-pruning
    kvsieve bench --model smollm2-135m --tasks passkey,niah_single_number,niah_multikey --lengths 4096 --samples 10 \
        --mode aware --methods snapkv --compression 0.75,0.675 --out bench-pruning

(snapkv at 0.75 keeps as many context tokens as a pruned layer at keep 0.25; at 0.675 as many as the 30 layers hold
on average when 27 of them are pruned to 0.25.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvsieve import Sieve, cache_kwargs
from kvsieve.models import load_model
from prompts import prompt_ids


def spec(method: str, layer: int, keep: float) -> str:
    """``method`` with ``layer`` and ``keep`` added to its hyperparameters."""
    if method.endswith(")"):
        return f"{method[:-1]}, layer={layer}, keep={keep})"
    return f"{method}(layer={layer}, keep={keep})"


def prefill_seconds(model, ids: torch.Tensor, sieve: Sieve) -> tuple[float, int]:
    with sieve.attach(model) as cache, torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        seconds = time.perf_counter() - t0
        last = cache.kv_tokens()[-1]
    return seconds, last if isinstance(last, int) else max(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--layer", type=int, default=2, help="prune after this decoder layer")
    parser.add_argument("--keeps", default="0.5,0.25", help="shares of the tokens that go on, comma-separated")
    parser.add_argument(
        "--methods",
        default="fastv;transprune;gsearch;psigmoid;aim(merge=1.0)",
        help="sequence methods, ';'-separated (layer and keep are added)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    n_layers = model.config.get_text_config().num_hidden_layers
    ids = prompt_ids(tokenizer, args.context)
    keeps = [float(k) for k in args.keeps.split(",")]
    configs = [("full", None)] + [(m, k) for m in args.methods.split(";") for k in keeps]
    prefill_seconds(model, ids[:, :256], Sieve("full"))  # warm-up
    times: dict = {c: [] for c in configs}
    held: dict = {}
    for _ in range(args.repeats):
        for method, keep in configs:
            sieve = Sieve("full") if keep is None else Sieve("full", sequence=spec(method, args.layer, keep))
            seconds, held[(method, keep)] = prefill_seconds(model, ids, sieve)
            times[(method, keep)].append(seconds)
    base = statistics.median(times[("full", None)])
    print(f"model {args.model}, {args.context}-token prompt, pruning after layer {args.layer} of {n_layers}, "
          f"median of {args.repeats} interleaved rounds, {args.threads} threads")  # fmt: skip
    print(f"{'configuration':<32}{'prefill s':>10}{'speed-up':>10}{'linear':>8}{'last layer holds':>18}")
    for (method, keep), values in times.items():
        seconds = statistics.median(values)
        bound = 1.0 if keep is None else n_layers / ((args.layer + 1) + (n_layers - args.layer - 1) * keep)
        label = "no pruning" if keep is None else f"{method} keep {keep:g}"
        print(f"{label:<32}{seconds:>10.2f}{base / seconds:>9.2f}x{bound:>7.2f}x{held[(method, keep)]:>18}")


if __name__ == "__main__":
    main()
