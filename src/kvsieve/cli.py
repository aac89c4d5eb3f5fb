"""The ``kvsieve`` command line: ``methods``, ``generate``, ``tasks``, ``bench``, ``report``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import KVSieveError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def wrap(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return wrap


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compression", type=float, help="fraction of KV tokens removed, in [0, 1) (0.5 keeps half)")
    group.add_argument("--budget", type=int, help="tokens kept per layer and head, at every step (streaming cap)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsieve",
        description="Find the tokens a transformer needs and act on it: KV-cache compression and its benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the registered methods")

    gen = sub.add_parser("generate", help="generate text with a compressed KV cache")
    gen.add_argument("--method", default="full", help="method spec, e.g. snapkv, h2o(recent=0.25), adakv:snapkv")
    _add_budget_args(gen)
    gen.add_argument("--model", default="smollm2-135m", help="embedded model name, HF id or local directory")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chunk-size", type=int, default=None, help="prefill in chunks of N tokens (peak = budget + N)")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text and a table")

    # Subsystems own their subcommands: each module has add_parsers(sub) and registers handlers in COMMANDS.
    import importlib

    for module in ("bench.cli", "diagnose.cli"):
        try:
            importlib.import_module(f"{__package__}.{module}").add_parsers(sub)
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise
    return parser


@command("methods")
def _methods(args: argparse.Namespace) -> int:
    from .methods import list_methods

    table = Table(title="kvsieve methods")
    for col in ("name", "family", "paper", "needs", "positions"):
        table.add_column(col)
    for cls in list_methods():
        positions = "in cache (re-rotated)" if getattr(cls, "rerotate", False) is True else "original"
        table.add_row(cls.name, cls.family, cls.paper, cls.needs, positions)
    Console().print(table)
    return 0


@command("generate")
def _generate(args: argparse.Namespace) -> int:
    from .generation import generate
    from .models import load_model
    from .sieve import Sieve

    sieve = Sieve(args.method, compression=args.compression, budget=args.budget)  # validate before loading
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise KVSieveError(f"prompt file {args.prompt_file} does not exist; pass an existing file or --prompt")
        prompt = args.prompt_file.read_text()
    else:
        prompt = args.prompt
    model, tokenizer = load_model(args.model)
    result = generate(
        model, tokenizer, prompt, sieve, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
        chat=not args.raw,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    console = Console()
    console.print(result.text, markup=False, highlight=False)
    table = Table(title=f"{result.method} ({result.budget}), prompt {result.prompt_tokens} tokens")
    table.add_column("layer", justify="right")
    table.add_column("KV tokens kept")
    for i, kept in enumerate(result.kv_tokens):
        table.add_row(str(i), str(kept))
    console.print(table)
    console.print(
        f"KV bytes held: {result.kv_bytes:,}  prefill: {result.prefill_seconds:.3f} s  "
        f"decode: {result.decode_seconds_per_token * 1000:.1f} ms/token"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KVSieveError as err:
        print(f"kvsieve: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
