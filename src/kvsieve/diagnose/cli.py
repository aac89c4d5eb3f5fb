"""``kvsieve diagnose``: profile where a model's attention goes and write JSON plus a self-contained HTML page."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from kvsieve.cli import command
from kvsieve.errors import KVSieveError

DEFAULT_LENGTH = 1000


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``diagnose`` on the main parser."""
    p = sub.add_parser(
        "diagnose",
        help="where attention goes: sinks, hidden sinks, locality, entropy, heavy hitters, dormant heads, "
        "massive activations, retrieval heads (JSON + HTML)",
        description="Profile one input (default: 1000 tokens of Python documentation prose) with one forward pass, "
        "statistics computed chunk by chunk, and write DIR/diagnosis.json and DIR/diagnosis.html. With --task, the "
        "input is the task's first sample and every head's retrieval score is measured on --samples samples; "
        "DIR/head_profile.json then feeds razorattention/duoattention(profile=...).",
    )
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, HF id or local directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", type=Path, help="profile this text (cut to --length tokens if given)")
    src.add_argument("--task", help="a needle task (e.g. niah_single_number): profile + retrieval scores")
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help=f"tokens of input (default {DEFAULT_LENGTH}; --text-file: the whole file up to the model's window)",
    )
    p.add_argument("--samples", type=int, default=4, help="needle samples for retrieval scores (--task)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task samples")
    p.add_argument("--out", type=Path, default=Path("kvsieve-diagnose"), help="output directory")
    p.add_argument(
        "--heads",
        default=None,
        help="attention maps for these query heads, e.g. 14.3,20.5 (default: a few chosen from the statistics)",
    )
    p.add_argument("--first-k", type=int, default=4, help="sink statistic over the first k tokens")
    p.add_argument("--window", type=int, default=16, help="locality: mass on the last w tokens")
    p.add_argument("--query-start", type=int, default=100, help="count queries from this position on")
    p.add_argument("--chunk", type=int, default=256, help="query rows per block (memory O(chunk x tokens))")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _parse_heads(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    heads = []
    for part in text.split(","):
        layer, _, head = part.strip().partition(".")
        if not (layer.isdigit() and head.isdigit()):
            raise KVSieveError(f"--heads takes layer.head pairs separated by commas, e.g. 14.3,20.5; got {part!r}")
        heads.append((int(layer), int(head)))
    return heads


def default_text(tokenizer, length: int):
    """``length`` tokens of the pydoc haystack from a third of the way in (as measured in stack.md, section 5)."""
    from kvsieve.tasks import load_haystack

    text = load_haystack("pydoc")
    start = len(text) // 3
    ids = tokenizer(text[start : start + 12 * length], return_tensors="pt", add_special_tokens=False).input_ids
    return ids[:, :length]


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (the options that were given, defaults left out)."""
    parts = ["kvsieve", "diagnose", "--model", args.model]
    if args.text_file is not None:
        parts += ["--text-file", str(args.text_file)]
    if args.task is not None:
        parts += ["--task", args.task, "--samples", str(args.samples), "--seed", str(args.seed)]
    if args.length is not None:
        parts += ["--length", str(args.length)]
    if args.heads:
        parts += ["--heads", args.heads]
    for flag, value, default in (
        ("--first-k", args.first_k, 4),
        ("--window", args.window, 16),
        ("--query-start", args.query_start, 100),
    ):
        if value != default:
            parts += [flag, str(value)]
    return shlex.join([*parts, "--out", str(args.out)])


@command("diagnose")
def _diagnose(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from kvsieve.models import load_model, model_label

    from .diagnosis import diagnose, head_profile_from, write_json
    from .profile import PROFILE_FILE
    from .report import write_report
    from .retrieval import chat_prompt, retrieval_scores
    from .stats import StatsConfig

    if args.length is not None and args.length < 2:
        raise KVSieveError(f"--length must be at least 2 tokens, got {args.length}")
    if args.text_file is not None and not args.text_file.is_file():
        raise KVSieveError(f"text file {args.text_file} does not exist; pass an existing file or drop --text-file")
    heads = _parse_heads(args.heads)
    config = StatsConfig(first_k=args.first_k, window=args.window, query_start=args.query_start, chunk=args.chunk)
    task = None
    if args.task is not None:
        from kvsieve.tasks import get_task

        task = get_task(args.task)  # unknown names fail before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    retrieval = None
    if task is not None:
        length = args.length or DEFAULT_LENGTH
        samples = task.generate(tokenizer, length=length, n=max(1, args.samples), seed=args.seed)
        ids = tokenizer(chat_prompt(tokenizer, samples[0]), return_tensors="pt", add_special_tokens=False).input_ids
        source = f"task {task.name} (sample 0 of seed {args.seed}, chat template)"
        if len(samples[0].answers) == 1:
            retrieval = retrieval_scores(model, tokenizer, task, length=length, samples=args.samples, seed=args.seed)
        else:
            print(
                f"kvsieve: {task.name} has several answers per sample; retrieval scores need a single-answer needle "
                "task such as niah_single_number, so they are skipped",
                file=sys.stderr,
            )
    elif args.text_file is not None:
        ids = tokenizer(args.text_file.read_text(), return_tensors="pt", add_special_tokens=False).input_ids
        limit = args.length or window
        if limit is not None:
            ids = ids[:, :limit]
        source = str(args.text_file)
    else:
        ids = default_text(tokenizer, args.length or DEFAULT_LENGTH)
        source = "pydoc (Python documentation prose, from a third of the way in)"

    result = diagnose(
        model,
        ids,
        tokenizer=tokenizer,
        config=config,
        map_heads=heads,
        retrieval=retrieval,
        model_name=model_label(args.model),
        source=source,
    )
    cmd = _command_line(args)
    json_path = write_json(result, args.out)
    html_path = write_report(result, args.out, command=cmd)
    profile_path = None
    if retrieval is not None:
        profile = head_profile_from(result)
        profile.meta["command"] = cmd
        profile_path = profile.save(args.out / PROFILE_FILE)

    if args.json:
        print(
            json.dumps(
                {
                    "summary": result["summary"],
                    "json": str(json_path),
                    "html": str(html_path),
                    "head_profile": str(profile_path) if profile_path else None,
                }
            )
        )
        return 0
    console = Console()
    table = Table(
        title=f"{result['model']}: {result['input']['n_tokens']} tokens, queries >= "
        f"{result['input']['query_start']} (means over query heads)"
    )
    for col in (
        "layer",
        "token 0",
        f"first {config.first_k}",
        "hidden sinks",
        f"last {config.window}",
        "entropy (norm)",
        "top 10%",
        "dormant",
        "max |h|",
    ):
        table.add_column(col, justify="right")
    for row in result["layers"]:
        m = row.get("massive") or {}

        def f(v):
            return "-" if v is None else f"{v:.3f}"

        table.add_row(
            str(row["layer"]),
            f(row["sink0"]),
            f(row["first_k"]),
            f(row["hidden_sink_mass"]),
            f(row["local"]),
            f(row["entropy_norm"]),
            f(row["hh_top10"]),
            str(len(row["dormant_heads"])),
            f"{m.get('max_abs', 0):,.0f}" if m else "-",
        )
    console.print(table)
    s = result["summary"]
    console.print(
        f"mean token-0 mass {s['mean_sink0']:.3f}; sink layers (>= 0.25): {s['sink_layers']}; "
        f"{s['heads_with_hidden_sinks']} heads with hidden sinks; {s['dormant_heads']} dormant heads"
    )
    if retrieval is not None:
        console.print(
            f"retrieval: model accuracy {retrieval.accuracy:.2f} on {retrieval.samples} samples; "
            f"{int((retrieval.scores > 0.1).sum())} heads score > 0.1"
        )
    console.print(f"wrote {json_path} and {html_path}" + (f" and {profile_path}" if profile_path else ""))
    return 0
