"""The benchmark: method x budget x task x length x mode, one JSON row per sample and question, resumable.

For each sample the context is prefilled ONCE (:class:`kvsieve.snapshot.PrefillSnapshot`); each method's compressed
cache is built from that observation, which is exactly what the method alone would have kept (the test suite checks
it). The question and answer are then run per method, with eviction paused, as in kvpress's protocol:

- query-agnostic (``agnostic``): the context is compressed before the question is seen;
- query-aware (``aware``): context and question are prefilled and compressed together.

The sweep is cut into work units (:mod:`kvsieve.bench.units`); :class:`Runner` plans them, skipping rows already in
``results.jsonl``, runs them here or on Ray workers (:mod:`kvsieve.bench.distributed`) and alone writes the rows,
each whole and synced (:mod:`kvsieve.bench.results`), so a crash or a lost worker costs at most unfinished rows.

Only the public API is used: tasks, models, ``Sieve``, ``PrefillSnapshot``.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..errors import BudgetError, ContextLengthError, KVSieveError
from ..methods import Method, build
from ..sieve import Sieve
from ..snapshot import shareable
from ..tasks import DEFAULT_TASK_MIX, ImageTask, Sample, get_task
from .defaults import DEFAULT_COMPRESSIONS, DEFAULT_METHODS, HEADROOM, PRESETS
from .results import Recovery, ResultsFile, prepare_out_dir
from .units import TURN_MODES, Conversation, Job, RunInfo, UnitRunner, WorkUnit, versions

__all__ = ["DEFAULT_COMPRESSIONS", "DEFAULT_METHODS", "HEADROOM", "PRESETS", "BenchConfig", "Runner", "row_key"]

ModelLoader = Callable[[str], tuple[Any, Any]]
"""``loader(device) -> (model, tokenizer)``; picklable, as Ray workers call it in their own process."""


@dataclass
class EmbeddedLoader:
    """Loads a model by name (embedded, local directory or hub id) with :func:`kvsieve.load_model`."""

    name: str

    def __call__(self, device: str = "cpu"):
        from ..models import load_model

        return load_model(self.name, device=device)


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
    turns: str = "independent"  # multi-question tasks: independent, multiturn or both
    prefills: list[str] = field(default_factory=list)  # attention-compute axis ("dense" = the default compute)
    sequences: list[str] = field(default_factory=list)  # sequence axis ("none" = no pruning)
    seed: int = 0
    out: str = "bench-out"
    shared_prefill: bool = True
    command: str = ""

    @property
    def modes(self) -> list[str]:
        return ["agnostic", "aware"] if self.mode == "both" else [self.mode]

    @property
    def turn_modes(self) -> list[str]:
        return list(TURN_MODES) if self.turns == "both" else [self.turns]

    def validate(self, window: int | None = None) -> None:
        """Every check that needs no model; ``window``: the model's context window, when known."""
        if self.mode not in ("agnostic", "aware", "both"):
            raise KVSieveError(f"mode must be agnostic, aware or both, not {self.mode!r}")
        if self.turns not in (*TURN_MODES, "both"):
            raise KVSieveError(f"turns must be independent, multiturn or both, not {self.turns!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise KVSieveError(f"--samples must be a whole number of at least 1, not {self.samples!r}")
        for name, values, example in (
            ("--tasks", self.tasks, "passkey,qa"),
            ("--methods", self.methods, "full,snapkv"),
            ("--lengths", self.lengths, "2048"),
        ):
            if not values:
                raise KVSieveError(f"{name} is empty; pass at least one, e.g. {name} {example}")
        for length in self.lengths:
            if length < 256:
                raise KVSieveError(f"length {length} is too short for the tasks; use at least 256 tokens")
            if window is not None and length + HEADROOM > window:
                raise ContextLengthError(
                    f"length {length} does not fit {self.model}'s window of {window} tokens (context, question, "
                    f"chat template and answer must fit); use --lengths up to {window - HEADROOM}"
                )
        for name in self.tasks:
            get_task(name)  # raises UnknownTaskError listing the tasks
        for spec in self.methods:
            method = build(spec)
            specs = self.budget_specs(method)
            if not specs:
                raise BudgetError(f"{spec} needs a budget, but --compression and --budgets are both empty; pass one")
            for budget in specs:
                for axes in self.axes():
                    Sieve(method, **budget, **axes)  # raises early, before any model is loaded

    def axes(self) -> list[dict]:
        """The attention-compute x sequence settings every method x budget runs under (``{}``: the defaults)."""
        prefills = [None if p.strip() == "dense" else p for p in self.prefills] or [None]
        sequences = [None if s.strip() == "none" else s for s in self.sequences] or [None]
        out = []
        for prefill in dict.fromkeys(prefills):
            for sequence in dict.fromkeys(sequences):
                axes = {}
                if prefill is not None:
                    axes["prefill"] = build(prefill).spec()
                if sequence is not None:
                    axes["sequence"] = build(sequence).spec()
                out.append(axes)
        return out

    def budget_specs(self, method: Method) -> list[dict]:
        """The budgets a method runs under: none for ``full``, else each compression and token budget."""
        if not method.evicts and not method.selects:
            return [{}]
        return [{"compression": c} for c in self.compressions] + [{"budget": b} for b in self.budgets]


def check_image_tasks(config: BenchConfig, model=None) -> None:
    """Image tasks need a vision-language model, and a prefill that sees the images (no method that re-reads the
    context after the prefill): a one-line error before any weights are loaded."""
    images = [name for name in config.tasks if isinstance(get_task(name), ImageTask)]
    if not images:
        return
    from ..models import EMBEDDED_MODELS, is_vision_language, load_config
    from ..reconstruction import post_prefill_method

    if model is not None:
        vision = is_vision_language(model.config)
    elif config.model in EMBEDDED_MODELS:
        vision = False
    else:
        try:
            vision = is_vision_language(load_config(config.model))
        except KVSieveError:
            vision = True  # an unreachable config is reported by load_model, with its own message
    if not vision:
        raise KVSieveError(
            f"{', '.join(images)} {'needs' if len(images) == 1 else 'need'} a vision-language model and "
            f"{config.model} is a text model; pass --model with "
            "an image-text-to-text model id or directory (e.g. llava-hf/llava-1.5-7b-hf), or drop the image tasks"
        )
    for spec in config.methods:
        if post_prefill_method(build(spec)) is not None:
            raise KVSieveError(f"{spec} re-reads the context after the prefill, which kvsieve does not do with images; "
                               "run it on text tasks only")  # fmt: skip


def model_window(name: str) -> int | None:
    """The context window of model ``name`` read from its config alone (no weights); None when unknown here.

    Embedded models and local directories are read offline; a hub id is checked once loaded.
    """
    from transformers import AutoConfig

    from ..models import EMBEDDED_MODELS, converted_dir, gguf_path

    try:
        if name in EMBEDDED_MODELS:
            folder = converted_dir(name)
            if (folder / "config.json").is_file():
                config = AutoConfig.from_pretrained(folder, local_files_only=True)
            else:  # not converted yet: the GGUF header has the same numbers
                gguf = gguf_path(name)
                config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        elif Path(name).expanduser().is_dir():
            config = AutoConfig.from_pretrained(Path(name).expanduser(), local_files_only=True)
        else:
            return None
    except (OSError, ValueError, KeyError):
        return None  # an unreadable config is reported by load_model, with its own message
    return getattr(config.get_text_config(), "max_position_embeddings", None)


@dataclass
class Prompt:
    """A sample's token ids split where the two modes differ."""

    context: torch.Tensor  # chat header + context
    question: torch.Tensor  # question + end of turn + assistant header
    answer_prefix: torch.Tensor


def split_prompt(tokenizer, sample: Sample) -> Prompt:
    """Wrap the sample in the chat template (if the tokenizer has one) and cut it at the question."""
    talk = Conversation(tokenizer, sample)
    context, question = talk.first_turn(0)
    return Prompt(context, question, talk.prefix(0))


def row_key(row: dict) -> tuple:
    """What makes a row unique; rows already in results.jsonl are skipped when a run resumes."""
    return (
        row["model"],
        row["task"],
        row["length"],
        row["sample"],
        row["seed"],
        row["mode"],
        row["method"],
        row["compression"],
        row["budget_tokens"],
        row.get("question_index", 0),
        row.get("turn_mode"),
        row.get("prefill"),
        row.get("sequence"),
    )


class Runner:
    """Runs a :class:`BenchConfig`, appending rows to ``out/results.jsonl``.

    ``model``/``tokenizer``: an already loaded model (tests, notebooks); otherwise ``loader`` (default: load
    ``config.model``) loads it, here on the first serial run, or once per Ray worker. ``processor``: a
    vision-language model's processor for image tasks (default: loaded from ``config.model`` when needed).
    """

    def __init__(
        self, config: BenchConfig, model=None, tokenizer=None, loader: ModelLoader | None = None, processor=None
    ):
        window = getattr(model.config.get_text_config(), "max_position_embeddings", None) if model is not None else None
        config.validate(window=window if window is not None else model_window(config.model))
        check_image_tasks(config, model)
        self.processor = processor
        self.config = config
        self.out = prepare_out_dir(config.out)
        self.file = ResultsFile(self.out / "results.jsonl")
        self.results = self.file.path
        self.recovery: Recovery | None = self.file.recover()
        self.done = {row_key(r) for r in self.file.rows()}
        self.loader = loader or EmbeddedLoader(config.model)
        if tokenizer is None:
            from ..models import load_tokenizer

            tokenizer = load_tokenizer(config.model)  # the tokenizer alone: samples are planned without weights
        self.model, self.tokenizer = model, tokenizer
        self.methods = [build(spec) for spec in config.methods]
        self.info = RunInfo(config.model, config.seed, datetime.now(UTC).strftime("%Y%m%dT%H%M%S"))

    def samples(self) -> Iterator[tuple[int, int, Sample]]:
        """(length, index, sample) for every task and length, generated deterministically from the seed."""
        c = self.config
        for length in c.lengths:
            for name in c.tasks:
                generated = get_task(name).generate(self.tokenizer, length=length, n=c.samples, seed=c.seed)
                for i, sample in enumerate(generated):
                    yield length, i, sample

    def _turn_modes(self, task: str) -> list[str | None]:
        return list(self.config.turn_modes) if get_task(task).questions_per_sample > 1 else [None]

    def total_rows(self) -> int:
        """Rows a complete run has (done or not)."""
        c = self.config
        per_method = sum(len(c.budget_specs(m)) for m in self.methods) * len(c.axes())
        per_sample = sum(get_task(t).questions_per_sample * len(self._turn_modes(t)) for t in c.tasks)
        return per_method * per_sample * len(c.modes) * len(c.lengths) * c.samples

    def plan(self) -> list[WorkUnit]:
        """The work units still to run: a unit per sample and mode for the shared prefill, one per own-prefill job."""
        units = []
        for length, index, sample in self.samples():
            for mode in self.config.modes:
                shared, own = [], []
                for method in self.methods:
                    for budget in self.config.budget_specs(method):
                        for axes in self.config.axes():
                            for turn_mode in self._turn_modes(sample.task):
                                job = Job(method.spec(), budget, turn_mode, axes.get("prefill"), axes.get("sequence"))
                                if self._job_done(length, index, sample, mode, job):
                                    continue
                                # a prefill or sequence method changes the prefill itself: it cannot be shared
                                can_share = self.config.shared_prefill and shareable(method) and not axes
                                can_share = can_share and not isinstance(get_task(sample.task), ImageTask)
                                (shared if can_share else own).append(job)
                if shared:
                    units.append(WorkUnit(length, index, sample, mode, shared, shared=True))
                units += [WorkUnit(length, index, sample, mode, [job]) for job in own]
        return units

    def _job_done(self, length: int, index: int, sample: Sample, mode: str, job: Job) -> bool:
        stub = {
            "model": self.config.model,
            "task": sample.task,
            "length": length,
            "sample": index,
            "seed": self.config.seed,
            "mode": mode,
            "method": job.method,
            "compression": float(job.budget.get("compression", 0.0)),
            "budget_tokens": job.budget.get("budget"),
            "turn_mode": job.turn_mode,
            "prefill": job.prefill,
            "sequence": job.sequence,
        }
        return all(row_key({**stub, "question_index": q}) in self.done for q in range(sample.n_questions))

    def run(
        self, progress: Callable[[int], None] | None = None, ray: str | None = None, workers: int | None = None
    ) -> list[dict]:
        """Run what is left; ``progress(n)`` is told of rows done (those already there first). ``ray``: run the units
        on a Ray cluster at this address (``"local"``: start or join one on this machine) with ``workers`` actors."""
        self._write_config()
        units = self.plan()
        if progress:
            progress(self.total_rows() - sum(_rows_of(u) for u in units))
        rows: list[dict] = []

        def take(row: dict) -> None:
            if self._append(row):
                rows.append(row)
            if progress:
                progress(1)

        if ray is None:
            if self.model is None:
                self.model, _ = self.loader("cpu")
            unit_runner = UnitRunner(self.model, self.tokenizer, self.info, self.processor)
            for unit in units:
                for row in unit_runner.run(unit):
                    take(row)
        else:
            from .distributed import run_on_ray

            run_on_ray(units, self.info, self.loader, take, address=ray, workers=workers)
        return rows

    def _append(self, row: dict) -> bool:
        """Write ``row`` unless a row with its key is already there (a retried unit); True when written."""
        key = row_key(row)
        if key in self.done:
            return False
        self.file.append(row)
        self.done.add(key)
        return True

    def _write_config(self) -> None:
        config = asdict(self.config)
        config.update(
            versions=versions(),
            machine={
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "cpu_threads": torch.get_num_threads(),
            },
        )
        (self.out / "config.json").write_text(json.dumps(config, indent=2))


def _rows_of(unit: WorkUnit) -> int:
    return len(unit.jobs) * unit.sample.n_questions
