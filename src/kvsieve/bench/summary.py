"""Pure summaries of benchmark result rows (the dicts of ``results.jsonl``).

Every function here takes the list of row dicts the benchmark runner writes, one per
(sample × method × compression × mode), and returns plain Python data; nothing touches a model or
the disk except the ``load_*`` helpers. All of them accept an empty list.

Conventions:

* the uncompressed baseline is the method named :data:`FULL_METHOD` (``"full"``);
* compressions are fractions of the context's KV removed (0 = nothing removed), rounded to
  :data:`_COMPRESSION_DIGITS` digits so that float noise never splits a group;
* rows whose ``score`` is missing or not finite are left out of score means (``n`` counts the rest).
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

FULL_METHOD = "full"
RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "config.json"
STREAMING_FILE = "streaming.jsonl"
MEMORY_FILE = "memory.jsonl"
MODE_ORDER = ("agnostic", "aware")

_COMPRESSION_DIGITS = 6

Row = Mapping[str, Any]
ScoreKey = tuple[str, str, float]
TaskScoreKey = tuple[str, str, str, float]


# ----------------------------------------------------------------------------------------------- loading
def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file into a list of dicts; a missing file gives ``[]``.

    Blank lines are skipped. Lines that are not a JSON object (a run killed mid-write leaves a
    truncated last line) are skipped with a :class:`UserWarning` naming the file and line numbers.
    """
    p = Path(path)
    if not p.is_file():
        return []
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    with p.open(encoding="utf-8") as fh:
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
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        warnings.warn(f"{p}: not valid JSON ({exc}); leaving the configuration out", stacklevel=2)
        return None
    return obj if isinstance(obj, dict) else None


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


def _unique(seq: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(seq))


def methods_in_order(rows: Sequence[Row]) -> list[str]:
    """Methods in order of first appearance, with :data:`FULL_METHOD` first when present."""
    ms = _unique(str(r.get("method", "?")) for r in rows)
    return ([FULL_METHOD] if FULL_METHOD in ms else []) + [m for m in ms if m != FULL_METHOD]


def modes_in_order(rows: Sequence[Row]) -> list[str]:
    """Modes present: ``agnostic``, ``aware``, then any other in order of first appearance."""
    ms = _unique(str(r.get("mode", "agnostic")) for r in rows)
    return [m for m in MODE_ORDER if m in ms] + [m for m in ms if m not in MODE_ORDER]


def tasks_in_order(rows: Sequence[Row]) -> list[str]:
    """Tasks in order of first appearance."""
    return _unique(str(r.get("task", "?")) for r in rows)


def compressions_in_order(rows: Sequence[Row]) -> list[float]:
    """Distinct compressions, ascending."""
    return sorted({norm_compression(r.get("compression")) for r in rows})


def _mean_n(values: list[float]) -> tuple[float, int]:
    return (math.fsum(values) / len(values), len(values)) if values else (math.nan, 0)


# ----------------------------------------------------------------------------------------------- scores
def mean_scores(rows: Sequence[Row]) -> dict[ScoreKey, tuple[float, int]]:
    """Mean score over all tasks and samples, keyed ``(mode, method, compression)`` → ``(mean, n)``."""
    groups: dict[ScoreKey, list[float]] = defaultdict(list)
    for r in rows:
        s = _finite(r.get("score"))
        if s is None:
            continue
        key = (
            str(r.get("mode", "agnostic")),
            str(r.get("method", "?")),
            norm_compression(r.get("compression")),
        )
        groups[key].append(s)
    return {k: _mean_n(v) for k, v in groups.items()}


def mean_scores_by_task(rows: Sequence[Row]) -> dict[TaskScoreKey, tuple[float, int]]:
    """Mean score per task, keyed ``(task, mode, method, compression)`` → ``(mean, n)``."""
    groups: dict[TaskScoreKey, list[float]] = defaultdict(list)
    for r in rows:
        s = _finite(r.get("score"))
        if s is None:
            continue
        key = (
            str(r.get("task", "?")),
            str(r.get("mode", "agnostic")),
            str(r.get("method", "?")),
            norm_compression(r.get("compression")),
        )
        groups[key].append(s)
    return {k: _mean_n(v) for k, v in groups.items()}


