"""``kvsieve explain``: attribute a target (or the model's continuation) to the prompt's tokens; JSON plus HTML."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from kvsieve.bench.cli import _floats as _shares
from kvsieve.bench.cli import _names
from kvsieve.cli import at_least, command
from kvsieve.errors import KVSieveError

DEFAULT_METHODS = "reagent,attention_chain,integrated_gradients,attention_rollout"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``explain`` on the main parser."""
    p = sub.add_parser(
        "explain",
        help="which prompt tokens caused the output: ReAGent, attention chains, gradients, cache methods' scores "
        "(JSON + HTML)",
        description="Scores every prompt token's importance for each target token (the given --target, or the "
        "model's greedy continuation) with each attribution method, and writes DIR/explanation.json and "
        "DIR/explanation.html (tokens shaded per target token, methods side by side). Methods: reagent, "
        "attention_chain, fai, waad, saliency, input_x_gradient, integrated_gradients, attention_last_layer, "
        "attention_rollout, random, and method:<spec> for a kvsieve cache method's eviction scores (e.g. "
        "method:snapkv). --faithfulness adds comprehensiveness and sufficiency at 10/25/50% of the prompt.",
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="embedded model name, HF id or local directory (default: %(default)s)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="UTF-8 text file holding the prompt")
    p.add_argument("--target", default=None, help="continuation to explain (default: the model's greedy output)")
    p.add_argument(
        "--methods",
        type=_names,
        default=_names(DEFAULT_METHODS),
        help=f"comma-separated attribution methods, e.g. reagent(num_probes=4),fai,method:snapkv "
        f"(default: {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--max-new-tokens", type=at_least(1), default=8, help="tokens generated without --target (default: 8)"
    )
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    p.add_argument("--seed", type=int, default=0, help="seed of reagent and the random baseline (default: 0)")
    p.add_argument(
        "--faithfulness", action="store_true", help="also measure comprehensiveness and sufficiency per method"
    )
    p.add_argument(
        "--shares",
        type=_shares,
        default=[0.1, 0.25, 0.5],
        help="prompt shares for --faithfulness (default: 0.1,0.25,0.5)",
    )
    p.add_argument("--out", type=Path, default=Path("kvsieve-explain"), help="output directory (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _command_line(args: argparse.Namespace) -> str:
    parts = ["kvsieve", "explain", "--model", args.model]
    parts += ["--prompt-file", str(args.prompt_file)] if args.prompt_file else ["--prompt", args.prompt]
    if args.target is not None:
        parts += ["--target", args.target]
    parts += ["--methods", ",".join(args.methods), "--seed", str(args.seed)]
    if args.raw:
        parts.append("--raw")
    if args.faithfulness:
        parts += ["--faithfulness", "--shares", ",".join(f"{s:g}" for s in args.shares)]
    return shlex.join([*parts, "--out", str(args.out)])


@command("explain")
def _explain(args: argparse.Namespace) -> int:
    from kvsieve.cli import progress, read_text_file, stdout_console
    from kvsieve.diagnose.cli import _check_out_dir

    # every argument is checked before the model loads
    from .attribution import check_name
    from .faithfulness import _check_shares

    if not args.methods:
        raise KVSieveError("--methods is empty; name at least one attribution method, e.g. --methods reagent")
    for name in args.methods:
        check_name(name)
    if args.faithfulness:
        _check_shares(args.shares)
    if args.prompt_file is not None:
        prompt = read_text_file(args.prompt_file, "--prompt-file")
    else:
        prompt = args.prompt
        if not prompt.strip():
            raise KVSieveError("the prompt is empty; pass some text with --prompt, or a file with --prompt-file")
    if args.target is not None and not args.target.strip():
        raise KVSieveError("--target is empty; pass the continuation to explain, or omit --target")
    _check_out_dir(args.out)

    from kvsieve.models import load_model, model_label

    from .result import explain

    model, tokenizer = load_model(args.model)
    with progress(f"explaining with {', '.join(args.methods)}..."):
        result = explain(
            model, tokenizer, prompt, target=args.target, method=args.methods, max_new_tokens=args.max_new_tokens,
            chat=not args.raw, seed=args.seed, faithfulness=args.faithfulness, shares=args.shares,
            model_name=model_label(args.model),
        )  # fmt: skip
    json_path, html_path = result.write(args.out, command=_command_line(args))
    if args.json:
        print(json.dumps({"target": result.target, "json": str(json_path), "html": str(html_path),
                          "faithfulness": result.faithfulness}))  # fmt: skip
        return 0
    from rich.table import Table

    console = stdout_console()
    table = Table(title=f"top prompt tokens for the first target token {result.tokens[result.n_prompt]!r}")
    table.add_column("method")
    table.add_column("top 5 prompt tokens")
    table.add_column("time", justify="right")
    for name, scores in result.scores.items():
        row = scores[0, : result.n_prompt].nan_to_num(nan=float("-inf"))
        top = row.topk(min(5, result.n_prompt)).indices.tolist()
        table.add_row(name, " ".join(repr(result.tokens[i]) for i in top), f"{result.info[name]['seconds']:.2f} s")
    console.print(table)
    if result.faithfulness:
        f = result.faithfulness
        ft = Table(title="faithfulness (comprehensiveness: higher is better; sufficiency: lower is better)")
        ft.add_column("method")
        for s in f["shares"]:
            ft.add_column(f"comp {s:.0%}", justify="right")
        for s in f["shares"]:
            ft.add_column(f"suff {s:.0%}", justify="right")
        for name, m in f["methods"].items():
            ft.add_row(
                name,
                *[f"{m['comprehensiveness'][f'{s:g}']:.4f}" for s in f["shares"]],
                *[f"{m['sufficiency'][f'{s:g}']:.4f}" for s in f["shares"]],
            )
        console.print(ft)
    console.print(f"target {result.target!r}; wrote {json_path} and {html_path}", markup=False, highlight=False)
    return 0
