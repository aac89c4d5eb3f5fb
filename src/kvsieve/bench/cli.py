"""CLI subcommands of the benchmark: ``tasks``, ``bench``, ``report``, ``stream``."""

from __future__ import annotations

import argparse
import shlex
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..cli import command


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    """Comma-separated method specs; commas inside parentheses belong to a spec's arguments."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [x for x in [*out, cur.strip()] if x]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the benchmark's subcommands on the main parser."""
    from .runner import DEFAULT_COMPRESSIONS, DEFAULT_METHODS, DEFAULT_TASK_MIX

    sub.add_parser("tasks", help="list the benchmark tasks")

    b = sub.add_parser(
        "bench",
        help="sweep method x budget x task and report accuracy, memory and speed",
        description="Runs every method at every budget on generated long-context tasks, appends one row per sample to "
        "OUT/results.jsonl (a rerun skips rows already there), prints a summary table and writes OUT/report.html. "
        "The defaults are the project's main job (6 min 48 s measured on 2 CPU cores): one shared prefill per "
        "sample, then each method's cache and a greedy answer that stops once the score is settled.",
    )
    b.add_argument("--model", default="smollm2-135m",
                   help="embedded model name, HF id or local dir (default: %(default)s)")
    b.add_argument("--tasks", type=_names, default=list(DEFAULT_TASK_MIX), help="comma-separated task names "
                   f"(`kvsieve tasks` lists them; default: {','.join(DEFAULT_TASK_MIX)})")
    b.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS), help="comma-separated method specs, e.g. "
                   f"snapkv,adakv:snapkv,h2o(recent=0.25) (default: {','.join(DEFAULT_METHODS)})")
    b.add_argument("--compression", type=_floats, default=list(DEFAULT_COMPRESSIONS),
                   help="comma-separated fractions of the context's KV removed (default: 0.25,0.5,0.75)")
    b.add_argument("--budgets", type=_ints, default=[], help="comma-separated absolute token budgets, run besides the "
                   "compressions (selection methods: tokens read per step), e.g. 256,512,1024 (default: none)")
    b.add_argument("--lengths", type=_ints, default=[2048],
                   help="comma-separated context lengths in the model's tokens (default: 2048)")
    b.add_argument("--samples", type=int, default=2, help="samples per task and length (default: %(default)s)")
    b.add_argument("--mode", choices=["agnostic", "aware", "both"], default="agnostic",
                   help="agnostic: compress the context before the question is seen (kvpress's default); aware: the "
                   "question is part of the compressed prefill; both: report both, separately (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="seed of the task generators (default: %(default)s)")
    b.add_argument("--out", default="bench-out", help="output directory (default: %(default)s)")
    b.add_argument("--no-shared-prefill", action="store_true", help="prefill once per method instead of once per "
                   "sample (slower; gives each method's own prefill time)")

    r = sub.add_parser("report", help="write DIR/report.html from DIR/results.jsonl")
    r.add_argument("dir", help="a bench output directory")

    from .streaming import add_stream_parser

    add_stream_parser(sub)


@command("tasks")
def _tasks(args: argparse.Namespace) -> int:
    from ..tasks import DEFAULT_TASK_MIX, list_tasks

    table = Table(title="kvsieve tasks (RULER-style, generated locally from a seed)")
    for col in ("name", "description", "metric", "in default mix"):
        table.add_column(col)
    for task in list_tasks():
        table.add_row(task.name, task.description, task.metric, "yes" if task.name in DEFAULT_TASK_MIX else "")
    Console().print(table)
    return 0


@command("bench")
def _bench(args: argparse.Namespace) -> int:
    from .report import write_report
    from .runner import BenchConfig, Runner
    from .summary import load_rows, rich_summary_table

    config = BenchConfig(
        model=args.model, tasks=args.tasks, methods=args.methods, compressions=args.compression, budgets=args.budgets,
        lengths=args.lengths, samples=args.samples, mode=args.mode, seed=args.seed, out=args.out,
        shared_prefill=not args.no_shared_prefill, command=shlex.join(["kvsieve", *sys.argv[1:]]),
    )
    console = Console()
    config.validate()
    runner = Runner(config)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("bench", total=runner.units())
        runner.run(progress=lambda: progress.advance(task))
    rows = [r for r in load_rows(config.out) if r.get("model") == config.model]
    for mode in config.modes:
        console.print(rich_summary_table([r for r in rows if r["mode"] == mode], mode))
    path = write_report(config.out)
    console.print(f"results: {runner.results}  report: {path}")
    return 0


@command("report")
def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import KVSieveError
    from .report import write_report

    if not (Path(args.dir) / "results.jsonl").exists() and not (Path(args.dir) / "streaming.jsonl").exists():
        raise KVSieveError(f"{args.dir} has no results.jsonl; run `kvsieve bench --out {args.dir}` first")
    print(write_report(args.dir))
    return 0
