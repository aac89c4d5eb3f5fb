"""The benchmark: method x budget x task x length x mode, one JSON row per sample, resumable.

For each sample the context is prefilled ONCE (:class:`kvsieve.snapshot.PrefillSnapshot`); each method's compressed
cache is built from that observation, which is exactly what the method alone would have kept (the test suite checks
it). The question and answer are then run per method, with eviction paused, as in kvpress's protocol:

- query-agnostic (``agnostic``): the context is compressed before the question is seen;
- query-aware (``aware``): context and question are prefilled and compressed together.

Only the public API is used: tasks, models, ``Sieve``, ``PrefillSnapshot``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

import kvsieve

from ..errors import KVSieveError
from ..methods import Method, build
from ..sieve import Sieve
from ..snapshot import PrefillSnapshot, shareable
from ..tasks import DEFAULT_TASK_MIX, Sample, get_task

DEFAULT_METHODS = ["full", "streaming_llm", "h2o", "snapkv", "tova", "knorm", "random"]
DEFAULT_COMPRESSIONS = [0.25, 0.5, 0.75]


@dataclass
class BenchConfig:
    """Everything that defines a run; saved to ``out/config.json``."""

    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASK_MIX))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    compressions: list[float] = field(default_factory=lambda: list(DEFAULT_COMPRESSIONS))
    budgets: list[int] = field(default_factory=list)  # absolute token budgets, run besides the compressions
    lengths: list[int] = field(default_factory=lambda: [2048])
    samples: int = 2
    mode: str = "agnostic"
    seed: int = 0
    out: str = "bench-out"
    shared_prefill: bool = True
    command: str = ""

    @property
    def modes(self) -> list[str]:
        return ["agnostic", "aware"] if self.mode == "both" else [self.mode]

    def validate(self) -> None:
        if self.mode not in ("agnostic", "aware", "both"):
            raise KVSieveError(f"mode must be agnostic, aware or both, not {self.mode!r}")
        if self.samples < 1:
            raise KVSieveError("--samples must be at least 1")
        for length in self.lengths:
            if length < 256:
                raise KVSieveError(f"length {length} is too short for the tasks; use at least 256 tokens")
        for name in self.tasks:
            get_task(name)  # raises UnknownTaskError listing the tasks
        for spec in self.methods:
            method = build(spec)
            for budget in self.budget_specs(method):
                Sieve(method, **budget)  # raises BudgetError early, before any model is loaded

    def budget_specs(self, method: Method) -> list[dict]:
        """The budgets a method runs under: none for ``full``, else each compression and token budget."""
        if not method.evicts and not method.selects:
            return [{}]
        return [{"compression": c} for c in self.compressions] + [{"budget": b} for b in self.budgets]


@dataclass
class Prompt:
    """A sample's token ids split where the two modes differ."""

    context: torch.Tensor  # chat header + context
    question: torch.Tensor  # question + end of turn + assistant header
    answer_prefix: torch.Tensor


def split_prompt(tokenizer, sample: Sample) -> Prompt:
    """Wrap the sample in the chat template (if the tokenizer has one) and cut it at the question."""
    content = sample.context + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = content + "\n"
    cut = text.rindex(sample.question)

    def ids(s: str) -> torch.Tensor:
        return torch.tensor([tokenizer(s, add_special_tokens=False).input_ids], dtype=torch.long)

    prefix = sample.answer_prefix if sample.answer_prefix else ""
    return Prompt(ids(text[:cut]), ids(text[cut:]), ids(prefix) if prefix else torch.zeros((1, 0), dtype=torch.long))


