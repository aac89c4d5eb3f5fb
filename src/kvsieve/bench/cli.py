"""CLI subcommands of the benchmark: ``tasks``, ``bench``, ``report``, ``stream``."""

from __future__ import annotations

import argparse
import shlex
import sys

from rich.console import Console
from rich.table import Table

from ..cli import command


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.25,0.5") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of whole numbers, e.g. 1024,2048"
        ) from None


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


PRESET_HELP = (
    "named run, defaults for --samples (explicit flags win): quick = the default run, 2 samples per task "
    "(3 min 42 s and 4 min 59 s measured in two idle runs on 2 CPU cores); standard = 20 samples per task, needles "
    "spread over depths 0-100%% (about 37-50 min on 2 CPU cores: 10x quick's samples at quick's measured cost per "
    "sample; not run whole)"
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the benchmark's subcommands on the main parser."""
    from ..tasks import DEFAULT_TASK_MIX
    from .defaults import DEFAULT_COMPRESSIONS, DEFAULT_METHODS, PRESETS

    sub.add_parser("tasks", help="list the benchmark tasks")

    b = sub.add_parser(
        "bench",
        help="sweep method x budget x task and report accuracy, memory and speed",
        description="Runs every method at every budget on generated long-context tasks, appends one row per sample to "
        "OUT/results.jsonl (a rerun skips rows already there; rows are written whole and synced, so a crash costs "
        "only unfinished rows), prints a summary table and writes OUT/report.html. The defaults are the project's "
        "main job, --preset quick (about 4-5 min on 2 CPU cores): one shared prefill per sample, then each "
        "method's cache and a greedy answer that stops once the score is settled.",
    )
    b.add_argument("--preset", choices=list(PRESETS), default="quick", help=PRESET_HELP + " (default: %(default)s)")
    b.add_argument(
        "--model", default="smollm2-135m", help="embedded model name, HF id or local dir (default: %(default)s)"
    )
    b.add_argument(
        "--tasks",
        type=_names,
        default=list(DEFAULT_TASK_MIX),
        help=f"comma-separated task names (`kvsieve tasks` lists them; default: {','.join(DEFAULT_TASK_MIX)})",
    )
    b.add_argument(
        "--methods",
        type=_names,
        default=list(DEFAULT_METHODS),
        help="comma-separated method specs, e.g. "
        f"snapkv,adakv:snapkv,h2o(recent=0.25) (default: {','.join(DEFAULT_METHODS)})",
    )
    b.add_argument(
        "--compression",
        type=_floats,
        default=list(DEFAULT_COMPRESSIONS),
        help="comma-separated fractions of the context's KV removed (default: 0.25,0.5,0.75)",
    )
    b.add_argument(
        "--budgets",
        type=_ints,
        default=[],
        help="comma-separated absolute token budgets, run besides the "
        "compressions (selection methods: tokens read per step), e.g. 256,512,1024 (default: none)",
    )
    b.add_argument(
        "--lengths",
        type=_ints,
        default=[2048],
        help="comma-separated context lengths in the model's tokens; each must fit the model's window (default: 2048)",
    )
    b.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per task and length (default: the preset's; quick: 2, standard: 20)",
    )
    b.add_argument(
        "--mode",
        choices=["agnostic", "aware", "both"],
        default="agnostic",
        help="agnostic: compress the context before the question is seen (kvpress's default); aware: the "
        "question is part of the compressed prefill; both: report both, separately (default: %(default)s)",
    )
    b.add_argument(
        "--turns",
        choices=["independent", "multiturn", "both"],
        default="independent",
        help="multi-question tasks (multi_passkey, multi_number): independent = every question answered from the same "
        "compressed cache, restored in between (kvpress); multiturn = one conversation, each turn's "
        "question and answer kept (SCBench); rows per question (default: %(default)s)",
    )
    b.add_argument(
        "--prefill",
        type=_names,
        default=[],
        help="attention-compute axis: comma-separated prefill methods run with every method and budget, e.g. "
        "dense,oracle_topk(density=0.3) ('dense' is the default compute; `kvsieve methods` lists them)",
    )
    b.add_argument(
        "--sequence",
        type=_names,
        default=[],
        help="sequence axis: comma-separated token-pruning methods run with every method and budget, e.g. "
        "none,fastv(layer=2, keep=0.5) ('none' is no pruning)",
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the task generators (default: %(default)s)")
    b.add_argument("--out", default="bench-out", help="output directory (default: %(default)s)")
    b.add_argument(
        "--no-shared-prefill",
        action="store_true",
        help="prefill once per method instead of once per sample (slower; gives each method's own prefill time)",
    )
    b.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the sweep's work units on a Ray cluster (pip install 'kvsieve[ray]'): ADDRESS of a "
        "running cluster (e.g. ray://head:10001 or auto), or none to start one on this machine; each "
        "worker loads the model once (one GPU each where the cluster has GPUs); this process alone "
        "writes results.jsonl, so resuming works as without --ray",
    )
    b.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else one per CPU)")

    e = sub.add_parser(
        "export",
        help="write a bench run in another tool's result layout (kvpress)",
        description="Writes DIR/results.jsonl in kvpress's evaluation layout: one directory per dataset, model, press "
        "and ratio (ruler__<length>__<model>__<press>__<ratio>[__query_aware]) holding predictions.csv, metrics.json "
        "and config.yaml as kvpress's evaluate.py writes them, plus kvsieve.json describing kvsieve's method.",
    )
    e.add_argument("dir", help="a bench output directory")
    e.add_argument("--format", choices=["kvpress"], default="kvpress", help="target layout (default: %(default)s)")
    e.add_argument("--out", default=None, help="output directory (default: DIR/kvpress)")

    r = sub.add_parser(
        "report", help="write DIR/report.html from DIR/results.jsonl and any kvpress result directories under DIR"
    )
    r.add_argument("dir", help="a bench output directory")

    add_stream_parser(sub)


