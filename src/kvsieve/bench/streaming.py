"""Streaming perplexity far past the model's window, as in StreamingLLM's figure.

The text is fed ``chunk`` tokens at a time; every token's negative log-likelihood is recorded and averaged per
bucket of ``bucket`` tokens. With ``chunk=1`` this is the paper's token-by-token evaluation; with ``chunk=c`` a token
sees between ``budget`` and ``budget + c - 1`` earlier tokens (the cache is compressed after each chunk), which is
what makes 100k tokens feasible on a CPU. ``full`` runs plain transformers with a growing cache (no kvsieve), the
baseline that fails past the window; it stops at ``dense_limit`` tokens because its cost grows quadratically.

Rows are written one per bucket as soon as the bucket is complete (:mod:`kvsieve.bench.results`: whole, synced), so a
killed run keeps every finished bucket. A rerun with the same settings skips the methods whose buckets are all there;
a method cut off mid-stream is streamed again from its first token (its cache at token t depends on every earlier
token), writing only the buckets that are missing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvsieve

from ..errors import KVSieveError
from ..sieve import Sieve
from .results import ResultsFile

STREAM_FILE = "streaming.jsonl"
SETTINGS = ("model", "text", "chunk_size", "bucket")  # rows of one file share these


@dataclass
class StreamResult:
    method: str
    budget: int | None
    tokens: int
    nll_per_token: list[float]
    kv_tokens: int
    seconds: float

    def ppl(self, start: int = 0, stop: int | None = None) -> float:
        chunk = self.nll_per_token[start:stop]
        return math.exp(sum(chunk) / len(chunk)) if chunk else float("nan")

    def buckets(self, size: int) -> list[dict]:
        return [
            bucket_row(self.method, self.budget, self.nll_per_token, s, size, self.kv_tokens)
            for s in range(0, len(self.nll_per_token), size)
        ]


def bucket_row(
    method: str,
    budget: int | None,
    nll: list[float],
    start: int,
    size: int,
    kv_tokens: int,
    seconds: float | None = None,
) -> dict:
    """The row of the bucket of predicted tokens ``start .. start + size`` (0-based; reported 1-based)."""
    part = nll[start : start + size]
    mean = sum(part) / len(part)
    row = {
        "method": method,
        "budget": budget,
        "bucket_start": start + 1,
        "bucket_end": start + len(part),
        "nll": mean,
        "ppl": math.exp(mean),
        "kv_tokens": kv_tokens,
    }
    if seconds is not None:
        row["seconds"] = seconds  # wall time of the chunks that completed this bucket
    return row


@torch.no_grad()
def stream_nll(
    model,
    ids: torch.Tensor,
    spec: str,
    budget: int | None,
    chunk: int,
    limit: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    bucket: int | None = None,
    on_bucket: Callable[[dict], None] | None = None,
) -> StreamResult:
    """Per-token NLL of ``ids`` (1, N) under method ``spec`` ("full" = plain transformers, dense).

    ``on_bucket(row)`` receives each bucket of ``bucket`` predicted tokens as soon as it is complete (the last one,
    possibly shorter, at the end).
    """
    n = ids.shape[1] if limit is None else min(limit, ids.shape[1])
    if spec == "full":
        context, cache = nullcontext(), DynamicCache(config=model.config)
    else:
        sieve = Sieve(spec, budget=budget)
        context = sieve.attach(model)
    nll: list[float] = []
    emitted = 0
    t0 = last = time.perf_counter()

    def held() -> int:
        return int(cache.get_seq_length() if spec == "full" else max(cache.kv_tokens()))

    with context as sieve_cache:
        cache = sieve_cache if sieve_cache is not None else cache
        carry = None  # the last logits of the previous chunk predict this chunk's first token
        for start in range(0, n, chunk):
            piece = ids[:, start : min(start + chunk, n)]
            logits = model(piece, **kvsieve.cache_kwargs(model, cache), use_cache=True).logits.float()
            preds = logits[:, :-1] if carry is None else torch.cat([carry, logits[:, :-1]], dim=1)
            targets = piece if carry is not None else piece[:, 1:]
            if targets.shape[1]:
                nll += F.cross_entropy(preds[0], targets[0], reduction="none").tolist()
            carry = logits[:, -1:]
            while bucket and on_bucket and len(nll) - emitted >= bucket:
                now = time.perf_counter()
                on_bucket(bucket_row(spec, budget, nll, emitted, bucket, held(), now - last))
                emitted, last = emitted + bucket, now
            if on_chunk:
                on_chunk(piece.shape[1])
        if bucket and on_bucket and len(nll) > emitted:
            on_bucket(bucket_row(spec, budget, nll, emitted, bucket, held(), time.perf_counter() - last))
        kv_tokens = held()
    return StreamResult(spec, budget, n, nll, kv_tokens, time.perf_counter() - t0)


def stream_key(row: dict) -> tuple:
    return (row.get("method"), row.get("budget"), row.get("bucket_start"), row.get("bucket_end"))


def expected_buckets(tokens: int, bucket: int) -> list[tuple[int, int]]:
    """(start, end), 1-based, of the buckets of a stream of ``tokens`` tokens (``tokens - 1`` are predicted)."""
    predicted = tokens - 1
    return [(s + 1, min(s + bucket, predicted)) for s in range(0, predicted, bucket)]


def run_stream(
    model,
    ids: torch.Tensor,
    specs: list[str],
    *,
    out: Path,
    budget: int,
    chunk: int,
    bucket: int,
    tokens: int,
    dense_limit: int,
    settings: dict,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict]:
    """Stream every method into ``out/streaming.jsonl``, resuming: returns all rows of these methods, old and new.

    ``settings`` (model, text, chunk_size, bucket) go into every row; a file holding rows of other settings is refused.
    ``progress(spec, advance, total)`` is told of the tokens streamed.
    """
    file = ResultsFile(out / STREAM_FILE)
    recovery = file.recover()
    if recovery:
        print(f"kvsieve: note: {recovery.message(file.path)}", file=sys.stderr)
    rows = file.rows()
    for row in rows:
        other = {k: row.get(k) for k in SETTINGS}
        if other != {k: settings[k] for k in SETTINGS}:
            what = "rows of an older kvsieve, without their settings" if not any(other.values()) else other
            raise KVSieveError(f"{file.path} holds a stream with other settings ({what}); pass another --out or "
                               "delete that file")  # fmt: skip
    done = {stream_key(r) for r in rows}
    for spec in specs:
        limit = min(tokens, dense_limit) if spec == "full" else tokens
        method_budget = None if spec == "full" else budget
        wanted = [(spec, method_budget, s, e) for s, e in expected_buckets(limit, bucket)]
        if all(key in done for key in wanted):
            if progress:
                progress(spec, limit, limit)
            continue

        def write(row: dict) -> None:
            if stream_key(row) not in done:  # a bucket written before the interruption is kept, not repeated
                row.update(settings)
                file.append(row)
                done.add(stream_key(row))
                rows.append(row)

        def tick(k: int, spec: str = spec, limit: int = limit) -> None:
            if progress:
                progress(spec, k, limit)

        stream_nll(model, ids, spec, method_budget, chunk, limit, on_chunk=tick, bucket=bucket, on_bucket=write)
    return [r for r in rows if r.get("method") in specs]


def ppl_between(rows: list[dict], start: int, stop: int | None = None) -> float:
    """Perplexity over the buckets lying within tokens ``start+1 .. stop`` (weighted by bucket size)."""
    inside = [r for r in rows if r["bucket_start"] > start and (stop is None or r["bucket_end"] <= stop)]
    n = sum(r["bucket_end"] - r["bucket_start"] + 1 for r in inside)
    if not n:
        return float("nan")
    return math.exp(sum(r["nll"] * (r["bucket_end"] - r["bucket_start"] + 1) for r in inside) / n)


def check_stream_args(args: argparse.Namespace) -> list[str]:
    """Every check that needs no model; returns the method specs."""
    from .cli import _names

    for flag, value, least in (
        ("--tokens", args.tokens, 2),
        ("--chunk-size", args.chunk_size, 1),
        ("--bucket", args.bucket, 1),
        ("--dense-limit", args.dense_limit, 2),
    ):
        if value < least:
            raise KVSieveError(f"{flag} must be at least {least}, not {value}; e.g. {flag} {max(least, 1000)}")
    specs = _names(args.methods)
    if not specs:
        raise KVSieveError("--methods is empty; pass at least one, e.g. --methods full,streaming_llm")
    for spec in specs:
        if spec != "full":
            Sieve(spec, budget=args.budget)  # BudgetError for --budget 0, unknown methods, bad hyperparameters
    return specs


def read_text(source: str) -> str:
    from ..tasks import load_haystack

    path = Path(source)
    if path.is_dir():
        raise KVSieveError(f"--text {source} is a directory; pass a text file or a haystack name (pydoc, licenses)")
    if not path.is_file():
        return load_haystack(source)  # UnknownHaystackError names the haystacks
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KVSieveError(f"--text {source} is not UTF-8 text; pass a plain text file") from None


def stream_command(args: argparse.Namespace) -> int:
    """``kvsieve stream`` (registered by :mod:`kvsieve.bench.cli`, which imports this module only when it runs)."""
    from rich.console import Console
    from rich.table import Table

    from ..models import load_model, load_tokenizer
    from .progress import progress
    from .results import prepare_out_dir

    specs = check_stream_args(args)
    text = read_text(args.text)
    out = prepare_out_dir(args.out)
    tokenizer = load_tokenizer(args.model)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    if ids.shape[1] < args.tokens:
        raise KVSieveError(f"the text has {ids.shape[1]} tokens, fewer than --tokens {args.tokens}; lower --tokens")
    model, _ = load_model(args.model)
    settings = {"model": args.model, "text": args.text, "chunk_size": args.chunk_size, "bucket": args.bucket}
    total = sum(min(args.tokens, args.dense_limit) if s == "full" else args.tokens for s in specs)
    with progress("stream", total) as advance:
        rows = run_stream(
            model,
            ids,
            specs,
            out=out,
            budget=args.budget,
            chunk=args.chunk_size,
            bucket=args.bucket,
            tokens=args.tokens,
            dense_limit=args.dense_limit,
            settings=settings,
            progress=lambda _spec, k, _total: advance(k),
        )
    window = model.config.get_text_config().max_position_embeddings
    table = Table(title=f"streaming perplexity, budget {args.budget}, chunk {args.chunk_size} (window {window})")
    for col in (
        "method",
        "tokens",
        "ppl 1-4k",
        f"ppl {window // 1000}k-{window // 1000 + 4}k",
        "ppl last 4k",
        "ppl all",
        "KV tokens",
        "s/1k tokens",
    ):
        table.add_column(col)
    for spec in specs:
        mine = sorted((r for r in rows if r["method"] == spec), key=lambda r: r["bucket_start"])
        if not mine:
            continue
        end = mine[-1]["bucket_end"]
        table.add_row(
            spec,
            f"{end + 1:,}",
            f"{ppl_between(mine, 0, 4000):.2f}",
            f"{ppl_between(mine, window, window + 4000):.2f}",
            f"{ppl_between(mine, max(0, end - 4000)):.2f}",
            f"{ppl_between(mine, 0):.2f}",
            f"{mine[-1]['kv_tokens']:,}",
            f"{1000 * sum(r.get('seconds') or 0.0 for r in mine) / end:.2f}",
        )
    console = Console()
    console.print(table)
    from .report import write_report

    console.print(f"rows: {out / STREAM_FILE}  report: {write_report(out)}")
    return 0
