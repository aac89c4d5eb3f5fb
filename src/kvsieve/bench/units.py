"""The benchmark's unit of work and the one function that runs it, in this process or on a Ray worker.

A :class:`WorkUnit` is one sample in one mode and the jobs (method x budget x turn mode) that run on it: the methods a
shared prefill can replay go together in one unit (one :class:`~kvsieve.snapshot.PrefillSnapshot`, then each
method's cache), and a method that prefills on its own is a unit of its own. :class:`UnitRunner` turns a unit into
rows; the serial runner and the Ray workers both call it, so the sweep logic exists once.

Multi-question samples (``Sample.followups``) are compressed once and asked every question:

- ``independent``: each question is answered from the same compressed cache, restored between questions (as
  kvpress's pipeline does);
- ``multiturn``: one conversation, each turn's question and answer stay in the cache (SCBench's multi-turn mode).

In ``aware`` mode the first question is part of the compressed prefill; later questions are then new turns of the
conversation (``multiturn``), or, ``independent``, each question is compressed with its own copy of the context (as
kvpress's query-aware evaluation does).

Image tasks (:class:`~kvsieve.tasks.ImageTask`) go through the model's processor (:class:`ImageConversation`): the
images open the user turn, the processor expands their placeholders into image tokens and returns the pixel inputs,
and the prefill passes those to the model, so a sequence method (pre-LLM or in-LLM) prunes real image tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch
import transformers

import kvsieve

from ..compat import cache_kwargs
from ..errors import KVSieveError
from ..methods import build
from ..sequence import protect
from ..sieve import Sieve
from ..snapshot import PrefillSnapshot, shareable
from ..tasks import ImageTask, Sample, get_task

TURN_MODES = ("independent", "multiturn")


@dataclass
class Job:
    """One method at one budget (and, for multi-question samples, one turn mode): the rows of one cache."""

    method: str  # spec
    budget: dict  # {"compression": r}, {"budget": n} or {} (full)
    turn_mode: str | None = None  # None for single-question samples
    prefill: str | None = None  # attention-compute method spec (None: dense)
    sequence: str | None = None  # sequence method spec (None: no pruning)


@dataclass
class WorkUnit:
    """One sample in one mode and the jobs run on it; ``shared``: the jobs share one prefill snapshot."""

    length: int
    index: int
    sample: Sample
    mode: str
    jobs: list[Job] = field(default_factory=list)
    shared: bool = False


@dataclass
class RunInfo:
    """What every row of a run repeats."""

    model: str
    seed: int
    run_id: str


def versions() -> dict:
    return {"kvsieve": kvsieve.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class _Episode:
    """One prefill and the questions answered after it: ``chained`` questions form one conversation."""

    key: tuple  # which prefill: ("context",) or ("context+question", i)
    questions: list[int]
    chained: bool
    first_in_prefill: bool  # aware mode: the first question's text is part of the prefill


def _episodes(mode: str, turn_mode: str | None, n_questions: int) -> list[_Episode]:
    every = list(range(n_questions))
    chained = turn_mode == "multiturn"
    if mode == "agnostic":
        return [_Episode(("context",), every, chained, False)]
    if chained:
        return [_Episode(("context+question", 0), every, True, True)]
    return [_Episode(("context+question", i), [i], False, True) for i in every]


class Conversation:
    """Token ids of a sample's prompt pieces under the tokenizer's chat template (plain text without one)."""

    def __init__(self, tokenizer, sample: Sample):
        self.tokenizer, self.sample = tokenizer, sample
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def ids(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(text, add_special_tokens=False).input_ids], dtype=torch.long)

    def render(self, turns: list[tuple[str, str]], generation_prompt: bool = True) -> str:
        """``turns``: (role, content) pairs; the first user turn is the context plus the first question."""
        if self.chat:
            messages = [{"role": role, "content": content} for role, content in turns]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return "".join(content + "\n" for _, content in turns)

    def first_turn(self, question: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context ids, question ids): the single user turn holding the context and question ``question``."""
        asked = self.sample.for_question(question)
        text = self.render([("user", self.sample.context + asked.question)])
        cut = text.rindex(asked.question)
        return self.ids(text[:cut]), self.ids(text[cut:])

    def prefix(self, question: int) -> torch.Tensor:
        prefix = self.sample.for_question(question).answer_prefix
        return self.ids(prefix) if prefix else torch.zeros((1, 0), dtype=torch.long)

    def next_turn(self, history: list[str], question: int) -> torch.Tensor:
        """Ids that follow the last answer in ``history`` (answers so far, with their prefixes): end of that turn,
        the next question as a new user turn, the assistant header and the answer prefix."""
        turns = [("user", self.sample.context + self.sample.question)]
        for i, answer in enumerate(history):
            turns.append(("assistant", answer))
            turns.append(("user", self.sample.for_question(i + 1).question))
        text = self.render(turns[: 2 * len(history) + 1])
        last = history[-1]
        end = text.rfind(last)
        if end < 0:  # a template that strips the message
            last = last.strip()
            end = text.rfind(last)
        if end < 0:
            raise KVSieveError("the chat template rewrites assistant messages; multiturn mode cannot follow it")
        return torch.cat([self.ids(text[end + len(last) :]), self.prefix(question)], dim=1)


