"""Streaming perplexity far past the model's window, as in StreamingLLM's figure.

The text is fed ``chunk`` tokens at a time; every token's negative log-likelihood is recorded and averaged per
bucket of ``bucket`` tokens. With ``chunk=1`` this is the paper's token-by-token evaluation; with ``chunk=c`` a token
sees between ``budget`` and ``budget + c - 1`` earlier tokens (the cache is compressed after each chunk), which is
what makes 100k tokens feasible on a CPU. ``full`` runs plain transformers with a growing cache (no kvsieve), the
baseline that fails past the window; it stops at ``dense_limit`` tokens because its cost grows quadratically.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..cli import command
from ..sieve import Sieve


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
        rows = []
        for start in range(0, len(self.nll_per_token), size):
            part = self.nll_per_token[start : start + size]
            nll = sum(part) / len(part)
            rows.append({
                "method": self.method, "budget": self.budget, "bucket_start": start + 1,
                "bucket_end": start + len(part), "nll": nll, "ppl": math.exp(nll), "kv_tokens": self.kv_tokens,
            })
        return rows


@torch.no_grad()
def stream_nll(model, ids: torch.Tensor, spec: str, budget: int | None, chunk: int, limit: int | None = None,
               on_chunk=None) -> StreamResult:
    """Per-token NLL of ``ids`` (1, N) under method ``spec`` ("full" = plain transformers, dense)."""
    n = ids.shape[1] if limit is None else min(limit, ids.shape[1])
    if spec == "full":
        context, cache = nullcontext(), DynamicCache(config=model.config)
    else:
        sieve = Sieve(spec, budget=budget)
        context = sieve.attach(model)
    nll: list[float] = []
    t0 = time.perf_counter()
    with context as sieve_cache:
        cache = sieve_cache if sieve_cache is not None else cache
        carry = None  # the last logits of the previous chunk predict this chunk's first token
        for start in range(0, n, chunk):
            piece = ids[:, start : min(start + chunk, n)]
            logits = model(piece, past_key_values=cache, use_cache=True).logits.float()
            preds = logits[:, :-1] if carry is None else torch.cat([carry, logits[:, :-1]], dim=1)
            targets = piece if carry is not None else piece[:, 1:]
            if targets.shape[1]:
                nll += F.cross_entropy(preds[0], targets[0], reduction="none").tolist()
            carry = logits[:, -1:]
            if on_chunk:
                on_chunk(piece.shape[1])
        kv_tokens = cache.get_seq_length() if spec == "full" else max(cache.kv_tokens())
    return StreamResult(spec, budget, n, nll, int(kv_tokens), time.perf_counter() - t0)


def add_stream_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "stream",
        help="streaming perplexity over 100k+ tokens with a fixed KV budget",
        description="Per-token NLL over natural text far past the model's window, per bucket of tokens; writes "
        "OUT/streaming.jsonl (and the report's streaming chart). 'full' is plain dense attention, the failing "
        "baseline.",
    )
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--methods", default="full,streaming_llm,streaming_llm(n_sink=0)",
                   help="comma-separated specs; streaming_llm(n_sink=0) is a plain recent window "
                   "(default: %(default)s)")
    s.add_argument("--budget", type=int, default=1024, help="KV tokens kept per layer (default: %(default)s)")
    s.add_argument("--tokens", type=int, default=100_000, help="tokens of text to stream (default: %(default)s)")
    s.add_argument("--chunk-size", type=int, default=128, help="tokens per forward pass; 1 is token by token")
    s.add_argument("--bucket", type=int, default=1000, help="tokens per perplexity bucket (default: %(default)s)")
    s.add_argument("--dense-limit", type=int, default=12_000, help="stop dense 'full' after this many tokens")
    s.add_argument("--text", default="pydoc", help="haystack name (pydoc, licenses) or a text file path")
    s.add_argument("--out", default="stream-out")


@command("stream")
def _stream(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from ..errors import KVSieveError
    from ..models import load_model
    from ..tasks import load_haystack
    from .cli import _names

    path = Path(args.text)
    text = path.read_text() if path.is_file() else load_haystack(args.text)
    model, tokenizer = load_model(args.model)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    if ids.shape[1] < args.tokens:
        raise KVSieveError(f"the text has {ids.shape[1]} tokens, fewer than --tokens {args.tokens}; lower --tokens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=console) as progress:
        for spec in _names(args.methods):
            limit = min(args.tokens, args.dense_limit) if spec == "full" else args.tokens
            task = progress.add_task(spec, total=limit)
            budget = None if spec == "full" else args.budget
            results.append(stream_nll(model, ids, spec, budget, args.chunk_size, limit,
                                      on_chunk=lambda k, t=task: progress.advance(t, k)))
    with (out / "streaming.jsonl").open("w") as f:
        for result in results:
            for row in result.buckets(args.bucket):
                f.write(json.dumps(row) + "\n")
    window = model.config.get_text_config().max_position_embeddings
    table = Table(title=f"streaming perplexity, budget {args.budget}, chunk {args.chunk_size} (window {window})")
    for col in ("method", "tokens", "ppl 1-4k", f"ppl {window // 1000}k-{window // 1000 + 4}k", "ppl last 4k",
                "ppl all", "KV tokens", "s/1k tokens"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.method, f"{r.tokens:,}", f"{r.ppl(0, 4000):.2f}", f"{r.ppl(window, window + 4000):.2f}",
            f"{r.ppl(r.tokens - 4000):.2f}", f"{r.ppl():.2f}", f"{r.kv_tokens:,}", f"{1000 * r.seconds / r.tokens:.2f}",
        )
    console.print(table)
    from .report import write_report

    console.print(f"rows: {out / 'streaming.jsonl'}  report: {write_report(out)}")
    return 0