def add_stream_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "stream",
        help="streaming perplexity over 100k+ tokens with a fixed KV budget",
        description="Per-token NLL over natural text far past the model's window, per bucket of tokens; writes "
        "OUT/streaming.jsonl one row per bucket as it completes (a rerun resumes: finished methods are skipped) "
        "and the report's streaming chart. 'full' is plain dense attention, the failing baseline.",
    )
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument(
        "--methods",
        default="full,streaming_llm,streaming_llm(n_sink=0)",
        help="comma-separated specs; streaming_llm(n_sink=0) is a plain recent window (default: %(default)s)",
    )
    s.add_argument("--budget", type=int, default=1024, help="KV tokens kept per layer (default: %(default)s)")
    s.add_argument("--tokens", type=int, default=100_000, help="tokens of text to stream (default: %(default)s)")
    s.add_argument("--chunk-size", type=int, default=128, help="tokens per forward pass; 1 is token by token")
    s.add_argument("--bucket", type=int, default=1000, help="tokens per perplexity bucket (default: %(default)s)")
    s.add_argument("--dense-limit", type=int, default=12_000, help="stop dense 'full' after this many tokens")
    s.add_argument("--text", default="pydoc", help="haystack name (pydoc, licenses) or a text file path")
    s.add_argument("--out", default="stream-out")


@command("stream")
def _stream(args: argparse.Namespace) -> int:
    from .streaming import stream_command

    return stream_command(args)


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
    from ..errors import KVSieveError
    from .progress import progress
    from .results import prepare_out_dir
    from .runner import PRESETS, BenchConfig, Runner, model_window

    preset = PRESETS[args.preset]
    config = BenchConfig(
        model=args.model,
        tasks=args.tasks,
        methods=args.methods,
        compressions=args.compression,
        budgets=args.budgets,
        lengths=args.lengths,
        samples=preset["samples"] if args.samples is None else args.samples,
        mode=args.mode,
        turns=args.turns,
        prefills=args.prefill,
        sequences=args.sequence,
        seed=args.seed,
        out=args.out,
        shared_prefill=not args.no_shared_prefill,
        command=shlex.join(["kvsieve", *sys.argv[1:]]),
    )
    if args.workers is not None and args.workers < 1:
        raise KVSieveError(f"--workers must be at least 1, not {args.workers}")
    if args.workers is not None and args.ray is None:
        raise KVSieveError("--workers applies to Ray sweeps only; add --ray")
    if args.ray is not None:
        from .distributed import import_ray

        import_ray()  # a missing Ray is reported before anything is loaded
    config.validate(window=model_window(config.model))  # every argument checked before the model loads
    prepare_out_dir(config.out)
    runner = Runner(config)
    if runner.recovery:
        print(f"kvsieve: note: {runner.recovery.message(runner.results)}", file=sys.stderr)
    with progress("bench", runner.total_rows()) as advance:
        runner.run(progress=advance, ray=args.ray, workers=args.workers)
    _print_summary(config, runner)
    return 0


def _print_summary(config, runner) -> None:
    from .report import write_report
    from .summary import load_config, load_rows, summary_tables

    console = Console()
    rows = [r for r in load_rows(config.out) if r.get("model") == config.model]
    # n, 95% intervals, paired tests against full, and cells with fewer rows than the config expects
    for table in summary_tables(rows, load_config(config.out)):
        console.print(table)
    path = write_report(config.out)
    console.print(f"results: {runner.results}  report: {path}")


@command("export")
def _export(args: argparse.Namespace) -> int:
    from .export import export_kvpress

    written = export_kvpress(args.dir, args.out)
    print(f"{len(written)} kvpress result directories under {written[0].parent}")
    return 0


@command("report")
def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import KVSieveError
    from .report import has_report_inputs, write_report

    if not has_report_inputs(args.dir):
        raise KVSieveError(
            f"{args.dir} has no results.jsonl, streaming.jsonl or kvpress result directory; run `kvsieve bench "
            f"--out {args.dir}` first, or pass kvpress's evaluation output directory"
        )
    print(write_report(Path(args.dir)))
    return 0