class ImageConversation(Conversation):
    """An image task's prompt under a vision-language model's processor: the sample's images open the first user turn
    (one image placeholder each, as the processor's chat template writes them), then the text.

    :meth:`first_turn` returns the processed context ids (image placeholders expanded into the model's image tokens)
    and keeps the processor's other outputs (``pixel_values``, ``image_grid_thw``, ``image_sizes``, ...) in
    :attr:`extras` for the prefill."""

    def __init__(self, processor, sample: Sample):
        super().__init__(getattr(processor, "tokenizer", processor), sample)
        self.processor = processor
        self.images = get_task(sample.task).images(sample)
        self.chat = bool(getattr(processor, "chat_template", None))
        self.extras: dict = {}

    def render(self, turns: list[tuple[str, str]], generation_prompt: bool = True) -> str:
        if self.chat:
            messages = []
            for n, (role, content) in enumerate(turns):
                parts = [{"type": "image"} for _ in self.images] if n == 0 else []
                messages.append({"role": role, "content": [*parts, {"type": "text", "text": content}]})
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        placeholder = getattr(self.processor, "image_token", None) or "<image>"
        return "".join(placeholder + "\n" for _ in self.images) + super().render(turns, generation_prompt)

    def first_turn(self, question: int) -> tuple[torch.Tensor, torch.Tensor]:
        asked = self.sample.for_question(question)
        text = self.render([("user", self.sample.context + asked.question)])
        cut = text.rindex(asked.question)
        # one prompt with its list of images (the nesting every processor reads as "these images go with this text")
        inputs = self.processor(images=[self.images], text=[text[:cut]], add_special_tokens=False, return_tensors="pt")
        inputs = dict(inputs)
        context = inputs.pop("input_ids")
        inputs.pop("attention_mask", None)  # one unpadded prompt
        self.extras = inputs
        return context, self.ids(text[cut:])

    def next_turn(self, history: list[str], question: int) -> torch.Tensor:
        raise KVSieveError("image tasks ask one question per sample; multi-turn image prompts are not supported")


def image_token_id(model) -> int | None:
    config = model.config
    found = getattr(config, "image_token_id", None)
    return found if found is not None else getattr(config, "image_token_index", None)


