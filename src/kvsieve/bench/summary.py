"""Pure summaries of benchmark result rows (the dicts of ``results.jsonl``).

Every function here takes the list of row dicts the benchmark runner writes, one per (sample x question x method x
budget x mode), and returns plain Python data; nothing touches a model or the disk except the ``load_*`` helpers.
All of them accept an empty list, and rows with missing or extra fields.

Conventions:

* the uncompressed baseline is the method named :data:`FULL_METHOD` (``"full"``);
* a row's budget (:class:`Budget`) is its compression (fraction of the context's KV removed, 0 = nothing removed,
  rounded to :data:`_COMPRESSION_DIGITS` digits so that float noise never splits a group), or its absolute token
  budget for rows run with ``--budgets`` (their compression field is 0);
* a row's *view* is its mode (``agnostic``/``aware``), plus `` · multiturn`` for the turns of a multi-turn
  conversation, which are scored apart from independent questions;
* rows whose ``score`` is missing or not finite are left out of score cells (``n`` counts the rest);
* every score cell carries ``n`` and a 95% interval, and cells are compared with ``full`` on the same samples with
  a paired test, Holm-corrected per table (:mod:`kvsieve.bench.stats`);
* given the run's ``config.json``, a cell knows how many rows the run should have produced for it and says when
  some are missing (:class:`Expectation`).
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from rich.markup import escape
from rich.table import Table

from .stats import Comparison, adjust, mean_interval, paired_test

FULL_METHOD = "full"
RESULTS_FILE = "results.jsonl"
PARTIAL_FILE = "results.jsonl.partial"
CONFIG_FILE = "config.json"
STREAMING_FILE = "streaming.jsonl"
MEMORY_FILE = "memory.jsonl"
MODE_ORDER = ("agnostic", "aware")
MULTITURN = "multiturn"

_COMPRESSION_DIGITS = 6

Row = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------- loading
def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file into a list of dicts; a missing file gives ``[]``.

    Blank lines are skipped. Lines that are not a JSON object (a run killed mid-write leaves a truncated last line;
    the runner sets such lines aside in ``results.jsonl.partial`` when it resumes) are skipped with a
    :class:`UserWarning` naming the file and line numbers; bytes that are not UTF-8 are replaced, never fatal.
    """
    p = Path(path)
    if not p.is_file():
        return []
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    with p.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad.append(lineno)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" …" if len(bad) > 10 else "")
        warnings.warn(f"{p}: skipped {len(bad)} line(s) that are not JSON objects (line {shown})", stacklevel=2)
    return rows


def load_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Load ``run_dir/results.jsonl`` (``[]`` when it does not exist)."""
    return load_jsonl(Path(run_dir) / RESULTS_FILE)


def load_config(run_dir: str | Path) -> dict[str, Any] | None:
    """Load ``run_dir/config.json``; ``None`` when it is missing or not a JSON object."""
    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        obj = json.loads(p.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        warnings.warn(f"{p}: not valid JSON ({exc}); leaving the configuration out", stacklevel=2)
        return None
    return obj if isinstance(obj, dict) else None


def partial_lines(run_dir: str | Path) -> int:
    """Lines an interrupted run left in ``results.jsonl.partial`` (set aside by the runner, redone on resume)."""
    p = Path(run_dir) / PARTIAL_FILE
    if not p.is_file():
        return 0
    with p.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


# ----------------------------------------------------------------------------------------------- helpers
def _finite(x: Any) -> float | None:
    """``float(x)`` when ``x`` is a finite number (not a bool), else ``None``."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


def norm_compression(c: Any) -> float:
    """A row's compression as a rounded float (``None``/missing counts as 0, the full cache)."""
    f = _finite(c)
    return round(f, _COMPRESSION_DIGITS) if f is not None else 0.0


def format_compression(c: float) -> str:
    """``0.875`` → ``"87.5%"``."""
    return f"{c * 100:.4g}%"


class Budget(NamedTuple):
    """What a row's cache was allowed to keep: ``("compression", fraction removed)`` or ``("tokens", count)``.

    Compressions sort before token budgets, each ascending.
    """

    kind: str
    value: float

    @property
    def label(self) -> str:
        return format_compression(self.value) if self.kind == "compression" else f"{self.value:,.0f} tok"

    @property
    def slug(self) -> str:
        return self.label.replace("%", "pct").replace(",", "").replace(" ", "").replace(".", "p")


NO_COMPRESSION = Budget("compression", 0.0)


