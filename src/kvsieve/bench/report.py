"""A self-contained HTML report of a benchmark run directory.

:func:`write_report` reads ``results.jsonl`` (and, when present, ``config.json``, ``streaming.jsonl``,
``memory.jsonl`` and kvpress result directories below it) and writes ``report.html`` beside them: one file with its
CSS inline and every chart an inline SVG drawn by matplotlib (:mod:`kvsieve.charts`). It refers to nothing outside
itself (no scripts, fonts, stylesheets or images from anywhere), so it opens offline and can be mailed or attached
to a CI run as is. Even the text taken from the data is written so that the file never contains a URL scheme
(``"://"`` is written as ``":&#47;&#47;"``, which displays the same).

Every score cell shows the mean score ×100, its 95% interval and n, and marks a difference from ``full`` that is
significant at 5% after Holm's correction (:mod:`kvsieve.bench.summary`, :mod:`kvsieve.bench.stats`); the cell's
numbers are also in its ``data-*`` attributes. Every chart is a ``<figure class="chart" data-chart="ID"
data-spec="JSON">`` whose ``data-spec`` holds the plotted series.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shlex
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvsieve import __version__
from kvsieve.bench.kvpress_reader import SOURCE as KVPRESS
from kvsieve.bench.kvpress_reader import find_kvpress_dirs, read_kvpress_results
from kvsieve.bench.stats import Comparison, adjust
from kvsieve.bench.summary import (
    CONFIG_FILE,
    FULL_METHOD,
    MEMORY_FILE,
    NO_COMPRESSION,
    PARTIAL_FILE,
    RESULTS_FILE,
    SIGNIFICANCE_NOTE,
    STREAMING_FILE,
    Budget,
    Cell,
    Row,
    ScoreTable,
    best_method_per_budget,
    budget_of,
    compare,
    interval_text,
    load_config,
    load_jsonl,
    load_rows,
    make_cell,
    marker,
    memory_table,
    method_label,
    methods_in_order,
    missing_rows_messages,
    modes_in_order,
    n_text,
    norm_compression,
    partial_lines,
    prefill_table,
    score_tables,
    speed_table,
    view_of,
    views_in_order,
)
from kvsieve.charts import STYLES, BarChart, Line, LineChart, colors_for, figure_html, short

REPORT_FILE = "report.html"
MAX_DETAIL_ROWS = 5000
MODE_TITLES = {"agnostic": "Query-agnostic", "aware": "Query-aware"}
SCORE_AXIS = {"y_label": "score ×100", "y_range": (-3.0, 103.0), "y_fmt": lambda t: f"{t:.0f}"}
Colors = Mapping[str, tuple[str, str]]


# ============================================================================================ text helpers
class Html(str):
    """A string that is already HTML and must not be escaped again."""

    __slots__ = ()


def esc(value: Any) -> str:
    """HTML-escape ``value`` (quotes included) and break any ``scheme://`` so the file holds no URL."""
    return html.escape(str(value), quote=True).replace("://", ":&#47;&#47;")


def _cell(value: Any) -> str:
    return value if isinstance(value, Html) else esc(value)


def _sig3(v: float) -> str:
    """Three significant digits without falling into exponent notation for values up to 10⁶."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def fmt_bytes(b: float | None) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    if b is None or not math.isfinite(b):
        return "–"
    unit, scale = _byte_unit(abs(b))
    return f"{_sig3(b / scale)} {unit}" if unit != "B" else f"{b:.0f} B"


def _byte_unit(b: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if b >= scale:
            return unit, scale
    return "B", 1.0


def fmt_seconds(s: float | None) -> str:
    """Seconds as ``"12.3 ms"`` / ``"1.23 s"``."""
    if s is None or not math.isfinite(s):
        return "–"
    if s < 1e-3:
        return f"{_sig3(s * 1e6)} µs"
    if s < 1:
        return f"{_sig3(s * 1e3)} ms"
    return f"{_sig3(s)} s"


def fmt_ratio(r: float | None) -> str:
    """``0.834`` → ``"0.83×"``."""
    return "–" if r is None or not math.isfinite(r) else f"{r:.2f}×"


def fmt_tokens(x: float) -> str:
    """Token counts for axes: ``4096`` → ``"4.1k"``."""
    return f"{x / 1000:.3g}k" if abs(x) >= 1000 else f"{x:.3g}"


def _score100(s: float | None) -> str:
    return "–" if s is None or not math.isfinite(s) else f"{s * 100:.1f}"


def slug(text: str) -> str:
    """A stable identifier fragment: lower case, ``[a-z0-9-]`` only."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "x"


def _mode_title(view: str) -> str:
    """``"agnostic · multiturn"`` → ``"Query-agnostic · multi-turn conversation"``."""
    mode, _, turn = view.partition(" · ")
    return MODE_TITLES.get(mode, mode.capitalize()) + (" · multi-turn conversation" if turn else "")