def _versions() -> dict:
    return {"kvsieve": kvsieve.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def row_key(row: dict) -> tuple:
    """What makes a row unique; rows already in results.jsonl are skipped when a run resumes."""
    return (
        row["model"], row["task"], row["length"], row["sample"], row["seed"], row["mode"], row["method"],
        row["compression"], row["budget_tokens"],
    )


class Runner:
    """Runs a :class:`BenchConfig`, appending rows to ``out/results.jsonl``."""

    def __init__(self, config: BenchConfig, model=None, tokenizer=None):
        config.validate()
        self.config = config
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.done = {row_key(r) for r in _read_rows(self.results)}
        if model is None:
            from ..models import load_model

            model, tokenizer = load_model(config.model)
        self.model, self.tokenizer = model, tokenizer
        self.methods = [build(spec) for spec in config.methods]
        self.eos = _eos_ids(model, tokenizer)
        self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")

    def samples(self) -> Iterator[tuple[int, int, Sample]]:
        """(length, index, sample) for every task and length, generated deterministically from the seed."""
        c = self.config
        for length in c.lengths:
            for name in c.tasks:
                generated = get_task(name).generate(self.tokenizer, length=length, n=c.samples, seed=c.seed)
                for i, sample in enumerate(generated):
                    yield length, i, sample

    def units(self) -> int:
        c = self.config
        per_sample = sum(len(c.budget_specs(m)) for m in self.methods)
        return per_sample * len(c.modes) * len(c.tasks) * len(c.lengths) * c.samples

    def run(self, progress=None) -> list[dict]:
        self._write_config()
        rows = []
        for length, index, sample in self.samples():
            for mode in self.config.modes:
                rows += self._run_sample(length, index, sample, mode, progress)
        return rows

    def _run_sample(self, length: int, index: int, sample: Sample, mode: str, progress) -> list[dict]:
        todo = []
        for method in self.methods:
            for budget in self.config.budget_specs(method):
                row = self._row_stub(length, index, sample, mode, method, budget)
                if row_key(row) in self.done:
                    if progress:
                        progress()
                    continue
                todo.append((method, budget, row))
        if not todo:
            return []
        prompt = split_prompt(self.tokenizer, sample)
        if mode == "agnostic":
            prefill_ids, follow = prompt.context, torch.cat([prompt.question, prompt.answer_prefix], dim=1)
        else:
            prefill_ids, follow = torch.cat([prompt.context, prompt.question], dim=1), prompt.answer_prefix
        snapshot = None
        shared = [m for m, _, _ in todo if shareable(m)] if self.config.shared_prefill else []
        if shared:
            snapshot = PrefillSnapshot(self.model, prefill_ids, shared)
        out = []
        for method, budget, row in todo:
            sieve = Sieve(method, **budget)
            use_snapshot = snapshot is not None and shareable(method)
            with sieve.attach(self.model) as fresh:
                t0 = time.perf_counter()
                if use_snapshot:
                    cache = snapshot.compress(method, sieve.budget if method.evicts else None)
                    prefill_seconds = snapshot.prefill_seconds + (time.perf_counter() - t0)
                    logits = snapshot.last_logits
                else:
                    cache = fresh
                    logits = kvsieve.prefill(self.model, prefill_ids, cache)
                    prefill_seconds = time.perf_counter() - t0
                kv_bytes, kv_tokens = cache.kv_bytes(), _mean_tokens(cache)
                text, decode_seconds = self._answer(cache, follow, logits, sample)
            row.update(
                score=get_task(sample.task).score(sample, text),
                prediction=text,
                context_tokens=int(prefill_ids.shape[1]),
                kv_tokens=kv_tokens,
                kv_bytes=kv_bytes,
                kv_bytes_full=_full_bytes(self.model, int(prefill_ids.shape[1])),
                prefill_seconds=prefill_seconds,
                decode_seconds_per_token=decode_seconds,
                shared_prefill=use_snapshot,
                timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            self._append(row)
            out.append(row)
            if progress:
                progress()
        return out

    @torch.no_grad()
    def _answer(self, cache, follow: torch.Tensor, logits: torch.Tensor, sample: Sample) -> tuple[str, float | None]:
        """Append the follow-up tokens without eviction, then decode greedily; returns text and s/token (None when
        no decoding step ran).

        Decoding stops at end of sequence, after ``sample.max_new_tokens`` tokens, or as soon as the task says more
        text cannot change the score (string match: every answer already found), which gives the same score as
        decoding on and saves most of the time of a correct answer followed by chatter.
        """
        task = get_task(sample.task)
        new: list[int] = []
        text = ""
        with cache.paused():
            if follow.shape[1]:
                logits = self.model(follow, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            t0 = time.perf_counter()
            steps = 0
            for _ in range(sample.max_new_tokens):
                token = int(logits[0].argmax())
                if token in self.eos:
                    break
                new.append(token)
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if len(new) == sample.max_new_tokens or task.settled(sample, text):
                    break
                logits = self.model(
                    torch.tensor([[token]]), past_key_values=cache, use_cache=True, logits_to_keep=1
                ).logits[:, -1]
                steps += 1
            seconds = (time.perf_counter() - t0) / steps if steps else None
        return text, seconds

    def _row_stub(self, length, index, sample: Sample, mode, method: Method, budget: dict) -> dict:
        return {
            "run_id": self.run_id,
            "model": self.config.model,
            "method": method.spec(),
            "method_params": method.params(),
            "compression": float(budget.get("compression", 0.0)),
            "budget_tokens": budget.get("budget"),
            "task": sample.task,
            "length": length,
            "depth": sample.depth,
            "mode": mode,
            "sample": index,
            "seed": self.config.seed,
            "answers": list(sample.answers),
            "versions": _versions(),
        }

    def _append(self, row: dict) -> None:
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.done.add(row_key(row))

    def _write_config(self) -> None:
        config = asdict(self.config)
        config.update(
            versions=_versions(),
            machine={
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "cpu_threads": torch.get_num_threads(),
            },
        )
        (self.out / "config.json").write_text(json.dumps(config, indent=2))


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line; that sample is simply redone
    return rows


def _mean_tokens(cache) -> float:
    per_layer = [sum(t) / len(t) if isinstance(t, list) else t for t in cache.kv_tokens()]
    return float(sum(per_layer) / max(1, len(per_layer)))


def _full_bytes(model, tokens: int) -> int:
    """Bytes an uncompressed cache would hold for ``tokens`` tokens (sliding layers capped at their window)."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    size = torch.finfo(model.dtype).bits // 8
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    total = 0
    for kind in layer_types:
        held = min(tokens, text.sliding_window - 1) if kind == "sliding_attention" else tokens
        total += held * text.num_key_value_heads * head_dim * 2 * size
    return total


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple, set)) else {int(eos)}