def full_reference(scores: Mapping[ScoreKey, tuple[float, int]], mode: str) -> tuple[float, int] | None:
    """The ``full`` baseline's ``(mean, n)`` for ``mode``.

    The full cache does not depend on the mode, so when a run recorded ``full`` in one mode only, the
    other modes borrow it (pooled over every mode that has it, weighted by ``n``).
    """
    own = [v for (md, m, _c), v in scores.items() if m == FULL_METHOD and md == mode]
    pool = own or [v for (_md, m, _c), v in scores.items() if m == FULL_METHOD]
    n = sum(k for _, k in pool)
    if n == 0:
        return None
    return math.fsum(mean * k for mean, k in pool) / n, n


@dataclass(frozen=True)
class BestMethod:
    """The best compressed method at one (mode, compression)."""

    mode: str
    compression: float
    method: str
    score: float
    n: int
    full_score: float | None
    runner_up: str | None
    runner_up_score: float | None

    @property
    def delta_vs_full(self) -> float | None:
        """``score - full_score`` (negative: the method loses accuracy)."""
        return None if self.full_score is None else self.score - self.full_score


def best_method_per_budget(rows: Sequence[Row]) -> list[BestMethod]:
    """For each mode × compression, the non-``full`` method with the highest mean score.

    Ties go to the method name that sorts first. Ordered by mode (see :func:`modes_in_order`), then
    compression ascending.
    """
    scores = mean_scores(rows)
    out: list[BestMethod] = []
    for mode in modes_in_order(rows):
        ref = full_reference(scores, mode)
        for c in compressions_in_order(rows):
            cands = sorted(
                ((v[0], v[1], m) for (md, m, cc), v in scores.items() if md == mode and cc == c and m != FULL_METHOD),
                key=lambda t: (-t[0], t[2]),
            )
            if not cands:
                continue
            score, n, method = cands[0]
            runner = cands[1] if len(cands) > 1 else None
            out.append(
                BestMethod(
                    mode=mode,
                    compression=c,
                    method=method,
                    score=score,
                    n=n,
                    full_score=ref[0] if ref else None,
                    runner_up=runner[2] if runner else None,
                    runner_up_score=runner[0] if runner else None,
                )
            )
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
        m = str(r.get("method", "?"))
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


# ----------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryRow:
    """Mean KV-cache size of one method at one compression, and its ratio to an uncompressed cache."""

    method: str
    compression: float
    n: int
    kv_bytes: float
    kv_bytes_full: float | None
    ratio: float | None
    kv_tokens: float | None


def memory_table(rows: Sequence[Row]) -> list[MemoryRow]:
    """Per method × compression (``full`` first, then compression ascending), pooled over modes and tasks.

    ``ratio`` is mean ``kv_bytes`` / mean ``kv_bytes_full`` over the rows that report both.
    """
    groups: dict[tuple[str, float], list[Row]] = defaultdict(list)
    for r in rows:
        if _finite(r.get("kv_bytes")) is None:
            continue
        groups[(str(r.get("method", "?")), norm_compression(r.get("compression")))].append(r)
    out: list[MemoryRow] = []
    for m in methods_in_order(rows):
        for c in compressions_in_order(rows):
            g = groups.get((m, c))
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
                    compression=c,
                    n=len(g),
                    kv_bytes=math.fsum(kv) / len(kv),
                    kv_bytes_full=full_mean,
                    ratio=ratio,
                    kv_tokens=math.fsum(toks) / len(toks) if toks else None,
                )
            )
    return out


# ----------------------------------------------------------------------------------------------- terminal
def format_compression(c: float) -> str:
    """``0.875`` → ``"87.5%"``."""
    return f"{c * 100:.4g}%"


def rich_summary_table(rows: Sequence[Row], mode: str) -> Table:
    """A :class:`rich.table.Table` of mean score ×100 for one mode: methods × compressions, ``full`` first.

    Cells with no rows show ``–``. With no rows for ``mode`` the table holds a single "no results" line.
    """
    mode_rows = [r for r in rows if str(r.get("mode", "agnostic")) == mode]
    table = Table(title=f"Mean score ×100 — query-{mode}", title_justify="left")
    table.add_column("method", style="bold")
    if not mode_rows:
        table.add_column("result")
        table.add_row("–", "no results")
        return table
    scores = mean_scores(mode_rows)
    comps = compressions_in_order(mode_rows)
    for c in comps:
        table.add_column(format_compression(c), justify="right")
    for m in methods_in_order(mode_rows):
        cells = []
        for c in comps:
            v = scores.get((mode, m, c))
            cells.append(f"{v[0] * 100:.1f}" if v else "–")
        table.add_row(m, *cells, style="dim" if m == FULL_METHOD else None)
    return table