def budget_of(row: Row) -> Budget:
    """The row's :class:`Budget`: its token budget when it ran under one (compression 0), else its compression."""
    c = norm_compression(row.get("compression"))
    tokens = _finite(row.get("budget_tokens"))
    if c == 0 and tokens is not None and tokens > 0 and row.get("method") != FULL_METHOD:
        return Budget("tokens", tokens)
    return Budget("compression", c)


def view_of(row: Row) -> str:
    """The row's mode, with `` · multiturn`` for turns of a multi-turn conversation (scored apart)."""
    mode = str(row.get("mode", "agnostic"))
    return f"{mode} · {MULTITURN}" if row.get("turn_mode") == MULTITURN else mode


def unit_key(row: Row) -> tuple:
    """What identifies the sample (and question) a row answered, across methods, budgets and modes: paired tests
    compare two methods on the rows that share this key."""
    return (
        row.get("model"),
        row.get("task"),
        row.get("length"),
        row.get("seed"),
        row.get("sample"),
        row.get("question_index") or 0,
        row.get("depth"),
    )


def _unique(seq: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(seq))


def method_label(row: Row) -> str:
    """The method a row measured, with its attention-compute and sequence settings when it has any (so rows of
    ``full`` with a pruning method are never pooled with, or taken for, plain ``full``)."""
    label = str(row.get("method", "?"))
    if row.get("prefill"):
        label += f" [prefill {row['prefill']}]"
    if row.get("sequence"):
        label += f" [sequence {row['sequence']}]"
    return label


def methods_in_order(rows: Sequence[Row]) -> list[str]:
    """Methods in order of first appearance, with :data:`FULL_METHOD` first when present."""
    ms = _unique(method_label(r) for r in rows)
    return ([FULL_METHOD] if FULL_METHOD in ms else []) + [m for m in ms if m != FULL_METHOD]


def views_in_order(rows: Sequence[Row]) -> list[str]:
    """Views present: ``agnostic``, ``aware``, any other mode, each followed by its multi-turn view."""
    modes = _unique(str(r.get("mode", "agnostic")) for r in rows)
    modes = [m for m in MODE_ORDER if m in modes] + [m for m in modes if m not in MODE_ORDER]
    present = {view_of(r) for r in rows}
    return [v for m in modes for v in (m, f"{m} · {MULTITURN}") if v in present]


def modes_in_order(rows: Sequence[Row]) -> list[str]:
    """Modes present: ``agnostic``, ``aware``, then any other in order of first appearance."""
    ms = _unique(str(r.get("mode", "agnostic")) for r in rows)
    return [m for m in MODE_ORDER if m in ms] + [m for m in ms if m not in MODE_ORDER]


def tasks_in_order(rows: Sequence[Row]) -> list[str]:
    """Tasks in order of first appearance."""
    return _unique(str(r.get("task", "?")) for r in rows)


def budgets_in_order(rows: Sequence[Row]) -> list[Budget]:
    """Distinct budgets: compressions ascending, then token budgets ascending."""
    return sorted({budget_of(r) for r in rows})


def compressions_in_order(rows: Sequence[Row]) -> list[float]:
    """Distinct compressions, ascending (token-budget rows left out)."""
    return [b.value for b in budgets_in_order(rows) if b.kind == "compression"]


