"""Whose importance is right? Comprehensiveness and sufficiency of every attribution method and every evicting cache
method's scores, on the same examples: the bench's tasks and natural text, with a random baseline.

Usage:
    python benchmarks/faithfulness.py [--samples 5] [--natural 5] [--length 256] [--tasks qa,niah_single_number,...]
                                      [--methods ...] [--shares 0.1,0.25,0.5] [--out faithfulness-out]

Examples: ``--samples`` per task (the prompt is the task's chat prompt plus its answer prefix, the target the gold
answer's first ``--steps`` tokens) and ``--natural`` passages of Python documentation prose (the target: the next
``--steps`` tokens of the real text). For each example, every method scores the prompt for each target token, and
:mod:`kvsieve.explain.faithfulness` deletes the top 10/25/50% prompt tokens (comprehensiveness: how much p(target)
falls, higher is better) or keeps only them (sufficiency: how much it falls, lower is better). Cache methods
(``method:<spec>``) score the prompt once (query-agnostic, at compression 0.5), as they would evict; one whose
scores a plain prefill cannot give (e.g. ``finch``, whose default window is the question) is dropped, with its
reason on stderr.

Prints one table (mean over examples and target tokens) and writes OUT/faithfulness.json (per example too) and
OUT/faithfulness.html. Default: 4 tasks x 5 samples + 5 natural passages = 25 examples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kvsieve import KVSieveError, load_model
from kvsieve.explain.attribution import ATTRIBUTIONS, attribute
from kvsieve.explain.faithfulness import measure
from kvsieve.explain.problem import Problem
from kvsieve.explain.report import faithfulness_section, page
from kvsieve.explain.scorer import share_prefill
from kvsieve.methods import build, list_methods
from kvsieve.snapshot import shareable
from kvsieve.tasks import get_task, load_haystack

TASKS = ("qa", "niah_single_number", "niah_multikey", "variable_tracking")
ATTRIBUTION_DEFAULTS = [n for n in ATTRIBUTIONS if n != "random"]  # random is always measured as the baseline


def cache_methods() -> list[str]:
    """Every registered evicting cache method whose scores a plain prefill can give (by name, default settings)."""
    out = []
    for cls in list_methods("cache"):
        try:
            method = build(cls.name)
        except Exception as err:  # a method that cannot be built by name alone (reported, not hidden)
            print(f"skipping method:{cls.name}: {err}", file=sys.stderr)
            continue
        if method.evicts and shareable(method) and method.kind == "evict":
            out.append(f"method:{cls.name}")
    return out


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def examples(tokenizer, tasks: list[str], samples: int, natural: int, length: int, steps: int, seed: int):
    """``(source, prompt ids (1, n), target ids (1, s))`` for every example."""
    for name in tasks:
        task = get_task(name)
        for s in task.generate(tokenizer, length, samples, seed):
            prompt = chat_prompt(tokenizer, s.prompt) + s.answer_prefix
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            target = tokenizer(" " + s.answers[0], return_tensors="pt", add_special_tokens=False).input_ids
            yield f"{name}#{s.index}", ids, target[:, :steps]
    text = load_haystack("pydoc")
    all_ids = tokenizer(text[: 40 * (length + steps) * max(natural, 1) * 4], add_special_tokens=False).input_ids
    stride = max(length + steps, len(all_ids) // max(natural, 1))
    for i in range(natural):
        chunk = all_ids[i * stride : i * stride + length + steps]
        yield f"natural#{i}", torch.tensor([chunk[:length]]), torch.tensor([chunk[length:]])


def resume(log: Path, header: dict) -> list[dict]:
    """The examples already measured in ``log`` by a run with the same settings (written one line each as they
    finish); a new log with ``header`` as its first line when there is none. SystemExit when ``log`` belongs to a run
    with other settings, so its results are never mixed or overwritten."""
    header = json.loads(json.dumps(header))  # as it reads back (tuples become lists)
    if not log.exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps({"header": header}) + "\n")
        return []
    lines = []
    for text in log.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # the line a crash cut short: that example runs again
            break
    if not lines or lines[0].get("header") != header:
        raise SystemExit(
            f"error: {log} holds results of a run with other settings; pass another --out, or delete it to start over"
        )
    print(f"resuming: {len(lines) - 1} examples already measured in {log}", flush=True)
    return lines[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--samples", type=int, default=5, help="samples per task (default 5)")
    p.add_argument("--natural", type=int, default=5, help="natural-text passages (default 5)")
    p.add_argument("--length", type=int, default=256, help="prompt tokens of each task sample / passage")
    p.add_argument("--steps", type=int, default=3, help="target tokens explained per example (default 3)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated; `cache` stands for every evicting cache method; default: every attribution method "
        "and `cache`. ReAGent's and integrated gradients' defaults cost minutes per target token on a CPU at 256 "
        "tokens: e.g. reagent(num_probes=4, max_steps=20) and integrated_gradients(n_steps=16) cut that",
    )
    p.add_argument("--shares", default="0.1,0.25,0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("faithfulness-out"))
    args = p.parse_args()
    from kvsieve.explain.cli import _names

    asked = _names(args.methods) if args.methods else [*ATTRIBUTION_DEFAULTS, "cache"]
    names = [m for n in asked for m in (cache_methods() if n == "cache" else [n])]
    shares = [float(x) for x in args.shares.split(",")]
    model, tok = load_model(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    log = args.out / "examples.jsonl"
    per_example = resume(log, {k: v for k, v in vars(args).items() if k != "out"} | {"methods": names})
    seconds = {n: [e["seconds"][n] for e in per_example if n in e["seconds"]] for n in names}
    done = {e["source"] for e in per_example}
    t0 = time.perf_counter()
    for source, ids, target in examples(tok, tasks, args.samples, args.natural, args.length, args.steps, args.seed):
        if source in done:
            continue
        problem = Problem(model, tok, torch.cat([ids, target], dim=1), ids.shape[1], seed=args.seed)
        # one prefill for every cache method (each replays it); a method it cannot serve is dropped below
        share_prefill(problem, [n[len("method:") :] for n in names if n.startswith("method:")])
        scores = {}
        for name in list(names):
            try:
                scores[name], info = attribute(problem, name)
            except KVSieveError as err:
                if not name.startswith("method:"):
                    raise
                # a cache method whose scores need more than a plain prefill of the prompt (e.g. finch's question
                # window): dropped from every example, so all rows average the same examples
                print(f"dropping {name}: {err}", file=sys.stderr, flush=True)
                names.remove(name)
                for e in per_example:
                    e["methods"].pop(name, None)
                continue
            seconds[name].append(info["seconds"])
        f = measure(problem, scores, shares=shares)
        row = {"source": source, **f, "seconds": {n: seconds[n][-1] for n in scores}}
        per_example.append(row)
        with log.open("a") as fh:  # one line per example, flushed: a crash loses at most the example in flight
            fh.write(json.dumps(row) + "\n")
        print(f"{source}: {len(problem.tokens())} tokens, p(target) {f['p_full']:.3f} "
              f"({time.perf_counter() - t0:.0f} s so far)", flush=True)  # fmt: skip
    methods = list(per_example[0]["methods"])
    keys = [f"{s:g}" for s in shares]
    summary = {
        "shares": shares,
        "p_full": statistics.fmean(e["p_full"] for e in per_example),
        "methods": {
            m: {
                metric: {k: statistics.fmean(e["methods"][m][metric][k] for e in per_example) for k in keys}
                for metric in ("comprehensiveness", "sufficiency")
            }
            for m in methods
        },
    }
    header = f"{'method':34s}" + "".join(f" comp{k:>6s}" for k in keys) + "".join(f" suff{k:>6s}" for k in keys)
    print(f"\n{len(per_example)} examples ({', '.join(tasks)}, natural text), mean p(target) {summary['p_full']:.3f}")
    print(header + "  s/example")
    order = sorted(methods, key=lambda m: -summary["methods"][m]["comprehensiveness"][keys[-1]])
    for m in order:
        row = summary["methods"][m]
        secs = statistics.fmean(seconds[m]) if seconds.get(m) else 0.0
        print(f"{m:34s}" + "".join(f" {row['comprehensiveness'][k]:10.4f}" for k in keys)
              + "".join(f" {row['sufficiency'][k]:10.4f}" for k in keys) + f"  {secs:9.2f}")  # fmt: skip
    data = {
        "model": args.model,
        "examples": per_example,
        "summary": summary,
        "args": vars(args) | {"out": str(args.out)},
    }
    (args.out / "faithfulness.json").write_text(json.dumps(data, indent=1) + "\n")
    meta = [("model", args.model), ("examples", f"{len(per_example)} ({', '.join(tasks)} and natural text)"),
            ("command", " ".join(sys.argv))]  # fmt: skip
    html = page("kvsieve faithfulness", args.model, meta, [("faithfulness", "Faithfulness",
                faithfulness_section(summary, n_examples=len(per_example)))])  # fmt: skip
    (args.out / "faithfulness.html").write_text(html)
    print(f"wrote {args.out / 'faithfulness.json'} and {args.out / 'faithfulness.html'}")


if __name__ == "__main__":
    main()