# ============================================================================================ HTML pieces
def html_table(
    headers: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    *,
    cls: str = "",
    align: str = "",
    cell_attrs: Callable[[int, int], str] | None = None,
) -> str:
    """A ``<table>``; cells are escaped unless they are :class:`Html`.

    ``align`` gives one letter per column, ``l`` (left) or ``r`` (right); by default the first column is
    left-aligned and the others right-aligned. ``cell_attrs(row, col)`` returns extra ``<td>`` attributes.
    """

    def cls_of(j: int) -> str:
        a = align[j] if j < len(align) else ("l" if j == 0 else "r")
        return ' class="l"' if a == "l" else ' class="r"'

    head = "".join(f"<th{cls_of(j)}>{_cell(h)}</th>" for j, h in enumerate(headers))
    body: list[str] = []
    for i, row in enumerate(rows):
        cells = "".join(
            f"<td{cls_of(j)}{(' ' + cell_attrs(i, j)) if cell_attrs else ''}>{_cell(c)}</td>" for j, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cls_attr = f' class="{esc(cls)}"' if cls else ""
    return (
        f'<div class="table-wrap"><table{cls_attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _meta_value(config: Mapping[str, Any] | None, *keys: str) -> Any:
    if not config:
        return None
    for k in keys:
        if config.get(k) not in (None, "", []):
            return config[k]
    return None


_COMMAND_KEYS = ("command", "command_line", "cmdline", "argv")


def _command_text(cmd: Any) -> str | None:
    if cmd is None:
        return None
    if isinstance(cmd, list | tuple):
        return shlex.join(str(c) for c in cmd)
    return str(cmd)


def _versions(rows: Sequence[Row], config: Mapping[str, Any] | None) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = defaultdict(list)
    sources: list[Any] = [r.get("versions") for r in rows]
    if config:
        sources.append(config.get("versions"))
    for v in sources:
        if isinstance(v, Mapping):
            for k, ver in v.items():
                if ver is not None and str(ver) not in seen[str(k)]:
                    seen[str(k)].append(str(ver))
    return dict(seen)


def _header(rows: Sequence[Row], config: Mapping[str, Any] | None, run_dir: Path) -> str:
    models = list(dict.fromkeys(str(r["model"]) for r in rows if r.get("model")))
    model = ", ".join(models) or _meta_value(config, "model", "model_name") or "unknown model"
    stamps = sorted(str(r["timestamp"]) for r in rows if r.get("timestamp"))
    if stamps:
        date = stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} → {stamps[-1]}"
    else:
        date = _meta_value(config, "date", "timestamp", "started", "started_at") or "–"
    versions = _versions(rows, config)
    ver_html = " ".join(f'<span class="pill">{esc(k)} {esc(" / ".join(v))}</span>' for k, v in versions.items()) or "–"
    command = _command_text(_meta_value(config, *_COMMAND_KEYS))
    runs = list(dict.fromkeys(str(r["run_id"]) for r in rows if r.get("run_id") and r.get("source") != KVPRESS))
    kvpress_dirs = len({r.get("run_id") for r in rows if r.get("source") == KVPRESS})
    kvpress_rows = sum(1 for r in rows if r.get("source") == KVPRESS)
    count = f"{len(rows) - kvpress_rows:,}" + (
        f" from {RESULTS_FILE}, {kvpress_rows:,} from {kvpress_dirs:,} kvpress result directories"
        if kvpress_rows
        else ""
    )
    items = [
        ("Model", esc(model)),
        ("Date", esc(date)),
        ("Versions", ver_html),
        ("Command", f"<code>{esc(command)}</code>" if command else "–"),
        ("Run", esc(", ".join(runs)) if runs else "–"),
        ("Directory", f"<code>{esc(run_dir)}</code>"),
        ("Rows", esc(count)),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f'<header><h1>kvsieve report <span class="model">{esc(model)}</span></h1><dl class="meta">{dl}</dl></header>'


def _section(sid: str, title: str, body: str, intro: str | None = None) -> str:
    p = f'<p class="intro">{esc(intro)}</p>' if intro else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{p}{body}</section>'


# ---------------------------------------------------------------------------------------------- sections
def _heat(score: float) -> str:
    """A light blue background whose depth follows a score in [0, 1]."""
    s = min(max(score, 0.0), 1.0)
    return f"background:hsl(212,80%,{97 - 24 * s:.0f}%)"


def _data_attrs(values: Mapping[str, Any]) -> str:
    """``data-*`` attributes (numbers to 6 significant digits), leaving out ``None`` and NaN."""
    out = []
    for k, v in values.items():
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        out.append(f'data-{k}="{esc(f"{v:.6g}" if isinstance(v, float) else v)}"')
    return " ".join(out)


def _tip(cell: Cell, test: Comparison | None = None, reference: str = "full") -> str:
    """``"75.0 [50, 90] (n = 4); vs full −12.5, p = 0.5 (McNemar exact; Holm 1)"``."""
    text = f"{_score100(cell.mean)} {interval_text(cell)} ({n_text(cell).replace('=', ' = ', 1)})".replace("  ", " ")
    if test is not None:
        text += (
            f"; vs {reference} on {test.n} paired samples {test.delta * 100:+.1f}, p = {test.p:.2g} "
            f"({test.test}; Holm-adjusted {test.p_holm:.2g})" + (", significant at 5%" if test.significant else "")
        )
    return text


def _score_cell(cell: Cell | None, test: Comparison | None = None, expected: int | None = None) -> Html:
    """A table cell: score ×100 on a heat background, a ▲/▼ mark, and under it the 95% interval and n."""
    if cell is None:
        missing = f'<div class="sub warn">n=0 of {expected} expected</div>' if expected else ""
        return Html(f'<span class="na">–</span>{missing}')
    mark = marker(test)
    sig = "" if not mark or test is None else ("better" if test.delta > 0 else "worse")
    attrs = _data_attrs(
        {
            "mean": cell.mean,
            "n": cell.n,
            "lo": cell.lo,
            "hi": cell.hi,
            "interval": cell.interval or None,
            "expected": cell.expected,
            "present": cell.present,
            "p": test.p if test else None,
            "p-holm": test.p_holm if test else None,
            "sig": sig or None,
        }
    )
    sub = f"{interval_text(cell)} {n_text(cell)}".strip()
    return Html(
        f'<span class="score" {attrs}><span class="heat" style="{_heat(cell.mean)}" title="{esc(_tip(cell, test))}">'
        f'{_score100(cell.mean)}</span><span class="mark {sig}">{mark}</span></span>'
        f'<div class="sub{" warn" if cell.missing else ""}">{esc(sub)}</div>'
    )


def _score_table(t: ScoreTable, expected: Callable[[str, Budget], int | None]) -> str:
    headers = ["method", *[b.label for b in t.budgets]]
    body = [
        [Html(f'<span data-method="{esc(m)}">{esc(m)}</span>')]
        + [_score_cell(t.cells.get((m, b)), t.vs_full.get((m, b)), expected(m, b)) for b in t.budgets]
        for m in t.methods
    ]
    return html_table(headers, body, cls="scores")


def _table_note(t: ScoreTable) -> str:
    parts = []
    if t.full_from:
        parts.append(
            f"full is not in this mode: its row comes from {t.full_from} (the full cache does not depend on it)."
        )
    if t.tests:
        parts.append(f"▲/▼ Holm-corrected over the {t.tests} comparison(s) with full in this table.")
    return f'<p class="note">{esc(" ".join(parts))}</p>' if parts else ""


def _expected_lookup(t: ScoreTable) -> Callable[[str, Budget], int | None]:
    want = {(m, b): w for m, b, w, _h in t.missing}
    return lambda m, b: want.get((m, b))


def _score_lines(t: ScoreTable, colors: Colors, label: str, kind: str = "compression") -> list[Line]:
    """A reference line for full and a line per method over the budgets of ``kind``, with 95% intervals."""
    lines: list[Line] = []
    if t.full is not None:
        c = t.full
        tip = f"full: {_tip(c)} — {label}" + (f" (from {t.full_from})" if t.full_from else "")
        lines.append(Line(FULL_METHOD, [(0.0, c.mean * 100)], [tip], color=colors[FULL_METHOD][0], reference=True))
    for m in t.methods:
        pts = [(b, t.cells[(m, b)]) for b in t.budgets if b.kind == kind and (m, b) in t.cells]
        if m == FULL_METHOD or not pts:
            continue
        lines.append(
            Line(
                m,
                [(b.value, c.mean * 100) for b, c in pts],
                [f"{m} @ {b.label}: {_tip(c, t.vs_full.get((m, b)))} — {label}" for b, c in pts],
                [(c.lo * 100, c.hi * 100) if c.interval else (c.mean * 100, c.mean * 100) for _b, c in pts],
                *colors[m],
            )
        )
    return lines


def _score_chart(cid: str, title: str, t: ScoreTable, colors: Colors, label: str, kind: str, subtitle: str) -> str:
    values = sorted({b.value for b in t.budgets if b.kind == kind})
    if kind == "compression":
        axis = {
            "x_label": "compression (fraction of KV removed)",
            "x_ticks": sorted({0.0, *values}),
            "x_fmt": lambda v: f"{v * 100:.4g}%",
        }
    else:
        axis = {"x_label": "token budget (log scale)", "x_ticks": values, "x_fmt": lambda v: f"{v:,.0f}", "log_x": True}
    return figure_html(
        LineChart(cid, title, _score_lines(t, colors, label, kind), subtitle=subtitle, **axis, **SCORE_AXIS)
    )


def _scores_parts(rows: Sequence[Row], config: Mapping[str, Any] | None, colors: Colors, prefix: str) -> dict:
    """The summary tables, the score charts and the best-method table of one model's rows."""
    tables = score_tables(rows, config)
    overall = [t for t in tables if t.task is None]
    if not any(t.cells for t in overall):
        msg = (
            f'<p class="empty"><strong>No scores.</strong> All {len(rows):,} rows lack a finite score, '
            "so there is nothing to summarise or plot.</p>"
        )
        return {"summary": msg, "curves": "", "best": "", "missing": missing_rows_messages(overall)}
    summary, curves = [], []
    for t in overall:
        title = _mode_title(t.view)
        per_task = [u for u in tables if u.view == t.view and u.task is not None]
        task_html = "".join(f"<h4>{esc(u.task)}</h4>{_score_table(u, _expected_lookup(u))}" for u in per_task)
        summary.append(
            f"<h3>{esc(title)}</h3>{_score_table(t, _expected_lookup(t))}{_table_note(t)}"
            + (f"<details><summary>Scores per task</summary>{task_html}</details>" if per_task else "")
        )
        v = slug(t.view)
        n_rows = sum(c.n for (m, _b), c in t.cells.items() if m != FULL_METHOD)
        figs = []
        for kind, suffix in (("compression", ""), ("tokens", "-tokens")):
            if any(b.kind == kind and m != FULL_METHOD for m, b in t.cells):
                figs.append(
                    _score_chart(
                        f"{prefix}score-{v}-all{suffix}",
                        "All tasks",
                        t,
                        colors,
                        "all tasks",
                        kind,
                        f"{title} · mean over tasks · {n_rows:,} scored rows",
                    )
                )
                figs += [
                    _score_chart(
                        f"{prefix}score-{v}-task-{slug(u.task or '')}{suffix}",
                        u.task or "",
                        u,
                        colors,
                        u.task or "",
                        kind,
                        title,
                    )
                    for u in per_task
                    if any(b.kind == kind and m != FULL_METHOD for m, b in u.cells)
                ]
        curves.append(f'<h3>{esc(title)}</h3><div class="charts">{"".join(figs)}</div>' if figs else "")
    return {
        "summary": "".join(summary),
        "curves": "".join(curves),
        "best": _best_table(rows, tables),
        "missing": missing_rows_messages(overall),
    }


def _best_table(rows: Sequence[Row], tables: list[ScoreTable]) -> str:
    best = best_method_per_budget(rows, tables)
    if not best:
        return '<p class="empty">No compressed methods in the results.</p>'

    def versus(test: Comparison | None, ref: str) -> Html:
        if test is None:
            return Html('<span class="na">–</span>')
        attrs = _data_attrs({"p": test.p, "p-holm": test.p_holm, "delta": test.delta, "sig": int(test.significant)})
        verdict = "significant" if test.significant else "not significant"
        title = f"{test.test} on {test.n} paired samples; p = {test.p:.2g}, Holm-adjusted {test.p_holm:.2g}"
        return Html(
            f'<span class="versus" {attrs} title="{esc(title)}">{test.delta * 100:+.1f} '
            f'<span class="{"warn" if test.significant else "na"}">(p = {test.p_holm:.2g}, {verdict})</span></span>'
        )

    body = [
        [
            _mode_title(b.mode),
            b.budget.label,
            Html(f"<strong>{esc(b.method)}</strong>"),
            _score_cell(b.cell, b.vs_full),
            _score_cell(b.full),
            versus(b.vs_full, "full"),
            b.runner_up or "–",
            _score_cell(b.runner_up_cell),
            versus(b.vs_runner_up, b.runner_up or ""),
        ]
        for b in best
    ]
    return html_table(
        [
            "mode",
            "budget",
            "best method",
            "score",
            "full",
            "best − full",
            "runner-up",
            "runner-up score",
            "best − runner-up",
        ],
        body,
        cls="best",
        align="lrlrrrlrr",
    )


def _questions_section(rows: Sequence[Row], colors: Colors, prefix: str) -> str:
    """Scores per question of multi-question tasks: does a compressed cache hold up over later questions?"""
    multi = {r.get("task") for r in rows if (r.get("question_index") or 0) > 0}
    rows = [r for r in rows if r.get("task") in multi]
    if not rows:
        return ""
    parts = []
    for view in views_in_order(rows):
        groups: dict[tuple[str, Budget, int], list[Row]] = defaultdict(list)
        for r in rows:
            if view_of(r) == view:
                groups[(method_label(r), budget_of(r), int(r.get("question_index") or 0))].append(r)
        cells = {k: c for k, g in groups.items() if (c := make_cell(g)) is not None}
        questions = sorted({q for _m, _b, q in cells})
        tests = {
            k: c
            for k, cell in cells.items()
            if k[0] != FULL_METHOD
            and (full := cells.get((FULL_METHOD, NO_COMPRESSION, k[2]))) is not None
            and (c := compare(cell, full)) is not None
        }
        tests = adjust(tests)
        keys = sorted({(m, b) for m, b, _q in cells}, key=lambda mb: (mb[0] != FULL_METHOD, mb[1], mb[0]))
        body = [
            [m, b.label, *[_score_cell(cells.get((m, b, q)), tests.get((m, b, q))) for q in questions]] for m, b in keys
        ]
        table = html_table(
            ["method", "budget", *[f"question {q + 1}" for q in questions]], body, cls="questions", align="ll"
        )
        figs = []
        for budget in sorted({b for _m, b in keys if b != NO_COMPRESSION}):
            lines = [
                Line(
                    m,
                    [(q + 1, cells[(m, b, q)].mean * 100) for q in questions if (m, b, q) in cells],
                    [f"{m} question {q + 1}: {_tip(cells[(m, b, q)])}" for q in questions if (m, b, q) in cells],
                    color=colors[m][0],
                    style="--" if m == FULL_METHOD else colors[m][1],
                )
                for m, b in keys
                if b in (budget, NO_COMPRESSION)
            ]
            figs.append(
                figure_html(
                    LineChart(
                        f"{prefix}questions-{slug(view)}-{budget.slug}",
                        f"Score per question at {budget.label}",
                        lines,
                        x_label="question (in the order asked)",
                        x_ticks=[q + 1 for q in questions],
                        x_fmt=lambda v: f"{v:.0f}",
                        subtitle=_mode_title(view),
                        **SCORE_AXIS,
                    )
                )
            )
        parts.append(
            f"<h3>{esc(_mode_title(view))}</h3>{table}" + (f'<div class="charts">{"".join(figs)}</div>' if figs else "")
        )
    note = f'<p class="note">{esc("▲/▼ against full on the same question, Holm-corrected per table.")}</p>'
    return "".join(parts) + note


def _memory_section(rows: Sequence[Row], memory_rows: Sequence[Row], colors: Colors) -> str:
    parts: list[str] = []
    mem = memory_table(rows)
    if mem:
        parts.append(
            html_table(
                ["method", "budget", "rows", "KV tokens / layer", "KV bytes", "full KV bytes", "ratio"],
                [
                    [
                        m.method,
                        m.budget.label,
                        m.n,
                        "–" if m.kv_tokens is None else f"{m.kv_tokens:,.0f}",
                        fmt_bytes(m.kv_bytes),
                        fmt_bytes(m.kv_bytes_full),
                        "–" if m.ratio is None else f"{m.ratio * 100:.1f}%",
                    ]
                    for m in mem
                ],
                cls="memory",
            )
        )
        # kv_bytes vs context length: one small chart per budget, full as the reference in each.
        groups: dict[tuple[str, Budget, int], list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            kb, ct = r.get("kv_bytes"), r.get("context_tokens")
            if isinstance(kb, int | float) and isinstance(ct, int | float):
                key = (method_label(r), budget_of(r), int(r.get("length") or ct))
                groups[key].append((float(ct), float(kb)))
        points: dict[tuple[str, Budget], list[tuple[float, float]]] = defaultdict(list)
        for (m, b, _length), vals in groups.items():
            points[(m, b)].append((sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals)))
        unit, scale = _byte_unit(max((b for pts in points.values() for _, b in pts), default=0.0))
        budgets = sorted({b for (_m, b) in points if b != NO_COMPRESSION}) or sorted({b for (_m, b) in points})
        figs: list[str] = []
        for budget in budgets:
            lines = [
                Line(
                    m,
                    [(x, b / scale) for x, b in points[key]],
                    [
                        f"{m}{'' if m == FULL_METHOD else ' @ ' + budget.label}: {fmt_bytes(b)} at {x:,.0f} tokens"
                        for x, b in points[key]
                    ],
                    color=colors[m][0],
                    style=colors[m][1],
                )
                for m in methods_in_order(rows)
                if (key := (m, NO_COMPRESSION) if m == FULL_METHOD else (m, budget)) in points
            ]
            figs.append(
                figure_html(
                    LineChart(
                        f"memory-context-{budget.slug}",
                        f"KV cache at {budget.label}",
                        lines,
                        x_label="context length (tokens)",
                        y_label=f"KV cache ({unit})",
                        x_fmt=fmt_tokens,
                        zero_based=True,
                        subtitle="mean bytes of K and V held after prefill",
                    )
                )
            )
        parts.append(f'<div class="charts">{"".join(figs)}</div>')
    if memory_rows:
        parts.append(_measured_memory(memory_rows, colors))
    if not parts:
        return ""
    return _section(
        "memory",
        "Memory",
        "".join(parts),
        "Bytes of the K and V tensors held after prefill, per method and budget, against context length.",
    )


def _measured_memory(memory_rows: Sequence[Row], colors: Colors) -> str:
    by_series: dict[str, list[Row]] = defaultdict(list)
    for r in memory_rows:
        variant = r.get("variant")
        name = str(r.get("method", "?")) + (f" · {variant}" if variant not in (None, "") else "")
        by_series[name].append(r)
    figs: list[str] = []
    for field_name, cid, title, what in (
        ("kv_bytes", "memory-measured-kv", "Measured KV cache", "KV cache"),
        ("peak_rss_bytes", "memory-measured-rss", "Peak resident memory", "peak RSS"),
    ):
        vals = [float(r[field_name]) for rs in by_series.values() for r in rs if _num(r.get(field_name)) is not None]
        if not vals:
            continue
        unit, scale = _byte_unit(max(vals))
        lines: list[Line] = []
        for name, rs in by_series.items():
            method = str(rs[0].get("method", "?"))
            pts = [
                (float(r["context_tokens"]), float(r[field_name]))
                for r in rs
                if _num(r.get(field_name)) is not None and _num(r.get("context_tokens")) is not None
            ]
            same_method = [n for n in by_series if n.split(" · ")[0] == method]
            lines.append(
                Line(
                    name,
                    [(x, y / scale) for x, y in pts],
                    [f"{name}: {fmt_bytes(y)} at {x:,.0f} tokens" for x, y in pts],
                    color=colors[method][0],
                    style=STYLES[same_method.index(name) % len(STYLES)],
                )
            )
        figs.append(
            figure_html(
                LineChart(
                    cid,
                    title,
                    lines,
                    x_label="context length (tokens)",
                    y_label=f"{what} ({unit})",
                    x_fmt=fmt_tokens,
                    zero_based=True,
                    subtitle="from memory.jsonl",
                )
            )
        )
    return f'<h3>Measured memory</h3><div class="charts">{"".join(figs)}</div>' if figs else ""


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _speed_section(rows: Sequence[Row]) -> str:
    speed = speed_table(rows)
    if not speed:
        return ""
    table = html_table(
        ["method", "rows", "prefill (median)", "prefill vs full", "decode / token (median)", "decode vs full"],
        [
            [
                s.method,
                s.n,
                fmt_seconds(s.prefill_seconds) + (" *" if s.prefill_shared else ""),
                fmt_ratio(s.prefill_ratio),
                fmt_seconds(s.decode_seconds_per_token),
                fmt_ratio(s.decode_ratio),
            ]
            for s in speed
        ],
        cls="speed",
    )
    notes = (
        '<p class="note">* only shared prefills were recorded for this method.</p>'
        if any(s.prefill_shared for s in speed)
        else ""
    )
    compressed = [s for s in speed if s.method != FULL_METHOD and (s.prefill_ratio or s.decode_ratio)]
    chart = ""
    if compressed:
        bars = BarChart(
            "speed",
            "Time relative to the full cache",
            [s.method for s in compressed],
            {"prefill": [s.prefill_ratio for s in compressed], "decode / token": [s.decode_ratio for s in compressed]},
            y_label="time ÷ full",
            tips={
                "prefill": [
                    f"{s.method} prefill: {fmt_ratio(s.prefill_ratio)} of full ({fmt_seconds(s.prefill_seconds)})"
                    for s in compressed
                ],
                "decode / token": [
                    f"{s.method} decode: {fmt_ratio(s.decode_ratio)} of full "
                    f"({fmt_seconds(s.decode_seconds_per_token)} / token)"
                    for s in compressed
                ],
            },
            ref=1.0,
            ref_label="full = 1×",
            subtitle="median over rows; below 1× is faster than the uncompressed cache",
            y_fmt=lambda t: f"{t:.2f}×" if t < 10 else f"{t:.0f}×",
        )
        chart = f'<div class="charts">{figure_html(bars)}</div>'
    return _section("speed", "Speed", chart + table + notes, "Median prefill time and decode time per token.")


def _prefill_section(rows: Sequence[Row]) -> str:
    """Sparse prefill, reported apart from cache compression: score vs prefill time vs attention density per
    attention-compute method, beside dense prefill and the oracle's score at the nearest density."""
    table = prefill_table(rows)
    if not table:
        return ""

    def density(d: float | None) -> str:
        return "–" if d is None else f"{d:.0%}"

    body = html_table(
        [
            "task",
            "length",
            "cache method",
            "prefill",
            "score",
            "vs dense",
            "density",
            "prefill (median)",
            "speed-up",
            "oracle at that density",
        ],
        [
            [
                r.task,
                r.length if r.length is not None else "–",
                f"{r.method} @ {r.budget.label}" if r.budget.value else r.method,
                r.prefill + (" (oracle, not faster)" if r.is_oracle else ""),
                _score_cell(r.cell, r.test),
                "–" if r.delta_vs_dense is None else f"{r.delta_vs_dense * 100:+.1f}",
                density(r.density),
                fmt_seconds(r.prefill_seconds),
                "–" if r.speedup is None else f"{r.speedup:.2f}×",
                Html(
                    f"{_score_cell(r.oracle)}<div class='sub'>{esc(r.oracle_spec)} at {density(r.oracle_density)}</div>"
                )
                if r.oracle is not None
                else "–",
            ]
            for r in table
        ],
        cls="prefill",
        align="llllrrrrrr",
    )
    note = (
        '<p class="note">Density: the share of causal (query, key) pairs the prefill computed (kvsieve.sparse '
        "records it per layer and head). Speed-up: dense prefill's median time over this method's, on rows that ran "
        "their own prefill (run with --no-shared-prefill for cache methods that share one). The oracle "
        "(oracle_topk) picks blocks by the true attention mass: the best score any block selector could reach at "
        "its density, never faster than dense. ▲/▼: paired test against dense prefill, Holm-corrected.</p>"
    )
    return _section(
        "prefill",
        "Sparse prefill",
        body + note,
        "Attention-compute methods: score, prefill time and attention density against dense prefill.",
    )


def _streaming_section(stream_rows: Sequence[Row], colors: Colors) -> str:
    if not stream_rows:
        return ""
    by_series: dict[tuple[str, Any], list[Row]] = defaultdict(list)
    for r in stream_rows:
        by_series[(str(r.get("method", "?")), r.get("budget"))].append(r)
    budgets_of: dict[str, list[Any]] = defaultdict(list)
    for m, b in by_series:
        budgets_of[m].append(b)
    lines: list[Line] = []
    dropped = 0
    table_rows: list[list[Any]] = []
    for (m, b), rs in by_series.items():
        name = m if b is None else f"{m} ({b} tokens)"
        pts: list[tuple[float, float]] = []
        tips: list[str] = []
        for r in sorted(rs, key=lambda r: _num(r.get("bucket_start")) or 0):
            ppl, s0, s1 = _num(r.get("ppl")), _num(r.get("bucket_start")) or 0, _num(r.get("bucket_end")) or 0
            if ppl is None or not math.isfinite(ppl) or ppl <= 0:
                dropped += 1
                continue
            pts.append(((s0 + s1) / 2, ppl))
            tips.append(f"{name}: ppl {ppl:.4g} on tokens {s0:,.0f}–{s1:,.0f}")
        style = STYLES[budgets_of[m].index(b) % len(STYLES)]
        lines.append(Line(name, pts, tips, color=colors[m][0], style=style))
        last = rs[-1] if rs else {}
        table_rows.append(
            [
                name,
                len(rs),
                f"{sum(p for _, p in pts) / len(pts):.4g}" if pts else "–",
                f"{max(p for _, p in pts):.4g}" if pts else "–",
                f"{last.get('kv_tokens'):,}" if isinstance(last.get("kv_tokens"), int) else "–",
            ]
        )
    ys = [y for ln in lines for _, y in ln.points]
    log_y = bool(ys) and max(ys) / min(ys) > 10
    chart = LineChart(
        "streaming",
        "Perplexity per 1k-token bucket",
        lines,
        x_label="position in stream (tokens)",
        y_label="perplexity" + (" (log scale)" if log_y else ""),
        caption=f"{dropped} bucket(s) with a non-finite perplexity left out." if dropped else None,
        x_fmt=fmt_tokens,
        log_y=log_y,
        subtitle="full past the model's window shows where an unbounded cache fails",
    )
    table = html_table(["series", "buckets", "mean ppl", "max ppl", "KV tokens (last)"], table_rows, cls="streaming")
    return _section("streaming", "Streaming perplexity", f'<div class="charts">{figure_html(chart)}</div>{table}')


def _warnings_box(missing: Sequence[str], partial: int) -> str:
    items = list(missing)
    if partial:
        items.append(
            f"{partial} incomplete line(s) from an interrupted run are set aside in {PARTIAL_FILE}; a rerun of the "
            "same command redoes their rows."
        )
    if not items:
        return ""
    lis = "".join(f"<li>{esc(i)}</li>" for i in items)
    head = "Incomplete results" + (
        ": fewer rows than the run's config.json implies (these cells are scored on the rows present)"
        if missing
        else ""
    )
    return f'<div class="warnings" role="alert"><strong>{esc(head)}</strong><ul>{lis}</ul></div>'


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and not prefix:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _config_value(v: Any) -> Html:
    if isinstance(v, list | tuple) and all(isinstance(x, str | int | float | bool) or x is None for x in v):
        text = ", ".join("null" if x is None else str(x) for x in v)
    elif isinstance(v, str | int | float | bool) or v is None:
        text = "null" if v is None else str(v)
    else:
        text = json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
    return Html(f"<code>{esc(text)}</code>")


def _config_section(config: Mapping[str, Any] | None) -> str:
    if not config:
        return ""
    rows = [
        [k, Html(f"<code>{esc(_command_text(v))}</code>") if k in _COMMAND_KEYS else _config_value(v)]
        for k, v in _flatten(config)
    ]
    return _section("config", "Run configuration", html_table(["key", "value"], rows, cls="config", align="ll"))


def _details_section(rows: Sequence[Row]) -> str:
    if not rows:
        return ""
    method_rank = {m: i for i, m in enumerate(methods_in_order(rows))}
    mode_rank = {m: i for i, m in enumerate(modes_in_order(rows))}

    def sort_key(r: Row) -> tuple[Any, ...]:
        return (
            mode_rank.get(str(r.get("mode", "agnostic")), 99),
            str(r.get("task", "")),
            r.get("length") or 0,
            r.get("depth") if isinstance(r.get("depth"), int | float) else -1,
            r.get("sample") if isinstance(r.get("sample"), int) else -1,
            method_rank.get(method_label(r), 99),
            norm_compression(r.get("compression")),
        )

    ordered = sorted(rows, key=sort_key)
    shown = ordered[:MAX_DETAIL_ROWS]

    def num(v: Any, f: Callable[[float], str]) -> str:
        return f(float(v)) if isinstance(v, int | float) and not isinstance(v, bool) else "–"

    def text(v: Any, n: int = 120) -> Html:
        s = "" if v is None else str(v)
        return Html(f'<span title="{esc(s)}">{esc(short(s, n))}</span>')

    body = [
        [
            r.get("mode", "agnostic"),
            r.get("task", "?"),
            num(r.get("length"), lambda x: f"{x:,.0f}"),
            num(r.get("context_tokens"), lambda x: f"{x:,.0f}"),
            num(r.get("depth"), lambda x: f"{x:.2f}"),
            r.get("sample", "–"),
            method_label(r),
            budget_of(r).label,
            num(r.get("score"), lambda x: f"{x:.3f}"),
            num(r.get("kv_tokens"), lambda x: f"{x:,.0f}"),
            num(r.get("kv_bytes"), fmt_bytes),
            num(r.get("prefill_seconds"), fmt_seconds),
            num(r.get("decode_seconds_per_token"), fmt_seconds),
            text(r.get("prediction")),
            text(" | ".join(map(str, r.get("answers") or []))),
        ]
        for r in shown
    ]
    table = html_table(
        [
            "mode",
            "task",
            "length",
            "context",
            "depth",
            "sample",
            "method",
            "compression",
            "score",
            "KV tokens",
            "KV bytes",
            "prefill",
            "decode / tok",
            "prediction",
            "answers",
        ],
        body,
        cls="details",
        align="llrrrrlrrrrrrll",
    )
    more = (
        f'<p class="note">Showing the first {MAX_DETAIL_ROWS:,} of {len(rows):,} rows; see {esc(RESULTS_FILE)}.</p>'
        if len(rows) > MAX_DETAIL_ROWS
        else ""
    )
    return _section(
        "samples",
        "Per-sample results",
        f"<details><summary>Show {len(shown):,} rows</summary>{more}{table}</details>",
    )


CSS = """
:root{--fg:#1f2328;--muted:#59636e;--border:#d8dee4;--soft:#f6f8fa;--accent:#0969da}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;color:var(--fg);background:#fff;line-height:1.45;font-size:15px;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","Noto Sans","DejaVu Sans",
 Arial,sans-serif}
main{max-width:1340px;margin:0 auto;padding:24px 32px 64px}
header h1{font-size:1.6rem;margin:0 0 .6rem}
header h1 .model{font-weight:400;color:var(--muted);margin-left:.4rem}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:0;font-size:.92rem}
dl.meta dt{color:var(--muted)}
dl.meta dd{margin:0;overflow-wrap:anywhere}
nav.toc{margin:1rem 0 0;font-size:.9rem;display:flex;flex-wrap:wrap;gap:.35rem}
nav.toc a{color:var(--accent);text-decoration:none;padding:.1rem .55rem;border:1px solid var(--border);
 border-radius:999px}
nav.toc a:hover{background:var(--soft)}
h2{font-size:1.25rem;margin:2.2rem 0 .5rem;padding-bottom:.3rem;border-bottom:1px solid var(--border)}
h3{font-size:1.05rem;margin:1.4rem 0 .5rem}
h4{font-size:.95rem;margin:1rem 0 .4rem;color:var(--muted)}
p.intro,p.note{color:var(--muted);margin:.2rem 0 .8rem;font-size:.92rem}
p.empty{padding:1rem 1.2rem;background:#fff8c5;border:1px solid #d4a72c66;border-radius:8px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.85em;
 background:var(--soft);padding:.1rem .3rem;border-radius:4px;overflow-wrap:anywhere}
.pill{display:inline-block;padding:0 .5rem;margin:0 .25rem .15rem 0;border:1px solid var(--border);
 border-radius:999px;font-size:.85rem;background:var(--soft)}
.table-wrap{overflow-x:auto;margin:.3rem 0 1rem}
table{border-collapse:collapse;font-size:.88rem;font-variant-numeric:tabular-nums}
th,td{padding:.32rem .7rem;border-bottom:1px solid var(--border);text-align:right;white-space:nowrap}
th.l,td.l{text-align:left}
thead th{background:var(--soft);font-weight:600;position:sticky;top:0}
tbody tr:hover td{background:#f3f6fa}
table.scores td,table.best td,table.questions td{vertical-align:top}
.heat{display:inline-block;min-width:3.2em;padding:.05rem .35rem;border-radius:4px;text-align:right}
.mark{display:inline-block;width:1em;margin-left:.15rem;font-size:.8rem}
.mark.better{color:#1a7f37}
.mark.worse{color:#cf222e}
td .sub{font-size:.74rem;color:var(--muted);line-height:1.2;padding-top:.1rem}
td .sub.warn,.warn{color:#9a6700;font-weight:600}
div.warnings{padding:.7rem 1.1rem;margin:1rem 0;background:#fff8c5;border:1px solid #d4a72c66;border-radius:8px}
div.warnings ul{margin:.3rem 0 0;padding-left:1.2rem;font-size:.9rem}
table.config td,table.details td.l{white-space:normal;max-width:48rem}
table.details td{font-size:.82rem}
table.details td:nth-last-child(-n+2){min-width:16rem}
.na{color:#8c959f}
.swatch{display:none}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
figure.chart{margin:0;padding:10px 10px 6px;border:1px solid var(--border);border-radius:10px;background:#fff}
figure.chart svg{display:block;width:100%;height:auto}
figure.chart svg *{stroke-linejoin:round;stroke-linecap:butt}
figure.chart svg image{image-rendering:pixelated}
figure.chart svg use:hover{opacity:.6}
figure.chart figcaption{font-size:.82rem;color:var(--muted);padding:.2rem .3rem}
details{margin:.5rem 0}
details>summary{cursor:pointer;color:var(--accent);font-weight:500}
footer{margin-top:3rem;color:var(--muted);font-size:.82rem}
"""


def _by_model(rows: Sequence[Row]) -> list[tuple[str | None, list[Row]]]:
    """Rows per model (one group when there is a single model): scores of different models are never pooled."""
    groups: dict[str | None, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.get("model") if r.get("model") is None else str(r.get("model"))].append(r)
    return list(groups.items())


def render_report(
    rows: Sequence[Row],
    *,
    config: Mapping[str, Any] | None = None,
    streaming: Sequence[Row] = (),
    memory: Sequence[Row] = (),
    run_dir: str | Path = ".",
    partial: int = 0,
) -> str:
    """The report's HTML for already-loaded data (what :func:`write_report` writes).

    ``config`` (the run's ``config.json``) tells how many rows each cell should hold; ``partial`` is the number of
    lines an interrupted run set aside in ``results.jsonl.partial``.
    """
    run_dir = Path(run_dir)
    colors = colors_for(
        [FULL_METHOD, *methods_in_order(rows), *(str(r.get("method", "?")) for r in (*memory, *streaming))],
        baseline=FULL_METHOD,
    )
    sections: list[str] = []
    toc: list[tuple[str, str]] = []
    missing: list[str] = []
    if rows:
        models = _by_model(rows)
        config_model = _meta_value(config, "model")
        parts: dict[str, list[str]] = defaultdict(list)
        for model, mrows in models:
            own_config = config if len(models) == 1 or model == config_model else None
            prefix = f"{slug(model or 'model')}-" if len(models) > 1 else ""
            heading = f'<h3 class="model">Model {esc(model or "unknown")}</h3>' if len(models) > 1 else ""
            got = _scores_parts(mrows, own_config, colors, prefix)
            missing += got["missing"]
            for key in ("summary", "curves", "best"):
                if got[key]:
                    parts[key].append(heading + got[key])
            if questions := _questions_section(mrows, colors, prefix):
                parts["questions"].append(heading + questions)
        intro = (
            "Mean score ×100 over all tasks and samples; columns are the fraction of the context's KV cache removed "
            "(0% = the full cache) or a token budget. Under each score: its 95% interval in brackets (Wilson for 0/1 "
            "scores, bootstrap otherwise) and the number of rows n. "
            + SIGNIFICANCE_NOTE
            + " Hover a score for the test and its p-values."
        )
        for sid, title, label, text in (
            ("summary", "Summary", "Summary", intro),
            (
                "curves",
                "Score vs compression",
                "Score vs compression",
                "One line per method with its 95% intervals; the dashed line is the uncompressed (full) cache.",
            ),
            (
                "questions",
                "Score per question",
                "Per question",
                "Multi-question tasks: the context is compressed once and each question asked in turn; a method that "
                "kept too little loses the later questions.",
            ),
            (
                "best",
                "Best method per budget",
                "Best per budget",
                "Highest mean score ×100 at each budget, with paired tests against full and against the runner-up "
                "(Holm-corrected over the budgets of each mode).",
            ),
        ):
            if parts.get(sid):
                sections.append(_section(sid, title, "".join(parts[sid]), text))
                toc.append((sid, label))
    else:
        sections.append(
            _section(
                "summary",
                "Summary",
                f'<p class="empty"><strong>No results.</strong> {esc(run_dir / RESULTS_FILE)} '
                "is missing or has no rows, "
                "so there are no scores to show yet.</p>",
            )
        )
        toc.append(("summary", "Summary"))
    for sid, label, html_part in (
        ("memory", "Memory", _memory_section(rows, memory, colors)),
        ("prefill", "Sparse prefill", _prefill_section(rows)),
        ("speed", "Speed", _speed_section(rows)),
        ("streaming", "Streaming", _streaming_section(streaming, colors)),
        ("config", "Configuration", _config_section(config)),
        ("samples", "Per-sample", _details_section(rows)),
    ):
        if html_part:
            sections.append(html_part)
            toc.append((sid, label))
    nav = '<nav class="toc">' + "".join(f'<a href="#{sid}">{esc(lbl)}</a>' for sid, lbl in toc) + "</nav>"

    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = "kvsieve report"
    model = next((str(r["model"]) for r in rows if r.get("model")), None) or _meta_value(config, "model")
    if model:
        title += f" — {model}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}</style></head>'
        f"<body><main>{_header(rows, config, run_dir)}{nav}{_warnings_box(missing, partial)}{''.join(sections)}"
        f"<footer>Generated by kvsieve {esc(__version__)} on {esc(generated)} from {esc(run_dir)}. "
        "This file is self-contained: it loads nothing from the network.</footer></main></body></html>\n"
    )


def has_report_inputs(directory: str | Path) -> bool:
    """Whether ``directory`` holds anything the report can show: kvsieve results or kvpress result directories."""
    d = Path(directory)
    return (d / RESULTS_FILE).is_file() or (d / STREAMING_FILE).is_file() or bool(find_kvpress_dirs(d))


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` from the run files in ``out_dir`` and return its path.

    Reads ``results.jsonl`` and, when present, ``config.json``, ``streaming.jsonl``, ``memory.jsonl`` and every
    kvpress evaluation directory below ``out_dir`` (:mod:`kvsieve.bench.kvpress_reader`); any of them may be
    missing (the report then says so or leaves the section out). The file is written atomically (a temporary file
    renamed into place).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = render_report(
        load_rows(out) + read_kvpress_results(out),
        config=load_config(out),
        streaming=load_jsonl(out / STREAMING_FILE),
        memory=load_jsonl(out / MEMORY_FILE),
        run_dir=out,
        partial=partial_lines(out),
    )
    target = out / REPORT_FILE
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


__all__ = ["CONFIG_FILE", "REPORT_FILE", "has_report_inputs", "render_report", "write_report"]
