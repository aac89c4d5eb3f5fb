"""A self-contained HTML report of a benchmark run directory.

:func:`write_report` reads ``results.jsonl`` (and, when present, ``config.json``, ``streaming.jsonl``
and ``memory.jsonl``) from a run directory and writes ``report.html`` beside them: one file with its
CSS inline and every chart drawn as inline SVG by the small helpers below. It refers to nothing
outside itself (no scripts, fonts, stylesheets or images from anywhere), so it opens offline and can
be mailed or attached to a CI run as is. Even the text taken from the data is written so that the
file never contains a URL scheme (``"://"`` is written as ``":&#47;&#47;"``, which displays the same).

Every chart is a ``<figure class="chart" data-chart="ID">`` holding one ``<svg>``; data marks carry
``class="series"`` (lines), ``class="point"`` or ``class="bar"``, each with a ``<title>`` tooltip.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvsieve import __version__
from kvsieve.bench.summary import (
    CONFIG_FILE,
    FULL_METHOD,
    MEMORY_FILE,
    RESULTS_FILE,
    STREAMING_FILE,
    Row,
    best_method_per_budget,
    compressions_in_order,
    format_compression,
    full_reference,
    load_config,
    load_jsonl,
    load_rows,
    mean_scores,
    mean_scores_by_task,
    memory_table,
    methods_in_order,
    modes_in_order,
    norm_compression,
    speed_table,
    tasks_in_order,
)

REPORT_FILE = "report.html"
MAX_DETAIL_ROWS = 5000

# Tableau 10: distinct, print-friendly, readable on white.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#17becf",
)
FULL_COLOR = "#3a3a3a"
DASHES = (None, "6 3", "2 3", "8 3 2 3")

MODE_TITLES = {"agnostic": "Query-agnostic", "aware": "Query-aware"}


# ============================================================================================ text helpers
class Html(str):
    """A string that is already HTML and must not be escaped again."""

    __slots__ = ()


def esc(value: Any) -> str:
    """HTML-escape ``value`` (quotes included) and break any ``scheme://`` so the file holds no URL."""
    return html.escape(str(value), quote=True).replace("://", ":&#47;&#47;")


def _cell(value: Any) -> str:
    return value if isinstance(value, Html) else esc(value)


def _fmt_num(x: float, digits: int = 3) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits + 3) or abs(x) < 1e-3:
        return f"{x:.{digits}g}"
    return f"{x:,.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"


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


def _mode_title(mode: str) -> str:
    return MODE_TITLES.get(mode, mode.capitalize())