# ----------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """The scores of one group of rows: mean, n and a 95% interval (see :mod:`kvsieve.bench.stats`).

    ``interval`` names how ``lo``/``hi`` were found: ``"Wilson"`` (0/1 scores), ``"bootstrap"`` (graded scores) or
    ``""`` (none: the cell holds aggregates from another tool's metrics, whose per-sample scores are unknown).
    ``scores`` maps each sample's :func:`unit_key` to its score, for paired tests. ``expected``: the rows the run's
    configuration implies for this cell (``None`` when unknown); ``present``: how many of those are here, scored.
    """

    mean: float
    n: int
    lo: float
    hi: float
    interval: str
    scores: Mapping[tuple, float] = field(default_factory=dict, repr=False, compare=False)
    expected: int | None = None
    present: int | None = None

    @property
    def missing(self) -> int:
        """Rows the configuration expects that are absent or unscored (0 when unknown)."""
        return max(0, self.expected - (self.present or 0)) if self.expected is not None else 0

    def with_expected(self, expected: int, present: int) -> Cell:
        return Cell(self.mean, self.n, self.lo, self.hi, self.interval, self.scores, expected, present)


def make_cell(rows: Iterable[Row]) -> Cell | None:
    """The :class:`Cell` of ``rows`` (``None`` when none has a finite score).

    A row with an integer ``n_aggregated`` (read from another tool's aggregate metrics) stands for that many
    samples at its score; a cell holding one has no interval and no per-sample scores.
    """
    plain: list[float] = []
    weighted: list[tuple[float, int]] = []
    by_unit: dict[tuple, float] = {}
    for r in rows:
        s = _finite(r.get("score"))
        if s is None:
            continue
        w = r.get("n_aggregated")
        if isinstance(w, int) and not isinstance(w, bool) and w > 0:
            weighted.append((s, w))
            continue
        plain.append(s)
        by_unit.setdefault(unit_key(r), s)
    n = len(plain) + sum(w for _, w in weighted)
    if n == 0:
        return None
    mean = (math.fsum(plain) + math.fsum(s * w for s, w in weighted)) / n
    if weighted:
        return Cell(mean, n, math.nan, math.nan, "", {})
    lo, hi, how = mean_interval(plain)
    return Cell(mean, n, lo, hi, how, by_unit)


def compare(a: Cell, b: Cell) -> Comparison | None:
    """Paired test of ``a`` against ``b`` on the samples both scored; ``None`` without a common sample."""
    common = [k for k in a.scores if k in b.scores]
    if not common:
        return None
    return paired_test([a.scores[k] for k in common], [b.scores[k] for k in common])


def _group(rows: Iterable[Row], *keys: str) -> dict[tuple, list[Row]]:
    getters = {
        "view": view_of,
        "method": method_label,
        "budget": budget_of,
        "task": lambda r: str(r.get("task", "?")),
    }
    out: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        out[tuple(getters[k](r) for k in keys)].append(r)
    return out


def mean_scores(rows: Sequence[Row]) -> dict[tuple[str, str, Budget], Cell]:
    """Score cell over all tasks and samples, keyed ``(view, method, budget)``."""
    cells = {k: make_cell(g) for k, g in _group(rows, "view", "method", "budget").items()}
    return {k: c for k, c in cells.items() if c is not None}


def mean_scores_by_task(rows: Sequence[Row]) -> dict[tuple[str, str, str, Budget], Cell]:
    """Score cell per task, keyed ``(task, view, method, budget)``."""
    cells = {k: make_cell(g) for k, g in _group(rows, "task", "view", "method", "budget").items()}
    return {k: c for k, c in cells.items() if c is not None}


# ----------------------------------------------------------------------------------------------- expectation
@dataclass
class Expectation:
    """The rows a run's ``config.json`` implies, to tell a complete cell from one with rows missing.

    A cell (view, method, budget, task or all tasks) expects one row per task x length x sample (x question for
    multi-question tasks) of the configuration, for the methods, budgets, modes and prefill x sequence settings it
    lists. Rows of other models, seeds or sample indices (older runs in the same directory) are neither expected nor
    counted.
    """

    model: str | None
    seed: Any
    plan: set[tuple[str, str, Budget]]  # (view, method, budget) the run is to produce
    units: dict[str, dict[str, set[tuple]]]  # view -> task -> {(task, length, seed, sample, question)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, rows: Sequence[Row] = ()) -> Expectation | None:
        """``None`` when the configuration does not say what a complete run holds."""
        if not config:
            return None
        try:
            tasks = [str(t) for t in config["tasks"]]
            lengths = [int(x) for x in config["lengths"]]
            samples = int(config["samples"])
            methods = [str(m) for m in config["methods"]]
            compressions = [norm_compression(c) for c in config.get("compressions") or []]
            budgets = [float(b) for b in config.get("budgets") or []]
            seed = config["seed"]
        except (KeyError, TypeError, ValueError):
            return None
        mode = str(config.get("mode", "agnostic"))
        modes = list(MODE_ORDER) if mode == "both" else [mode]
        turns = str(config.get("turns", "independent"))
        turn_modes = ["independent", MULTITURN] if turns == "both" else [turns]
        plan: set[tuple[str, str, Budget]] = set()
        in_rows = {str(r.get("method")) for r in rows}
        suffixes = _axis_suffixes(config)
        for spec in methods:
            name, evicts = _method_identity(spec)
            name = spec if spec in in_rows and name not in in_rows else name  # rows may carry the spec as written
            keys = [NO_COMPRESSION] if not evicts else [Budget("compression", c) for c in compressions]
            keys += [Budget("tokens", b) for b in budgets] if evicts else []
            for md in modes:
                plan.update(
                    (v, name + suffix, b) for v in (md, f"{md} · {MULTITURN}") for b in keys for suffix in suffixes
                )
        units: dict[str, dict[str, set[tuple]]] = defaultdict(dict)
        for task in tasks:
            q = _questions_per_sample(task, rows)
            for md in modes:
                views = [md] if q == 1 else [md if t == "independent" else f"{md} · {MULTITURN}" for t in turn_modes]
                for v in views:
                    units[v][task] = {
                        (task, length, seed, i, j) for length in lengths for i in range(samples) for j in range(q)
                    }
        return cls(config.get("model"), seed, plan, dict(units))

    def expected(self, view: str, method: str, budget: Budget, task: str | None = None) -> set[tuple] | None:
        """The (task, length, seed, sample, question) keys this cell expects; ``None`` when it is not planned."""
        if (view, method, budget) not in self.plan or view not in self.units:
            return None
        per_task = self.units[view]
        if task is not None:
            return per_task.get(task, set()) if per_task.get(task) else None
        return set().union(*per_task.values()) if per_task else None

    def present(self, rows: Iterable[Row]) -> set[tuple]:
        """Expectation keys of the ``rows`` that have a finite score (rows of other models do not count)."""
        return {
            (r.get("task"), r.get("length"), r.get("seed"), r.get("sample"), r.get("question_index") or 0)
            for r in rows
            if _finite(r.get("score")) is not None and (self.model is None or r.get("model") in (None, self.model))
        }


def _built(spec: str) -> Any:
    """The method a spec of the configuration names, or None for one this kvsieve no longer knows (an older run)."""
    try:
        from ..methods import build

        return build(spec)
    except Exception:
        return None


def _method_identity(spec: str) -> tuple[str, bool]:
    """(name rows carry, whether it runs under budgets) for a method spec of the configuration."""
    method = _built(spec)
    if method is None:  # go by its name
        return spec, spec != FULL_METHOD
    return method.spec(), bool(method.evicts or method.selects)


def _axis_suffixes(config: Mapping[str, Any]) -> list[str]:
    """The label suffixes (see :func:`method_label`) of the prefill x sequence settings the configuration runs: ``""``
    for the defaults (dense attention, no pruning), so a run without ``dense`` in its prefills expects no plain rows."""
    prefills = dict.fromkeys(_axis_identity(p) for p in config.get("prefills") or []) or [None]
    sequences = dict.fromkeys(_axis_identity(q) for q in config.get("sequences") or []) or [None]
    return [method_label({"method": "", "prefill": p, "sequence": q}) for p in prefills for q in sequences]


def _axis_identity(spec: Any) -> str | None:
    """The spec rows carry for a prefill or sequence setting of the configuration: None for the defaults (``dense``,
    ``none``), as written for a method this kvsieve no longer knows."""
    spec = str(spec).strip()
    if spec in (DENSE_PREFILL, "none"):
        return None
    method = _built(spec)
    return spec if method is None else method.spec()


def _questions_per_sample(task: str, rows: Sequence[Row]) -> int:
    seen = max((int(r.get("question_index") or 0) + 1 for r in rows if r.get("task") == task), default=1)
    try:
        from ..tasks import get_task

        return max(seen, int(get_task(task).questions_per_sample))
    except Exception:  # a task this kvsieve no longer knows: trust the rows
        return seen


# ----------------------------------------------------------------------------------------------- tables
@dataclass
class ScoreTable:
    """Score cells of one view (and one task, or all tasks): methods x budgets, with tests against ``full``.

    ``full`` is the baseline cell of this view, or pooled from the other views of the same turn kind when this one
    did not run ``full`` (the full cache does not depend on the mode; ``full_from`` then names where it came from).
    ``vs_full`` holds each compressed cell's paired test against it, Holm-adjusted over the whole table.
    ``missing`` lists ``(method, budget, expected, present)`` for cells with fewer rows than the configuration implies.
    """

    view: str
    task: str | None
    methods: list[str]
    budgets: list[Budget]
    cells: dict[tuple[str, Budget], Cell]
    full: Cell | None
    full_from: str | None
    vs_full: dict[tuple[str, Budget], Comparison]
    missing: list[tuple[str, Budget, int, int]]

    @property
    def tests(self) -> int:
        return len(self.vs_full)


def score_table(
    rows: Sequence[Row], view: str, task: str | None = None, expectation: Expectation | None = None
) -> ScoreTable:
    """The :class:`ScoreTable` of ``view`` (and ``task``) from all rows (full may be borrowed from other views)."""
    scope = [r for r in rows if task is None or str(r.get("task", "?")) == task]
    mine = [r for r in scope if view_of(r) == view]
    groups = _group(mine, "method", "budget")
    cells = {k: c for k, g in groups.items() if (c := make_cell(g)) is not None}
    methods = methods_in_order(mine)
    budgets = sorted({b for _m, b in groups})
    if expectation is not None:
        for v, m, b in sorted(expectation.plan, key=lambda k: (k[1] != FULL_METHOD, k[2])):
            if v == view and expectation.expected(v, m, b, task):
                methods += [m] if m not in methods else []
                budgets += [b] if b not in budgets else []
        budgets.sort()
    full_rows = [r for r in mine if method_label(r) == FULL_METHOD]
    full_from = None
    if not full_rows:
        turn = view.partition(" · ")[2]
        donors = [r for r in scope if method_label(r) == FULL_METHOD and view_of(r).partition(" · ")[2] == turn]
        full_rows = donors
        full_from = ", ".join(_unique(view_of(r) for r in donors)) or None
    full = make_cell(full_rows)
    tests = {}
    if full is not None:
        for (m, b), cell in cells.items():
            if m != FULL_METHOD and (c := compare(cell, full)) is not None:
                tests[(m, b)] = c
    missing = []
    if expectation is not None:
        for m in methods:
            for b in budgets:
                want = expectation.expected(view, m, b, task)
                if not want:
                    continue
                have = len(want & expectation.present(groups.get((m, b), [])))
                if (m, b) in cells:
                    cells[(m, b)] = cells[(m, b)].with_expected(len(want), have)
                if have < len(want):
                    missing.append((m, b, len(want), have))
    return ScoreTable(view, task, methods, budgets, cells, full, full_from, adjust(tests), missing)


def score_tables(rows: Sequence[Row], config: Mapping[str, Any] | None = None) -> list[ScoreTable]:
    """One table per view over all tasks, then one per view and task."""
    expectation = Expectation.from_config(config, rows)
    views = views_in_order(rows)
    out = [score_table(rows, v, None, expectation) for v in views]
    for v in views:
        for t in tasks_in_order([r for r in rows if view_of(r) == v]):
            out.append(score_table(rows, v, t, expectation))
    return out


def missing_rows_messages(tables: Sequence[ScoreTable], limit: int = 12) -> list[str]:
    """One line per cell (of the all-task tables) that has fewer rows than the run's configuration implies."""
    lines = [
        f"{t.view} · {m} @ {b.label}: {have} of {want} expected rows"
        + (" (none yet)" if have == 0 else f" ({want - have} missing or unscored)")
        for t in tables
        if t.task is None
        for m, b, want, have in t.missing
    ]
    if len(lines) > limit:
        lines = [*lines[:limit], f"… and {len(lines) - limit} more cells"]
    return lines


# ----------------------------------------------------------------------------------------------- best method
@dataclass(frozen=True)
class BestMethod:
    """The best compressed method at one (view, budget), its runner-up and their paired tests.

    ``vs_runner_up`` is Holm-adjusted over the budgets of the view; ``vs_full`` comes from the view's score table
    (Holm-adjusted over that table).
    """

    mode: str
    budget: Budget
    method: str
    cell: Cell
    full: Cell | None
    runner_up: str | None
    runner_up_cell: Cell | None
    vs_runner_up: Comparison | None
    vs_full: Comparison | None

    @property
    def score(self) -> float:
        return self.cell.mean

    @property
    def n(self) -> int:
        return self.cell.n

    @property
    def compression(self) -> float:
        return self.budget.value if self.budget.kind == "compression" else math.nan

    @property
    def full_score(self) -> float | None:
        return None if self.full is None else self.full.mean

    @property
    def runner_up_score(self) -> float | None:
        return None if self.runner_up_cell is None else self.runner_up_cell.mean

    @property
    def delta_vs_full(self) -> float | None:
        """``score - full_score`` (negative: the method loses accuracy)."""
        return None if self.full is None else self.score - self.full.mean


def best_method_per_budget(rows: Sequence[Row], tables: Sequence[ScoreTable] | None = None) -> list[BestMethod]:
    """For each view x budget, the non-``full`` method with the highest mean score (ties: the name sorting first)."""
    tables = [t for t in (tables or score_tables(rows)) if t.task is None]
    out: list[BestMethod] = []
    for t in tables:
        picks: list[tuple[Budget, str, Cell, str | None, Cell | None]] = []
        for b in t.budgets:
            cands = sorted(
                ((c, m) for (m, bb), c in t.cells.items() if bb == b and m != FULL_METHOD),
                key=lambda cm: (-cm[0].mean, cm[1]),
            )
            if cands:
                second = cands[1] if len(cands) > 1 else (None, None)
                picks.append((b, cands[0][1], cands[0][0], second[1], second[0]))
        tests = {b: c for b, _m, cell, _r, rc in picks if rc is not None and (c := compare(cell, rc)) is not None}
        tests = adjust(tests)
        out += [
            BestMethod(t.view, b, m, cell, t.full, r, rc, tests.get(b), t.vs_full.get((m, b)))
            for b, m, cell, r, rc in picks
        ]
    return out


# ----------------------------------------------------------------------------------------------- speed
@dataclass(frozen=True)
class SpeedRow:
    """Median timings of one method, and their ratio to ``full`` (ours / baseline; < 1 is faster)."""

    method: str
    n: int
    prefill_seconds: float | None
    decode_seconds_per_token: float | None
    prefill_ratio: float | None
    decode_ratio: float | None
    prefill_shared: bool


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _prefill_values(rows: Iterable[Row]) -> tuple[list[float], bool]:
    """Prefill times, preferring rows that did not share their prefill; flag when only shared ones exist."""
    own: list[float] = []
    shared: list[float] = []
    for r in rows:
        v = _finite(r.get("prefill_seconds"))
        if v is None:
            continue
        (shared if r.get("shared_prefill") else own).append(v)
    return (own, False) if own else (shared, bool(shared))


def _decode_values(rows: Iterable[Row]) -> list[float]:
    return [v for r in rows if (v := _finite(r.get("decode_seconds_per_token"))) is not None]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def speed_table(rows: Sequence[Row]) -> list[SpeedRow]:
    """Per method (``full`` first): median prefill seconds and decode seconds/token, and their ratios.

    Prefill medians use the rows that ran their own prefill (``shared_prefill`` false) when there are
    any; a method with shared prefills only is flagged ``prefill_shared``. Ratios are taken against
    ``full`` within the same ``run_id`` (median of this method / median of ``full``); with several
    runs in one file, the median of the per-run ratios is reported.
    """
    by_method: dict[str, list[Row]] = defaultdict(list)
    by_run_method: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        m = method_label(r)
        by_method[m].append(r)
        by_run_method[(str(r.get("run_id", "")), m)].append(r)
    runs = _unique(str(r.get("run_id", "")) for r in rows)

    def run_ratios(method: str, which: str) -> float | None:
        ratios: list[float] = []
        for run in runs:
            mine = by_run_method.get((run, method))
            base = by_run_method.get((run, FULL_METHOD))
            if not mine or not base:
                continue
            if which == "prefill":
                a, b = _median(_prefill_values(mine)[0]), _median(_prefill_values(base)[0])
            else:
                a, b = _median(_decode_values(mine)), _median(_decode_values(base))
            q = _ratio(a, b)
            if q is not None:
                ratios.append(q)
        return _median(ratios)

    out: list[SpeedRow] = []
    for m in methods_in_order(rows):
        pre, shared = _prefill_values(by_method[m])
        out.append(
            SpeedRow(
                method=m,
                n=len(by_method[m]),
                prefill_seconds=_median(pre),
                decode_seconds_per_token=_median(_decode_values(by_method[m])),
                prefill_ratio=run_ratios(m, "prefill"),
                decode_ratio=run_ratios(m, "decode"),
                prefill_shared=shared,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------- sparse prefill
DENSE_PREFILL = "dense"
ORACLE_PREFILL = "oracle_topk"


def prefill_of(row: Row) -> str:
    """The attention-compute method of a row (``dense`` when none was set)."""
    return str(row.get("prefill") or DENSE_PREFILL)


def _density(row: Row) -> float | None:
    stats = row.get("stats")
    return _finite(stats.get("prefill_density")) if isinstance(stats, Mapping) else None


@dataclass(frozen=True)
class PrefillRow:
    """One prefill method on one (cache method, budget, task, length): its score, prefill time and attention density
    beside dense prefill's, and the oracle's score at the nearest density (``oracle_topk`` rows in the same run)."""

    task: str
    length: Any
    method: str  # the cache method (and budget label) the prefill method ran with
    budget: Budget
    prefill: str
    cell: Cell | None
    density: float | None  # mean measured share of causal (query, key) pairs computed
    prefill_seconds: float | None  # median, own prefills only (shared ones never run a prefill method)
    speedup: float | None  # dense prefill's median time / this one's (higher is faster)
    delta_vs_dense: float | None  # mean score minus dense prefill's on the same cache method, budget and task
    test: Comparison | None  # paired test against dense prefill (Holm-corrected over the table)
    oracle: Cell | None = None
    oracle_spec: str | None = None
    oracle_density: float | None = None

    @property
    def is_oracle(self) -> bool:
        return self.prefill.startswith(ORACLE_PREFILL)


def prefill_table(rows: Sequence[Row]) -> list[PrefillRow]:
    """The sparse-prefill view: one row per (task, length, cache method, budget, prefill method), dense first.

    Empty unless some row ran a prefill method. Speed-ups compare medians of rows that ran their own prefill; the
    oracle columns take the ``oracle_topk`` group whose mean measured density is closest to this method's.
    """
    if not any(r.get("prefill") for r in rows):
        return []
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        key = (str(r.get("task", "?")), r.get("length"), str(r.get("method", "?")), budget_of(r), prefill_of(r))
        groups[key].append(r)
    out: list[PrefillRow] = []
    tests: list[Comparison | None] = []
    bases = {k[:4]: v for k, v in groups.items() if k[4] == DENSE_PREFILL}
    for key, mine in groups.items():
        base = bases.get(key[:4])
        cell = make_cell(mine)
        base_cell = make_cell(base) if base else None
        own = _median([v for r in mine if not r.get("shared_prefill") and (v := _finite(r.get("prefill_seconds")))])
        base_own = (
            _median([v for r in base if not r.get("shared_prefill") and (v := _finite(r.get("prefill_seconds")))])
            if base
            else None
        )
        densities = [d for r in mine if (d := _density(r)) is not None]
        density = statistics.fmean(densities) if densities else (1.0 if key[4] == DENSE_PREFILL else None)
        test = compare(cell, base_cell) if cell and base_cell and key[4] != DENSE_PREFILL else None
        tests.append(test)
        out.append(
            PrefillRow(
                task=key[0], length=key[1], method=key[2], budget=key[3], prefill=key[4], cell=cell,
                density=density, prefill_seconds=own,
                speedup=_ratio(base_own, own) if key[4] != DENSE_PREFILL else None,
                delta_vs_dense=(cell.mean - base_cell.mean) if cell and base_cell and key[4] != DENSE_PREFILL else None,
                test=test,
            )
        )  # fmt: skip
    adjusted = adjust({i: t for i, t in enumerate(tests) if t is not None})  # Holm over the whole table
    out = [PrefillRow(**{**row.__dict__, "test": adjusted[i]}) if i in adjusted else row for i, row in enumerate(out)]
    final = []
    for row in out:
        if not row.is_oracle and row.prefill != DENSE_PREFILL and row.density is not None:
            oracles = [
                o for o in out
                if o.is_oracle and (o.task, o.length, o.method, o.budget) == (row.task, row.length, row.method,
                                                                              row.budget) and o.density is not None
            ]  # fmt: skip
            if oracles:
                near = min(oracles, key=lambda o: abs(o.density - row.density))
                row = PrefillRow(**{**row.__dict__, "oracle": near.cell, "oracle_spec": near.prefill,
                                    "oracle_density": near.density})  # fmt: skip
        final.append(row)
    order = {DENSE_PREFILL: 0}
    final.sort(key=lambda r: (r.task, str(r.length), r.method, r.budget, order.get(r.prefill, 2 if r.is_oracle else 1)))
    return final


# ----------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryRow:
    """Mean KV-cache size of one method at one budget, and its ratio to an uncompressed cache."""

    method: str
    budget: Budget
    n: int
    kv_bytes: float
    kv_bytes_full: float | None
    ratio: float | None
    kv_tokens: float | None

    @property
    def compression(self) -> float:
        return self.budget.value if self.budget.kind == "compression" else math.nan


def memory_table(rows: Sequence[Row]) -> list[MemoryRow]:
    """Per method x budget (``full`` first, then budgets in order), pooled over views and tasks.

    ``ratio`` is mean ``kv_bytes`` / mean ``kv_bytes_full`` over the rows that report both.
    """
    groups = _group((r for r in rows if _finite(r.get("kv_bytes")) is not None), "method", "budget")
    out: list[MemoryRow] = []
    for m in methods_in_order(rows):
        for b in budgets_in_order(rows):
            g = groups.get((m, b))
            if not g:
                continue
            kv = [float(r["kv_bytes"]) for r in g]
            both = [(float(r["kv_bytes"]), f) for r in g if (f := _finite(r.get("kv_bytes_full"))) is not None]
            full_mean = math.fsum(f for _, f in both) / len(both) if both else None
            ratio = _ratio(math.fsum(k for k, _ in both) / len(both), full_mean) if both else None
            toks = [t for r in g if (t := _finite(r.get("kv_tokens"))) is not None]
            out.append(
                MemoryRow(
                    method=m,
                    budget=b,
                    n=len(g),
                    kv_bytes=math.fsum(kv) / len(kv),
                    kv_bytes_full=full_mean,
                    ratio=ratio,
                    kv_tokens=math.fsum(toks) / len(toks) if toks else None,
                )
            )
    return out


# ----------------------------------------------------------------------------------------------- terminal
INTERVAL_NOTE = "95% interval in brackets (Wilson for 0/1 scores, bootstrap otherwise)."
SIGNIFICANCE_NOTE = (
    "▲/▼: better/worse than full at 5% (paired test on the same samples: McNemar exact for 0/1 scores, sign-flip "
    "otherwise; Holm-corrected over the table's comparisons)."
)


def interval_text(cell: Cell, scale: float = 100.0) -> str:
    """``"[58, 86]"`` (×100, no decimals unless the interval is narrower than 1 point); ``""`` without one."""
    if not cell.interval or not math.isfinite(cell.lo):
        return ""
    digits = 1 if (cell.hi - cell.lo) * scale < 10 else 0
    return f"[{cell.lo * scale:.{digits}f}, {cell.hi * scale:.{digits}f}]"


def n_text(cell: Cell) -> str:
    """``"n=20"``, or ``"n=3 of 4 expected"`` when the configuration expects rows that are not there."""
    if cell.missing:
        return f"n={cell.present} of {cell.expected} expected"
    return f"n={cell.n}" + (" (aggregate)" if not cell.interval else "")


def marker(test: Comparison | None) -> str:
    """``▲``/``▼`` when significantly better/worse than the reference after Holm's correction, else ``""``."""
    if test is None or not test.significant:
        return ""
    return "▲" if test.delta > 0 else "▼"


def rich_summary_table(rows: Sequence[Row], mode: str, config: Mapping[str, Any] | None = None) -> Table:
    """A :class:`rich.table.Table` of mean score ×100 for one view: methods x budgets, ``full`` first.

    Each cell shows the score, a significance mark against ``full``, its 95% interval and ``n`` (with how many rows
    the ``config`` expects when some are missing). Cells with no rows show ``–``, or ``– n=0 of N expected`` when
    the configuration expects them; the caption explains the marks and lists cells with missing rows.
    """
    expectation = Expectation.from_config(config, rows)
    view_rows = [r for r in rows if view_of(r) == mode]
    table = Table(title=f"Mean score ×100 — query-{mode}", title_justify="left", caption_justify="left")
    table.add_column("method", style="bold")
    if not view_rows and not (expectation and any(v == mode for v, _m, _b in expectation.plan)):
        table.add_column("result")
        table.add_row("–", "no results")
        return table
    t = score_table(rows, mode, None, expectation)
    for b in t.budgets:
        table.add_column(b.label, justify="right")
    for m in t.methods:
        texts = []
        for b in t.budgets:
            cell = t.cells.get((m, b))
            want = expectation.expected(mode, m, b) if expectation else None
            if cell is None:
                texts.append(f"–\nn=0 of {len(want)} expected" if want else "–")
                continue
            mark = marker(t.vs_full.get((m, b)))
            texts.append(escape(f"{cell.mean * 100:.1f}{mark}\n{interval_text(cell)} {n_text(cell)}".rstrip()))
        table.add_row(escape(m), *texts, style="dim" if m == FULL_METHOD else None)
    notes = [escape("[lo, hi]: 95% interval. ▲/▼: differs from full at 5% (paired exact test, Holm-corrected).")]
    if t.full_from:
        notes.append(escape(f"full measured in {t.full_from}."))
    missing = missing_rows_messages([t])
    if missing:
        notes.append("[yellow]Incomplete: fewer rows than config.json implies —[/yellow]")
        notes += [f"[yellow]  {escape(line)}[/yellow]" for line in missing]
    table.caption = "\n".join(notes)
    return table


def summary_tables(rows: Sequence[Row], config: Mapping[str, Any] | None = None) -> list[Table]:
    """The terminal summary: a :func:`rich_summary_table` per view present (or planned by ``config``)."""
    expectation = Expectation.from_config(config, rows)
    views = views_in_order(rows)
    if expectation is not None:
        views += [v for v in sorted({v for v, _m, _b in expectation.plan if v in expectation.units}) if v not in views]
    return [rich_summary_table(rows, v, config) for v in views] or [rich_summary_table(rows, "agnostic")]
