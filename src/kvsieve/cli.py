"""The ``kvsieve`` command line: ``methods``, ``generate``, ``tasks``, ``bench``, ``report``, ``stream``, ``diagnose``.

Building the parser and printing ``--help`` import nothing heavy: torch, transformers, the models and the method
registry load inside the subcommand that needs them. Bad input ends in one line ``kvsieve: error: <problem>; <fix>``
on stderr and exit code 2, checked before any model loads where the check needs no model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import KVSieveError

if TYPE_CHECKING:
    from rich.console import Console

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}

DEFAULT_METHOD = "full"
DEFAULT_MAX_NEW_TOKENS = 64


def command(name: str):
    def wrap(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return wrap


def stdout_console() -> Console:
    """A rich console for stdout. A terminal gets rich's layout at its width; a pipe or a file gets every value in
    full (no width limit, so tables are never cut or wrapped, and no colour codes)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=100_000, no_color=True, highlight=False)


def read_text_file(path: Path, flag: str) -> str:
    """The UTF-8 text of ``path``; a KVSieveError naming ``flag`` when it is missing, a directory, unreadable,
    binary or empty (whitespace only)."""
    if path.is_dir():
        raise KVSieveError(f"{flag} {path} is a directory, not a file; pass a text file")
    if not path.exists():
        raise KVSieveError(f"{flag} {path} does not exist; pass an existing text file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KVSieveError(f"cannot read {flag} {path} ({err.strerror or err}); pass a readable text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KVSieveError(
            f"{flag} {path} is not UTF-8 text (byte {err.start} is {data[err.start : err.start + 1]!r}); "
            "pass a text file, or convert it with e.g. iconv -t UTF-8"
        ) from None
    if "\x00" in text:
        raise KVSieveError(f"{flag} {path} holds NUL bytes, so it is binary, not text; pass a text file")
    if not text.strip():
        raise KVSieveError(f"{flag} {path} is empty; pass a file with some text in it")
    return text


def at_least(minimum: int, what: str = "a whole number") -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``; anything else is reported as ``kvsieve: error`` by :func:`main`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its messages
    return parse


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compression", type=float, help="fraction of KV tokens removed, in [0, 1) (0.5 keeps half)")
    group.add_argument("--budget", type=int, help="tokens kept per layer and head, at every step (streaming cap)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in kvsieve's one-line form (``kvsieve: error: ...``, exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        where = self.prog.removeprefix("kvsieve").strip()
        self.exit(2, f"kvsieve: error: {where + ': ' if where else ''}{message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvsieve",
        description="Find the tokens a transformer needs and act on it: KV-cache compression and its benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    methods = sub.add_parser("methods", help="list the registered methods")
    methods.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line and method: name, family, paper, needs, kind, simplifications, fields",
    )
    methods.add_argument(
        "--markdown", action="store_true", help="the README's method tables (generated from the registry)"
    )

    gen = sub.add_parser("generate", help="generate text with a compressed KV cache")
    gen.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help="method spec, e.g. snapkv, h2o(recent=0.25), adakv:snapkv (default: %(default)s)",
    )
    _add_budget_args(gen)
    gen.add_argument(
        "--model", default="smollm2-135m", help="embedded model name, HF id or local directory (default: %(default)s)"
    )
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="UTF-8 text file holding the prompt")
    gen.add_argument(
        "--max-new-tokens",
        type=at_least(1),
        default=DEFAULT_MAX_NEW_TOKENS,
        help="tokens to generate at most (default: %(default)s)",
    )
    gen.add_argument(
        "--chunk-size",
        type=at_least(1),
        default=None,
        help="prefill in chunks of N tokens (peak = budget + N; default: the whole prompt at once)",
    )
    gen.add_argument(
        "--interval",
        type=at_least(1),
        default=None,
        help="with --budget: decoding steps between evictions (held <= budget + interval - 1; 1 holds exactly the "
        "budget at every step; default 16)",
    )
    gen.add_argument(
        "--prefill", default=None, help="attention-compute method for the prefill, e.g. flexprefill(gamma=0.9)"
    )
    gen.add_argument(
        "--sequence", default=None, help="token-pruning method inside the forward pass, e.g. fastv(layer=2, keep=0.5)"
    )
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text and a table")

    # Subsystems own their subcommands: each module has add_parsers(sub) and registers handlers in COMMANDS.
    import importlib

    for module in ("bench.cli", "diagnose.cli", "explain.cli"):
        try:
            importlib.import_module(f"{__package__}.{module}").add_parsers(sub)
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise
    return parser


@command("methods")
def _methods(args: argparse.Namespace) -> int:
    from .catalog import markdown_tables, records

    if args.markdown:
        print(markdown_tables(), end="")
        return 0
    records = records()
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    from rich.table import Table

    table = Table(title="kvsieve methods")
    for col in ("name", "kind", "family", "paper", "needs", "positions"):
        table.add_column(col)
    for r in records:
        table.add_row(r["name"], r["kind"], r["family"], r["paper"], r["needs"], r["positions"])
    stdout_console().print(table)
    return 0


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool):
    """The prompt's token ids ``(1, n)``, wrapped in the tokenizer's chat template when ``chat`` (as generate does)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids


def progress(message: str):
    """A context that shows ``message`` while the work inside runs: a spinner on a terminal, else one plain line on
    stderr (logs and CI show what the process is doing)."""
    from contextlib import nullcontext

    if sys.stderr.isatty():
        from rich.console import Console

        return Console(stderr=True).status(message)
    print(f"kvsieve: {message}", file=sys.stderr, flush=True)
    return nullcontext()


@command("generate")
def _generate(args: argparse.Namespace) -> int:
    # Every argument is checked before the model loads.
    from .sieve import Sieve

    sieve = Sieve(
        args.method,
        compression=args.compression,
        budget=args.budget,
        interval=args.interval,
        prefill=args.prefill,
        sequence=args.sequence,
    )
    if args.prompt_file is not None:
        prompt = read_text_file(args.prompt_file, "--prompt-file")
    else:
        prompt = args.prompt
        if not prompt.strip():
            raise KVSieveError("the prompt is empty; pass some text with --prompt, or a file with --prompt-file")

    from .generation import generate
    from .models import load_model

    model, tokenizer = load_model(args.model)
    ids = _prompt_ids(tokenizer, prompt, chat=not args.raw)
    with progress(f"prefilling {ids.shape[1]:,} tokens, then generating up to {args.max_new_tokens:,}..."):
        result = generate(model, tokenizer, ids, sieve, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    from rich.table import Table

    console = stdout_console()
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
    """Run one command; returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed in one line
        return done.code if isinstance(done.code, int) else 0
    try:
        return COMMANDS[args.command](args)
    except KVSieveError as err:
        print(f"kvsieve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvsieve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`kvsieve methods | head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    # `python -m kvsieve.cli`: run the imported module, whose COMMANDS the subcommand modules register into.
    from kvsieve.cli import main as _main

    sys.exit(_main())