class UnitRunner:
    """Runs work units on one loaded model; yields one row per question of every job.

    ``processor``: the vision-language model's processor for image tasks (None: loaded from ``info.model`` when the
    first image sample comes, so Ray workers need nothing more than the model loader)."""

    def __init__(self, model, tokenizer, info: RunInfo, processor=None):
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.processor = processor
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos = set(eos) if isinstance(eos, (list, tuple, set)) else {int(eos)}

    def _processor(self):
        if self.processor is None:
            from ..models import load_processor

            self.processor = load_processor(self.info.model)
        return self.processor

    def run(self, unit: WorkUnit) -> Iterator[dict]:
        if isinstance(get_task(unit.sample.task), ImageTask):
            talk: Conversation = ImageConversation(self._processor(), unit.sample)
        else:
            talk = Conversation(self.tokenizer, unit.sample)
        planned = [
            (ep, job) for job in unit.jobs for ep in _episodes(unit.mode, job.turn_mode, unit.sample.n_questions)
        ]
        keys = list(dict.fromkeys(ep.key for ep, _ in planned))
        for key in keys:  # one prefill (and snapshot) at a time, so at most one full cache is held
            context, question = talk.first_turn(key[1] if len(key) > 1 else 0)
            prefill_ids = context if key[0] == "context" else torch.cat([context, question], dim=1)
            prefill_ids = prefill_ids.to(self.device)
            here = [(ep, job) for ep, job in planned if ep.key == key]
            extras = getattr(talk, "extras", {})
            snapshot = None
            if unit.shared and not extras:
                methods = [m for _, job in here if shareable(m := build(job.method))]
                snapshot = PrefillSnapshot(self.model, prefill_ids, methods) if methods else None
            for ep, job in here:
                yield from self._job(unit, talk, ep, job, prefill_ids, snapshot, context.shape[1], extras)

    def _job(
        self,
        unit: WorkUnit,
        talk: Conversation,
        ep: _Episode,
        job: Job,
        prefill_ids,
        snapshot,
        n_context: int,
        extras: dict | None = None,
    ) -> Iterator[dict]:
        method = build(job.method)
        sieve = Sieve(method, **job.budget, prefill=job.prefill, sequence=job.sequence)
        use_snapshot = snapshot is not None and shareable(method)
        with sieve.attach(self.model) as fresh:
            t0 = time.perf_counter()
            if use_snapshot:
                cache = snapshot.compress(method, sieve.budget if method.evicts else None)
                prefill_seconds = snapshot.prefill_seconds + (time.perf_counter() - t0)
                logits = snapshot.last_logits
            else:
                cache = fresh
                if job.sequence is not None:  # token pruning may drop context tokens only, never the question
                    prunable = torch.zeros(prefill_ids.shape, dtype=torch.bool, device=prefill_ids.device)
                    prunable[:, :n_context] = True
                    protect(cache, prunable)
                if extras:
                    logits = self._prefill_images(cache, prefill_ids, extras, n_context)
                else:
                    logits = kvsieve.prefill(self.model, prefill_ids, cache, tokenizer=self.tokenizer)
                prefill_seconds = time.perf_counter() - t0
            kv_bytes, kv_tokens = cache.kv_bytes(), _mean_tokens(cache)
            history: list[str] = []
            pending: list[int] = []
            # independent questions each start from the compressed context: the cache rolls back between them
            mark = cache.checkpoint() if not ep.chained and len(ep.questions) > 1 else None
            for n, i in enumerate(ep.questions):
                asked = unit.sample.for_question(i)
                if ep.chained and n:
                    follow = torch.cat([torch.tensor([pending], dtype=torch.long), talk.next_turn(history, i)], dim=1)
                else:
                    question = talk.first_turn(i)[1]
                    follow = talk.prefix(i) if ep.first_in_prefill else torch.cat([question, talk.prefix(i)], dim=1)
                    if mark is not None and n:
                        cache.restore(mark)
                text, decode_seconds, pending = self._answer(cache, follow.to(self.device), logits, asked)
                history.append(asked.answer_prefix + text)
                row = self._row(unit, job, method, i, asked)
                row.update(
                    score=get_task(asked.task).score(asked, text),
                    prediction=text,
                    context_tokens=int(prefill_ids.shape[1]),
                    kv_tokens=kv_tokens,
                    kv_bytes=kv_bytes,
                    kv_bytes_full=_full_bytes(self.model, int(prefill_ids.shape[1])),
                    prefill_seconds=prefill_seconds,
                    decode_seconds_per_token=decode_seconds,
                    shared_prefill=use_snapshot,
                    stats=cache.stats(),  # what the methods reported, e.g. a sparse prefill's attention density
                    timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
                )
                if isinstance(talk, ImageConversation):
                    token = image_token_id(self.model)
                    row.update(
                        images=len(talk.images),
                        image_tokens=int((prefill_ids == token).sum()) if token is not None else None,
                    )
                yield row

    @torch.no_grad()
    def _prefill_images(self, cache, prefill_ids: torch.Tensor, extras: dict, n_context: int) -> torch.Tensor:
        """One forward pass of the prompt with the processor's image inputs; the last position's logits."""
        n = prefill_ids.shape[1]
        kwargs = {}
        for name, value in extras.items():
            if not isinstance(value, torch.Tensor):
                kwargs[name] = value
                continue
            value = value.to(self.device)
            if value.is_floating_point():
                value = value.to(self.model.dtype)
            if value.ndim == 2 and value.shape == (1, n_context) and n > n_context:  # per-token (token types)
                value = torch.cat([value, value.new_zeros(1, n - n_context)], dim=1)  # the question is text
            kwargs[name] = value
        out = self.model(
            input_ids=prefill_ids, **kwargs, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def _answer(self, cache, follow: torch.Tensor, logits: torch.Tensor, sample: Sample):
        """Append the follow-up tokens without eviction, then decode greedily.

        Returns the text, s/token (None when no decoding step ran) and the generated tokens not yet in the cache
        (the last one, unless decoding ended at end of sequence). Decoding stops at end of sequence, after
        ``sample.max_new_tokens`` tokens, or as soon as the task says more text cannot change the score (string
        match: every answer already found), which gives the same score as decoding on and saves most of the time of
        a correct answer followed by chatter.
        """
        task = get_task(sample.task)
        new: list[int] = []
        text = ""
        pending: list[int] = []
        with cache.paused():
            if follow.shape[1]:
                logits = self.model(
                    follow, **kvsieve.cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1
                ).logits[:, -1]
            t0 = time.perf_counter()
            steps = 0
            for _ in range(sample.max_new_tokens):
                token = int(logits[0].argmax())
                if token in self.eos:
                    break
                new.append(token)
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if len(new) == sample.max_new_tokens or task.settled(sample, text):
                    pending = [token]
                    break
                ids = torch.tensor([[token]], device=self.device)
                logits = self.model(
                    ids, **kvsieve.cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1
                ).logits[:, -1]
                steps += 1
            seconds = (time.perf_counter() - t0) / steps if steps else None
        return text, seconds, pending

    def _row(self, unit: WorkUnit, job: Job, method, question: int, asked: Sample) -> dict:
        return {
            "run_id": self.info.run_id,
            "model": self.info.model,
            "method": method.spec(),
            "method_params": method.params(),
            "compression": float(job.budget.get("compression", 0.0)),
            "budget_tokens": job.budget.get("budget"),
            "task": unit.sample.task,
            "length": unit.length,
            "depth": _question_depth(unit.sample, question),
            "mode": unit.mode,
            "sample": unit.index,
            "question_index": question,
            "turn_mode": job.turn_mode,
            "prefill": job.prefill,
            "sequence": job.sequence,
            "seed": self.info.seed,
            "question": asked.question,
            "answer_prefix": asked.answer_prefix,
            "answers": list(asked.answers),
            "max_new_tokens": asked.max_new_tokens,
            "versions": versions(),
        }


def _question_depth(sample: Sample, i: int) -> float | None:
    if i:
        return sample.followups[i - 1].depth
    depths = sample.meta.get("question_depths") if sample.followups else None
    return depths[0] if depths else sample.depth


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