def _color_map(names: Iterable[str]) -> dict[str, str]:
    """A colour per name: :data:`FULL_COLOR` for ``full``, the palette in order for the rest."""
    colors: dict[str, str] = {}
    i = 0
    for n in names:
        if n in colors:
            continue
        if n == FULL_METHOD:
            colors[n] = FULL_COLOR
        else:
            colors[n] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def _dash_of(colors: Mapping[str, str], name: str) -> str | None:
    """A dash pattern that tells apart names sharing a colour once the palette has wrapped around."""
    others = [n for n in colors if n != FULL_METHOD]
    if name not in others:
        return None
    return DASHES[(others.index(name) // len(PALETTE)) % len(DASHES)]


# ============================================================================================ SVG charts
FONT = 12
CHAR_W = 0.62 * FONT  # rough advance width of one character, enough to keep labels apart
CHART_W = 640


@dataclass
class Series:
    """One line of a line chart.

    ``points`` are ``(x, y, tooltip)``; with ``reference`` set a dashed horizontal line is also drawn
    across the whole plot at the first point's y (used for the uncompressed baseline).
    """

    name: str
    color: str
    points: list[tuple[float, float, str]] = field(default_factory=list)
    dash: str | None = None
    reference: bool = False


@dataclass
class BarSeries:
    """One colour of a grouped bar chart: a value (or ``None``) and a tooltip per group."""

    name: str
    color: str
    values: list[float | None]
    tooltips: list[str]


def _nice_step(raw: float) -> float:
    exp = math.floor(math.log10(raw))
    f = raw / 10**exp
    nice = 1 if f <= 1 else 2 if f <= 2 else 5 if f <= 5 else 10
    return nice * 10**exp


def linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (about ``target`` intervals)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step((hi - lo) / target)
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    count = round((end - start) / step)
    return [round(start + i * step, 12) for i in range(count + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decade ticks covering ``[lo, hi]`` (both > 0), with 2× and 5× ticks when few decades are spanned."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    ticks = [10.0**e for e in range(a, b + 1)]
    if b - a <= 2:
        ticks = sorted({t * m for t in ticks for m in (1, 2, 5) if t * m <= 10.0**b})
    return ticks


def _truncate(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters with an ellipsis in the middle, so both ends stay readable."""
    if len(text) <= n:
        return text
    head = (n - 1) * 2 // 5
    return text[:head] + "…" + text[len(text) - (n - 1 - head) :]


def _svg_open(chart_id: str, title: str, width: float, height: float) -> str:
    return (
        f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        f'role="img" aria-label="{esc(title)}" font-size="{FONT}" data-chart="{esc(chart_id)}">'
    )


def _titles(title: str, subtitle: str | None, left: float) -> tuple[str, float]:
    parts = [f'<text class="title" x="{left:.1f}" y="18" font-size="14" font-weight="600">{esc(title)}</text>']
    top = 34.0
    if subtitle:
        parts.append(f'<text class="subtitle" x="{left:.1f}" y="34" fill="#59636e">{esc(subtitle)}</text>')
        top = 48.0
    return "".join(parts), top


def _legend(items: Sequence[tuple[str, str, str | None, str]], x: float, y: float, max_chars: int) -> str:
    """Legend rows ``(name, colour, dash, kind)`` with kind ``line`` or ``box``, stacked from (x, y)."""
    out = ['<g class="legend">']
    for i, (name, color, dash, kind) in enumerate(items):
        yy = y + i * 18
        if kind == "box":
            sw = f'<rect x="{x:.1f}" y="{yy - 5:.1f}" width="16" height="10" rx="2" fill="{color}"/>'
        else:
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            sw = (
                f'<line x1="{x:.1f}" y1="{yy:.1f}" x2="{x + 18:.1f}" y2="{yy:.1f}" stroke="{color}" '
                f'stroke-width="2.5"{dash_attr}/>'
                f'<circle cx="{x + 9:.1f}" cy="{yy:.1f}" r="3" fill="{color}"/>'
            )
        label = _truncate(name, max_chars)
        out.append(f'<g><title>{esc(name)}</title>{sw}<text x="{x + 24:.1f}" y="{yy + 4:.1f}">{esc(label)}</text></g>')
    out.append("</g>")
    return "".join(out)


def _legend_width(names: Iterable[str], max_chars: int = 26) -> float:
    longest = max((min(len(n), max_chars) for n in names), default=0)
    return 24 + longest * CHAR_W + 12


def _x_tick_labels(ticks: Sequence[tuple[float, str]], y: float) -> str:
    """Tick labels centred under their ticks; a label that would overlap the previous one is left out."""
    out: list[str] = []
    last_right = -math.inf
    for px, label in ticks:
        half = len(label) * CHAR_W / 2
        if px - half < last_right + 6:
            continue
        out.append(f'<text x="{px:.1f}" y="{y:.1f}" text-anchor="middle">{esc(label)}</text>')
        last_right = px + half
    return "".join(out)


def line_chart(
    chart_id: str,
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    x_fmt: Callable[[float], str] = _fmt_num,
    y_fmt: Callable[[float], str] = _fmt_num,
    x_ticks: Sequence[float] | None = None,
    y_domain: tuple[float, float] | None = None,
    x_zero: bool = False,
    y_zero: bool = False,
    log_y: bool = False,
    subtitle: str | None = None,
) -> str:
    """An SVG line chart: axes, ticks, gridlines, one polyline + point markers per series, a legend.

    Non-finite points (and, with ``log_y``, non-positive ones) are dropped. ``x_ticks`` fixes the x
    ticks (the domain spans them); otherwise round ticks are chosen, from 0 when ``x_zero``.
    ``y_domain`` fixes the y range; otherwise it spans the data (from 0 when ``y_zero``).
    """
    ok = (lambda y: math.isfinite(y) and y > 0) if log_y else math.isfinite
    clean = [
        Series(s.name, s.color, [p for p in s.points if math.isfinite(p[0]) and ok(p[1])], s.dash, s.reference)
        for s in series
    ]
    clean = [s for s in clean if s.points]
    xs = [p[0] for s in clean for p in s.points]
    ys = [p[1] for s in clean for p in s.points]

    if x_ticks:
        xt = sorted(set(x_ticks))
    elif xs:
        xt = linear_ticks(min([*xs, 0.0]) if x_zero else min(xs), max(xs))
    else:
        xt = [0.0, 1.0]
    x0, x1 = xt[0], xt[-1]
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5

    if y_domain is not None:
        y0, y1 = y_domain
        yt = linear_ticks(y0, y1)
    elif log_y and ys:
        yt = log_ticks(min(ys), max(ys))
        y0, y1 = yt[0], yt[-1]
    elif ys:
        yt = linear_ticks(min([*ys, 0.0]) if y_zero else min(ys), max(ys))
        y0, y1 = yt[0], yt[-1]
    else:
        yt = [0.0, 1.0]
        y0, y1 = 0.0, 1.0
    yt = [t for t in yt if y0 - 1e-12 <= t <= y1 + 1e-12]

    y_labels = [y_fmt(t) for t in yt]
    left = 30 + max((len(t) for t in y_labels), default=1) * CHAR_W + 8
    legend_items = [(s.name, s.color, "5 4" if s.reference and not s.dash else s.dash, "line") for s in clean]
    legend_w = _legend_width(s.name for s in clean)
    right = CHART_W - legend_w
    head, top = _titles(title, subtitle, left)
    plot_h = max(220.0, len(legend_items) * 18 + 8)
    bottom = top + plot_h
    height = bottom + 46

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def sy(y: float) -> float:
        if log_y:
            a, b = math.log10(y0), math.log10(y1)
            return bottom - (math.log10(y) - a) / (b - a) * (bottom - top)
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    out = [_svg_open(chart_id, title, CHART_W, height), head]
    # grid and axes
    out.append('<g class="grid" stroke="#e6e9ed" stroke-width="1">')
    out.extend(f'<line x1="{left:.1f}" x2="{right:.1f}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>' for t in yt)
    out.extend(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top:.1f}" y2="{bottom:.1f}"/>' for t in xt)
    out.append("</g>")
    out.append(_axis_path(left, top, bottom, right))
    out.append('<g class="ticks" fill="#444c56">')
    out.extend(
        f'<text x="{left - 6:.1f}" y="{sy(t) + 4:.1f}" text-anchor="end">{esc(lab)}</text>'
        for t, lab in zip(yt, y_labels, strict=True)
    )
    out.append(_x_tick_labels([(sx(t), x_fmt(t)) for t in xt], bottom + 16))
    out.append("</g>")
    out.append(
        f'<text class="axis-label" x="{(left + right) / 2:.1f}" y="{bottom + 38:.1f}" '
        f'text-anchor="middle" fill="#24292f">{esc(x_label)}</text>'
    )
    cy = (top + bottom) / 2
    out.append(
        f'<text class="axis-label" x="14" y="{cy:.1f}" transform="rotate(-90 14 {cy:.1f})" '
        f'text-anchor="middle" fill="#24292f">{esc(y_label)}</text>'
    )
    # data
    for s in clean:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        g = [f'<g class="line" data-series="{esc(s.name)}">']
        if s.reference:
            yref = sy(s.points[0][1])
            g.append(
                f'<path class="series reference" d="M{left:.1f} {yref:.1f}H{right:.1f}" fill="none" '
                f'stroke="{s.color}" stroke-width="1.5" stroke-dasharray="5 4" opacity="0.8">'
                f"<title>{esc(s.points[0][2])}</title></path>"
            )
        pts = sorted(s.points, key=lambda p: p[0])
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in pts)
        g.append(
            f'<polyline class="series" points="{coords}" fill="none" stroke="{s.color}" stroke-width="2.2" '
            f'stroke-linejoin="round" stroke-linecap="round"{dash}><title>{esc(s.name)}</title></polyline>'
        )
        r = 3.5 if len(pts) <= 40 else 2.0
        g.extend(
            f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{s.color}" '
            f'stroke="#fff" stroke-width="1"><title>{esc(tip)}</title></circle>'
            for x, y, tip in pts
        )
        g.append("</g>")
        out.append("".join(g))
    if not clean:
        out.append(
            f'<text x="{(left + right) / 2:.1f}" y="{cy:.1f}" text-anchor="middle" fill="#59636e">no data</text>'
        )
    out.append(_legend(legend_items, right + 16, top + 8, 26))
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    chart_id: str,
    title: str,
    groups: Sequence[str],
    series: Sequence[BarSeries],
    *,
    y_label: str,
    y_fmt: Callable[[float], str] = _fmt_num,
    ref: float | None = None,
    ref_label: str | None = None,
    subtitle: str | None = None,
) -> str:
    """An SVG grouped bar chart: one group per entry of ``groups``, one bar per series inside it.

    ``ref`` draws a dashed horizontal reference line (e.g. 1.0 = as fast as the baseline). Group labels
    are rotated when they would not fit side by side.
    """
    vals = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    top_val = max([*vals, ref or 0.0, 0.0])
    yt = linear_ticks(0.0, top_val * 1.05 if top_val > 0 else 1.0)
    y0, y1 = yt[0], yt[-1]
    y_labels = [y_fmt(t) for t in yt]
    left = 30 + max(len(t) for t in y_labels) * CHAR_W + 8
    legend_w = _legend_width([s.name for s in series] + ([ref_label] if ref_label else []))
    right = CHART_W - legend_w
    head, top = _titles(title, subtitle, left)
    n_groups = max(len(groups), 1)
    gw = (right - left) / n_groups
    label_w = min(max((len(g) for g in groups), default=0), 24) * CHAR_W
    rotate = label_w > gw - 6
    if rotate:  # labels at -45° run down-left from their group: leave room for the first one on the left
        reach = label_w * math.cos(math.pi / 4) + 8
        if reach > left + gw / 2:
            left = reach - gw / 2
            gw = (right - left) / n_groups
    label_room = label_w * math.sin(math.pi / 4) + 14 if rotate else 18
    plot_h = max(220.0, (len(series) + 1) * 18 + 8)
    bottom = top + plot_h
    height = bottom + label_room + 30

    def sy(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    out = [_svg_open(chart_id, title, CHART_W, height), head]
    out.append('<g class="grid" stroke="#e6e9ed" stroke-width="1">')
    out.extend(f'<line x1="{left:.1f}" x2="{right:.1f}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>' for t in yt)
    out.append("</g>")
    out.append('<g class="ticks" fill="#444c56">')
    out.extend(
        f'<text x="{left - 6:.1f}" y="{sy(t) + 4:.1f}" text-anchor="end">{esc(lab)}</text>'
        for t, lab in zip(yt, y_labels, strict=True)
    )
    for i, gname in enumerate(groups):
        cx = left + (i + 0.5) * gw
        label = esc(_truncate(gname, 24))
        if rotate:
            ty = bottom + 14
            out.append(
                f'<text x="{cx:.1f}" y="{ty:.1f}" text-anchor="end" '
                f'transform="rotate(-45 {cx:.1f} {ty:.1f})">'
                f"<title>{esc(gname)}</title>{label}</text>"
            )
        else:
            out.append(f'<text x="{cx:.1f}" y="{bottom + 16:.1f}" text-anchor="middle">{label}</text>')
    out.append("</g>")
    cy = (top + bottom) / 2
    out.append(
        f'<text class="axis-label" x="14" y="{cy:.1f}" transform="rotate(-90 14 {cy:.1f})" '
        f'text-anchor="middle" fill="#24292f">{esc(y_label)}</text>'
    )
    inner = gw * 0.72
    bw = inner / max(len(series), 1)
    for si, s in enumerate(series):
        out.append(f'<g class="bars" data-series="{esc(s.name)}">')
        for gi, v in enumerate(s.values):
            if v is None or not math.isfinite(v):
                continue
            x = left + gi * gw + (gw - inner) / 2 + si * bw
            yv = sy(max(v, y0))
            out.append(
                f'<rect class="bar" x="{x + 1:.1f}" y="{yv:.1f}" width="{max(bw - 2, 1):.1f}" '
                f'height="{max(bottom - yv, 0.5):.1f}" rx="2" fill="{s.color}">'
                f"<title>{esc(s.tooltips[gi])}</title></rect>"
            )
            if bw >= 30:
                out.append(
                    f'<text x="{x + bw / 2:.1f}" y="{yv - 4:.1f}" text-anchor="middle" font-size="10" '
                    f'fill="#444c56">{esc(y_fmt(v))}</text>'
                )
        out.append("</g>")
    if ref is not None and y0 <= ref <= y1:
        out.append(
            f'<path class="reference" d="M{left:.1f} {sy(ref):.1f}H{right:.1f}" stroke="{FULL_COLOR}" '
            f'stroke-width="1.5" stroke-dasharray="5 4"><title>{esc(ref_label or "reference")}</title></path>'
        )
    out.append(_axis_path(left, top, bottom, right))
    items: list[tuple[str, str, str | None, str]] = [(s.name, s.color, None, "box") for s in series]
    if ref is not None and ref_label:
        items.append((ref_label, FULL_COLOR, "5 4", "line"))
    out.append(_legend(items, right + 16, top + 8, 26))
    out.append("</svg>")
    return "".join(out)


def _axis_path(left: float, top: float, bottom: float, right: float) -> str:
    return f'<path class="axis" d="M{left:.1f} {top:.1f}V{bottom:.1f}H{right:.1f}" fill="none" stroke="#57606a"/>'


def _figure(chart_id: str, svg: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart" data-chart="{esc(chart_id)}">{svg}{cap}</figure>'


def overlap_note(series: Sequence[Series]) -> str | None:
    """A sentence naming series whose points coincide exactly (so that one line hides the others)."""
    groups: dict[tuple[tuple[float, float], ...], list[str]] = defaultdict(list)
    for s in series:
        pts = tuple(sorted((round(x, 9), round(y, 6)) for x, y, _ in s.points if math.isfinite(x) and math.isfinite(y)))
        if pts and not s.reference:
            groups[pts].append(s.name)
    same = [names for names in groups.values() if len(names) > 1]
    if not same:
        return None

    def join(names: list[str]) -> str:
        return " = ".join(names) if len(names) <= 4 else " = ".join(names[:3]) + f" and {len(names) - 3} more"

    return "Overlapping lines (identical values): " + "; ".join(join(names) for names in same) + "."


def _line_figure(chart_id: str, title: str, series: Sequence[Series], caption: str | None = None, **kw: Any) -> str:
    """A chart figure holding :func:`line_chart`, captioned with ``caption`` and any :func:`overlap_note`."""
    notes = " ".join(n for n in (caption, overlap_note(series)) if n)
    return _figure(chart_id, line_chart(chart_id, title, series, **kw), notes or None)


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


def _heat(score: float) -> str:
    """A light blue background whose depth follows a score in [0, 1]."""
    s = min(max(score, 0.0), 1.0)
    return f"background:hsl(212,80%,{97 - 24 * s:.0f}%)"


def _score_table(scores: Mapping[tuple[str, str, float], tuple[float, int]], mode: str, methods: Sequence[str]) -> str:
    comps = sorted({c for (md, _m, c) in scores if md == mode})
    present = [m for m in methods if any(md == mode and mm == m for (md, mm, _c) in scores)]
    headers = ["method", *[format_compression(c) for c in comps]]
    body: list[list[Any]] = []
    for m in present:
        row: list[Any] = [Html(f'<span class="swatch" data-method="{esc(m)}"></span>{esc(m)}')]
        for c in comps:
            v = scores.get((mode, m, c))
            if v is None:
                row.append(Html('<span class="na">–</span>'))
            else:
                row.append(
                    Html(f'<span style="{_heat(v[0])}" class="heat" title="n = {v[1]}">{_score100(v[0])}</span>')
                )
        body.append(row)
    return html_table(headers, body, cls="scores")


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
    runs = list(dict.fromkeys(str(r["run_id"]) for r in rows if r.get("run_id")))
    items = [
        ("Model", esc(model)),
        ("Date", esc(date)),
        ("Versions", ver_html),
        ("Command", f"<code>{esc(command)}</code>" if command else "–"),
        ("Run", esc(", ".join(runs)) if runs else "–"),
        ("Directory", f"<code>{esc(run_dir)}</code>"),
        ("Rows", esc(f"{len(rows):,}")),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f'<header><h1>kvsieve report <span class="model">{esc(model)}</span></h1><dl class="meta">{dl}</dl></header>'


def _section(sid: str, title: str, body: str, intro: str | None = None) -> str:
    p = f'<p class="intro">{esc(intro)}</p>' if intro else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{p}{body}</section>'


# ---------------------------------------------------------------------------------------------- sections
def _score_series(
    scores: Mapping[tuple[str, str, float], tuple[float, int]],
    mode: str,
    methods: Sequence[str],
    colors: Mapping[str, str],
    label: str,
) -> list[Series]:
    out: list[Series] = []
    ref = full_reference(scores, mode)
    for m in methods:
        if m == FULL_METHOD:
            if ref is not None:
                pts = [(0.0, ref[0] * 100, f"full: {ref[0] * 100:.1f} (n = {ref[1]}) — {label}")]
                out.append(Series(FULL_METHOD, colors[m], pts, reference=True))
            continue
        pts = [
            (c, v[0] * 100, f"{m} @ {format_compression(c)}: {v[0] * 100:.1f} (n = {v[1]}) — {label}")
            for (md, mm, c), v in scores.items()
            if md == mode and mm == m
        ]
        if pts:
            out.append(Series(m, colors[m], pts, dash=_dash_of(colors, m)))
    return out


def _scores_section(rows: Sequence[Row], colors: Mapping[str, str]) -> str:
    methods = methods_in_order(rows)
    scores = mean_scores(rows)
    by_task = mean_scores_by_task(rows)
    comps = compressions_in_order(rows)
    x_ticks = sorted({0.0, *comps})
    tables: list[str] = []
    charts: list[str] = []
    task_tables: list[str] = []
    scored_modes = [mode for mode in modes_in_order(rows) if any(md == mode for (md, _m, _c) in scores)]
    if not scored_modes:
        msg = (
            f'<p class="empty"><strong>No scores.</strong> All {len(rows):,} rows lack a finite score, '
            "so there is nothing to summarise or plot.</p>"
        )
        return _section("summary", "Summary", msg)
    for mode in scored_modes:
        title = _mode_title(mode)
        tables.append(f"<h3>{esc(title)}</h3>{_score_table(scores, mode, methods)}")
        figs: list[str] = []
        cid = f"score-{slug(mode)}-all"
        n_samples = sum(v[1] for (md, m, _c), v in scores.items() if md == mode and m != FULL_METHOD)
        fig = _line_figure(
            cid,
            "All tasks",
            _score_series(scores, mode, methods, colors, "all tasks"),
            x_label="compression (fraction of KV removed)",
            y_label="score ×100",
            x_fmt=format_compression,
            y_fmt=lambda t: f"{t:.0f}",
            x_ticks=x_ticks,
            y_domain=(0.0, 100.0),
            subtitle=f"{title} · mean over tasks · {n_samples:,} scored rows",
        )
        figs.append(fig)
        for task in tasks_in_order(rows):
            tscores = {(md, m, c): v for (t, md, m, c), v in by_task.items() if t == task}
            if not any(md == mode for (md, _m, _c) in tscores):
                continue
            cid = f"score-{slug(mode)}-task-{slug(task)}"
            fig = _line_figure(
                cid,
                task,
                _score_series(tscores, mode, methods, colors, task),
                x_label="compression (fraction of KV removed)",
                y_label="score ×100",
                x_fmt=format_compression,
                y_fmt=lambda t: f"{t:.0f}",
                x_ticks=x_ticks,
                y_domain=(0.0, 100.0),
                subtitle=title,
            )
            figs.append(fig)
        charts.append(f'<h3>{esc(title)}</h3><div class="charts">{"".join(figs)}</div>')
        per_task = "".join(
            f"<h4>{esc(task)}</h4>"
            + _score_table(
                {(md, m, c): v for (t, md, m, c), v in by_task.items() if t == task and md == mode},
                mode,
                methods,
            )
            for task in tasks_in_order(rows)
            if any(t == task and md == mode for (t, md, _m, _c) in by_task)
        )
        task_tables.append(f"<h3>{esc(title)}</h3>{per_task}")
    summary = _section(
        "summary",
        "Summary",
        "".join(tables) + f"<details><summary>Scores per task</summary>{''.join(task_tables)}</details>",
        "Mean score ×100 over all tasks and samples; columns are the fraction of the context's KV cache "
        "removed (0% = the full cache). Hover a cell for the number of rows.",
    )
    curves = _section(
        "curves",
        "Score vs compression",
        "".join(charts),
        "One line per method; the dashed line is the uncompressed (full) cache.",
    )
    return summary + curves


def _best_section(rows: Sequence[Row]) -> str:
    best = best_method_per_budget(rows)
    if not best:
        return _section("best", "Best method per budget", '<p class="empty">No compressed methods in the results.</p>')
    body = [
        [
            _mode_title(b.mode),
            format_compression(b.compression),
            Html(f"<strong>{esc(b.method)}</strong>"),
            _score100(b.score),
            _score100(b.full_score),
            "–" if b.delta_vs_full is None else f"{b.delta_vs_full * 100:+.1f}",
            b.runner_up or "–",
            _score100(b.runner_up_score),
        ]
        for b in best
    ]
    table = html_table(
        ["mode", "compression", "best method", "score", "full", "Δ vs full", "runner-up", "runner-up score"],
        body,
        cls="best",
        align="lrlrrrlr",
    )
    return _section("best", "Best method per budget", table, "Highest mean score ×100 at each compression.")


def _memory_section(rows: Sequence[Row], memory_rows: Sequence[Row], colors: Mapping[str, str]) -> str:
    parts: list[str] = []
    mem = memory_table(rows)
    if mem:
        parts.append(
            html_table(
                ["method", "compression", "rows", "KV tokens / layer", "KV bytes", "full KV bytes", "ratio"],
                [
                    [
                        m.method,
                        format_compression(m.compression),
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
        # kv_bytes vs context length: one small chart per compression, full as the reference in each.
        groups: dict[tuple[str, float, int], list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            kb, ct = r.get("kv_bytes"), r.get("context_tokens")
            if isinstance(kb, int | float) and isinstance(ct, int | float):
                key = (
                    str(r.get("method", "?")),
                    norm_compression(r.get("compression")),
                    int(r.get("length") or ct),
                )
                groups[key].append((float(ct), float(kb)))
        points: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
        for (m, c, _length), vals in groups.items():
            points[(m, c)].append((sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals)))
        all_bytes = [b for pts in points.values() for _, b in pts]
        unit, scale = _byte_unit(max(all_bytes, default=0.0))
        comps = sorted({c for (_m, c) in points if c > 0}) or sorted({c for (_m, c) in points})
        figs: list[str] = []
        for c in comps:
            series: list[Series] = []
            for m in methods_in_order(rows):
                key = (m, 0.0) if m == FULL_METHOD else (m, c)
                if key not in points:
                    continue
                pts = [
                    (
                        x,
                        b / scale,
                        f"{m}{'' if m == FULL_METHOD else ' @ ' + format_compression(c)}: "
                        f"{fmt_bytes(b)} at {x:,.0f} tokens",
                    )
                    for x, b in points[key]
                ]
                dash = "5 4" if m == FULL_METHOD else _dash_of(colors, m)
                series.append(Series(m, colors[m], pts, dash=dash))
            cid = f"memory-context-{slug(format_compression(c).replace('%', 'pct'))}"
            figs.append(
                _line_figure(
                    cid,
                    f"KV cache at {format_compression(c)} compression",
                    series,
                    x_label="context length (tokens)",
                    y_label=f"KV cache ({unit})",
                    x_fmt=fmt_tokens,
                    x_zero=True,
                    y_zero=True,
                    subtitle="mean bytes of K and V held after prefill",
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
        "Bytes of the K and V tensors held after prefill, per method and compression, against context length.",
    )


def _measured_memory(memory_rows: Sequence[Row], colors: Mapping[str, str]) -> str:
    by_series: dict[str, list[Row]] = defaultdict(list)
    for r in memory_rows:
        variant = r.get("variant")
        name = str(r.get("method", "?")) + (f" · {variant}" if variant not in (None, "") else "")
        by_series[name].append(r)
    figs: list[str] = []
    for field_name, cid, title in (
        ("kv_bytes", "memory-measured-kv", "Measured KV cache"),
        ("peak_rss_bytes", "memory-measured-rss", "Peak resident memory"),
    ):
        vals = [
            float(r[field_name]) for rs in by_series.values() for r in rs if isinstance(r.get(field_name), int | float)
        ]
        if not vals:
            continue
        unit, scale = _byte_unit(max(vals))
        series: list[Series] = []
        for i, (name, rs) in enumerate(by_series.items()):
            method = str(rs[0].get("method", "?"))
            pts = [
                (
                    float(r["context_tokens"]),
                    float(r[field_name]) / scale,
                    f"{name}: {fmt_bytes(float(r[field_name]))} at {float(r['context_tokens']):,.0f} tokens",
                )
                for r in rs
                if isinstance(r.get(field_name), int | float) and isinstance(r.get("context_tokens"), int | float)
            ]
            color = colors.get(method, PALETTE[i % len(PALETTE)])
            same_method = [n for n in by_series if n.split(" · ")[0] == method]
            series.append(Series(name, color, pts, dash=DASHES[same_method.index(name) % len(DASHES)]))
        figs.append(
            _line_figure(
                cid,
                title,
                series,
                x_label="context length (tokens)",
                y_label=f"KV cache ({unit})" if field_name == "kv_bytes" else f"peak RSS ({unit})",
                x_fmt=fmt_tokens,
                x_zero=True,
                y_zero=True,
                subtitle="from memory.jsonl",
            )
        )
    return f'<h3>Measured memory</h3><div class="charts">{"".join(figs)}</div>' if figs else ""


def _speed_section(rows: Sequence[Row], colors: Mapping[str, str]) -> str:
    speed = speed_table(rows)
    if not speed:
        return ""
    table = html_table(
        [
            "method",
            "rows",
            "prefill (median)",
            "prefill vs full",
            "decode / token (median)",
            "decode vs full",
        ],
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
        groups = [s.method for s in compressed]
        svg = bar_chart(
            "speed",
            "Time relative to the full cache",
            groups,
            [
                BarSeries(
                    "prefill",
                    "#4e79a7",
                    [s.prefill_ratio for s in compressed],
                    [
                        f"{s.method} prefill: {fmt_ratio(s.prefill_ratio)} of full ({fmt_seconds(s.prefill_seconds)})"
                        for s in compressed
                    ],
                ),
                BarSeries(
                    "decode / token",
                    "#f28e2b",
                    [s.decode_ratio for s in compressed],
                    [
                        f"{s.method} decode: {fmt_ratio(s.decode_ratio)} of full "
                        f"({fmt_seconds(s.decode_seconds_per_token)} / token)"
                        for s in compressed
                    ],
                ),
            ],
            y_label="time ÷ full",
            y_fmt=lambda t: f"{t:.2f}×" if t < 10 else f"{t:.0f}×",
            ref=1.0,
            ref_label="full = 1×",
            subtitle="median over rows; below 1× is faster than the uncompressed cache",
        )
        chart = f'<div class="charts">{_figure("speed", svg)}</div>'
    return _section("speed", "Speed", chart + table + notes, "Median prefill time and decode time per token.")


def _streaming_section(stream_rows: Sequence[Row], colors: Mapping[str, str]) -> str:
    if not stream_rows:
        return ""
    by_series: dict[tuple[str, Any], list[Row]] = defaultdict(list)
    for r in stream_rows:
        by_series[(str(r.get("method", "?")), r.get("budget"))].append(r)
    methods = list(dict.fromkeys(m for m, _b in by_series))
    budgets_of: dict[str, list[Any]] = defaultdict(list)
    for m, b in by_series:
        budgets_of[m].append(b)
    local_colors = dict(colors)
    extra = _color_map([FULL_METHOD, *[m for m in colors if m != FULL_METHOD], *methods])
    for m in methods:
        local_colors.setdefault(m, extra[m])
    series: list[Series] = []
    dropped = 0
    table_rows: list[list[Any]] = []
    for (m, b), rs in by_series.items():
        name = m if b is None else f"{m} ({b} tokens)"
        pts: list[tuple[float, float, str]] = []
        for r in sorted(rs, key=lambda r: r.get("bucket_start", 0)):
            ppl = r.get("ppl")
            s0, s1 = r.get("bucket_start", 0), r.get("bucket_end", 0)
            if not isinstance(ppl, int | float) or not math.isfinite(ppl) or ppl <= 0:
                dropped += 1
                continue
            pts.append(((s0 + s1) / 2, float(ppl), f"{name}: ppl {ppl:.4g} on tokens {s0:,}–{s1:,}"))
        series.append(Series(name, local_colors[m], pts, dash=DASHES[budgets_of[m].index(b) % len(DASHES)]))
        finite = [p[1] for p in pts]
        last = rs[-1] if rs else {}
        table_rows.append(
            [
                name,
                len(rs),
                f"{sum(finite) / len(finite):.4g}" if finite else "–",
                f"{max(finite):.4g}" if finite else "–",
                f"{last.get('kv_tokens', '–'):,}" if isinstance(last.get("kv_tokens"), int) else "–",
            ]
        )
    ys = [p[1] for s in series for p in s.points]
    log_y = bool(ys) and max(ys) / min(ys) > 10
    caption = f"{dropped} bucket(s) with a non-finite perplexity left out." if dropped else None
    fig = _line_figure(
        "streaming",
        "Perplexity per 1k-token bucket",
        series,
        x_label="position in stream (tokens)",
        y_label="perplexity" + (" (log scale)" if log_y else ""),
        caption=caption,
        x_fmt=fmt_tokens,
        x_zero=True,
        log_y=log_y,
        subtitle="full past the model's window shows where an unbounded cache fails",
    )
    table = html_table(["series", "buckets", "mean ppl", "max ppl", "KV tokens (last)"], table_rows, cls="streaming")
    return _section(
        "streaming",
        "Streaming perplexity",
        f'<div class="charts">{fig}</div>{table}',
    )


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
            method_rank.get(str(r.get("method", "?")), 99),
            norm_compression(r.get("compression")),
        )

    ordered = sorted(rows, key=sort_key)
    shown = ordered[:MAX_DETAIL_ROWS]

    def num(v: Any, f: Callable[[float], str]) -> str:
        return f(float(v)) if isinstance(v, int | float) and not isinstance(v, bool) else "–"

    def text(v: Any, n: int = 120) -> Html:
        s = "" if v is None else str(v)
        return Html(f'<span title="{esc(s)}">{esc(_truncate(s, n))}</span>')

    body = [
        [
            r.get("mode", "agnostic"),
            r.get("task", "?"),
            num(r.get("length"), lambda x: f"{x:,.0f}"),
            num(r.get("context_tokens"), lambda x: f"{x:,.0f}"),
            num(r.get("depth"), lambda x: f"{x:.2f}"),
            r.get("sample", "–"),
            r.get("method", "?"),
            format_compression(norm_compression(r.get("compression"))),
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
table.scores td .heat{display:inline-block;min-width:3.2em;padding:.05rem .35rem;border-radius:4px}
table.config td,table.details td.l{white-space:normal;max-width:48rem}
table.details td{font-size:.82rem}
table.details td:nth-last-child(-n+2){min-width:16rem}
.na{color:#8c959f}
.swatch{display:none}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
figure.chart{margin:0;padding:10px 10px 6px;border:1px solid var(--border);border-radius:10px;background:#fff}
figure.chart svg{display:block;width:100%;height:auto;font-family:inherit}
figure.chart svg text{fill:#24292f}
figure.chart svg .ticks text,figure.chart svg .subtitle{fill:#57606a}
figure.chart circle.point:hover{r:5}
figure.chart figcaption{font-size:.82rem;color:var(--muted);padding:.2rem .3rem}
details{margin:.5rem 0}
details>summary{cursor:pointer;color:var(--accent);font-weight:500}
footer{margin-top:3rem;color:var(--muted);font-size:.82rem}
"""


def render_report(
    rows: Sequence[Row],
    *,
    config: Mapping[str, Any] | None = None,
    streaming: Sequence[Row] = (),
    memory: Sequence[Row] = (),
    run_dir: str | Path = ".",
) -> str:
    """The report's HTML for already-loaded data (what :func:`write_report` writes)."""
    run_dir = Path(run_dir)
    colors = _color_map(
        [
            *methods_in_order(rows),
            *(str(r.get("method", "?")) for r in memory),
            *(str(r.get("method")) for r in streaming),
        ]
    )
    sections: list[str] = []
    toc: list[tuple[str, str]] = []
    if rows:
        scores_html = _scores_section(rows, colors)
        sections.append(scores_html)
        toc.append(("summary", "Summary"))
        if 'id="curves"' in scores_html:
            toc.append(("curves", "Score vs compression"))
        best_html = _best_section(rows)
        sections.append(best_html)
        toc.append(("best", "Best per budget"))
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
        ("speed", "Speed", _speed_section(rows, colors)),
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
        f"<body><main>{_header(rows, config, run_dir)}{nav}{''.join(sections)}"
        f"<footer>Generated by kvsieve {esc(__version__)} on {esc(generated)} from {esc(run_dir)}. "
        "This file is self-contained: it loads nothing from the network.</footer></main></body></html>\n"
    )


def write_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` from the run files in ``out_dir`` and return its path.

    Reads ``results.jsonl`` and, when present, ``config.json``, ``streaming.jsonl`` and ``memory.jsonl``;
    any of them may be missing (the report then says so or leaves the section out). The file is written
    atomically (a temporary file renamed into place).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = render_report(
        load_rows(out),
        config=load_config(out),
        streaming=load_jsonl(out / STREAMING_FILE),
        memory=load_jsonl(out / MEMORY_FILE),
        run_dir=out,
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


__all__ = [
    "CONFIG_FILE",
    "REPORT_FILE",
    "BarSeries",
    "Series",
    "bar_chart",
    "line_chart",
    "render_report",
    "write_report",
]
