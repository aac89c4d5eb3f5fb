"""``kvsieve diagnose``: profile where a model's attention goes and write JSON plus a self-contained HTML page."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from kvsieve.cli import at_least, command
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
    p.add_argument(
        "--model", default="smollm2-135m", help="embedded model name, HF id or local directory (default: %(default)s)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", type=Path, help="profile this UTF-8 text (cut to --length tokens if given)")
    src.add_argument("--task", help="a needle task (e.g. niah_single_number): profile + retrieval scores")
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help=f"tokens of input (default {DEFAULT_LENGTH}; --text-file: the whole file up to the model's window)",
    )
    p.add_argument(
        "--samples",
        type=at_least(1),
        default=4,
        help="needle samples for retrieval scores (--task; default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the task samples")
    p.add_argument("--out", type=Path, default=Path("kvsieve-diagnose"), help="output directory (default: %(default)s)")
    p.add_argument(
        "--heads",
        default=None,
        help="attention maps for these query heads, e.g. 14.3,20.5 (default: a few chosen from the statistics)",
    )
    p.add_argument(
        "--first-k", type=at_least(1), default=4, help="sink statistic over the first k tokens (default: %(default)s)"
    )
    p.add_argument(
        "--window", type=at_least(1), default=16, help="locality: mass on the last w tokens (default: %(default)s)"
    )
    p.add_argument(
        "--query-start",
        type=at_least(0),
        default=100,
        help="count queries from this position on (default: %(default)s)",
    )
    p.add_argument(
        "--chunk",
        type=at_least(1),
        default=256,
        help="query rows per block (memory O(chunk x tokens); default: %(default)s)",
    )
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
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


def _check_out_dir(out: Path) -> None:
    """Create ``--out`` now, so an unusable path fails before the model runs rather than after."""
    if out.exists() and not out.is_dir():
        raise KVSieveError(f"--out {out} is a file; pass a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KVSieveError(f"cannot create --out {out} ({err.strerror or err}); pass a writable directory") from None
    if not os.access(out, os.W_OK):
        raise KVSieveError(f"--out {out} is not writable; pass a writable directory")


@command("diagnose")
def _diagnose(args: argparse.Namespace) -> int:
    from kvsieve.cli import progress, read_text_file, stdout_console

    from .stats import StatsConfig, check_heads

    # Every argument is checked before the model loads (only its config.json is read): the forward pass and the
    # retrieval runs are the slow part, and a typo should not cost them.
    if args.length is not None and args.length < 2:
        raise KVSieveError(f"--length must be at least 2 tokens, got {args.length}")
    heads = _parse_heads(args.heads)
    config = StatsConfig(first_k=args.first_k, window=args.window, query_start=args.query_start, chunk=args.chunk)
    text = read_text_file(args.text_file, "--text-file") if args.text_file is not None else None
    task = None
    if args.task is not None:
        from kvsieve.tasks import get_task

        task = get_task(args.task)  # unknown names fail before the model loads
    _check_out_dir(args.out)

    from kvsieve.models import load_config, load_model, model_label

    text_config = load_config(args.model).get_text_config()
    if heads:
        check_heads(heads, text_config.num_hidden_layers, text_config.num_attention_heads)
    window = getattr(text_config, "max_position_embeddings", None)
    if args.length is not None and window is not None and args.length > window:
        raise KVSieveError(
            f"--length {args.length} is beyond the model's window of {window} tokens; pass --length {window} or less"
        )

    import torch

    from .diagnosis import diagnose, head_profile_from, write_json
    from .profile import PROFILE_FILE
    from .report import write_report
    from .retrieval import chat_prompt, retrieval_scores

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
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        limit = args.length or window
        if limit is not None:
            ids = ids[:, :limit]
        source = str(args.text_file)
    else:
        ids = default_text(tokenizer, args.length or DEFAULT_LENGTH)
        source = "pydoc (Python documentation prose, from a third of the way in)"

    with progress(f"profiling {ids.shape[1]:,} tokens..."):
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
    from rich.table import Table

    console = stdout_console()
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
