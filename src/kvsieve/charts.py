"""The charts of kvsieve's HTML pages (bench report, diagnosis): matplotlib figures inlined as SVG.

A chart is a small declarative object (:class:`LineChart`, :class:`BarChart`, :class:`Heatmap`); :func:`figure_html`
draws it on a :class:`~matplotlib.figure.Figure` with the SVG canvas and returns ``<figure class="chart"
data-chart="ID" data-spec="JSON">`` holding one inline ``<svg>``; ``data-spec`` is the plotted data, so tests and
scripts read what a chart shows rather than its markup. No pyplot and no global backend; settings apply only inside
:func:`matplotlib.style.context` and start from matplotlib's defaults, so drawing changes nothing global and a user's
matplotlibrc changes no chart. The SVG is made fit to inline and deterministic: the XML header, DOCTYPE, namespaces
and RDF metadata (which carry URLs) are dropped, ids get the chart id as prefix (several charts share one page),
hashes use a fixed salt and no date is written. Marks carry ``<title>`` tooltips (per point, bar and heatmap cell).
matplotlib is imported on first use only (about a second).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# Tableau 10: distinct, print-friendly, readable on white; the baseline is drawn in dark grey.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#17becf")
BASELINE_COLOR = "#3a3a3a"
STYLES = ("-", "--", ":", "-.")  # tell apart names that share a colour once the palette wraps around
RC = {
    "svg.hashsalt": "kvsieve",  # clip-path and marker ids from a fixed salt: same data, same bytes
    "svg.fonttype": "none",  # real <text> (searchable, small) in matplotlib's sans-serif list, which browsers have
    "text.parse_math": False,  # a "$" in a method name is text, not mathtext
    "font.size": 9,
    "axes.edgecolor": "#57606a",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e6e9ed",
    "legend.frameon": False,
    "legend.fontsize": 8,
}
Marks = dict[str, tuple[str | None, list[str]]]  # group id -> (its tooltip, one tooltip per mark inside it)
VECTOR_CELLS = 1024  # heatmaps up to this many cells draw one shape per cell (hover tooltips); larger ones, an image


def colors_for(names: Iterable[str], baseline: str | None = None) -> dict[str, tuple[str, str]]:
    """A ``(colour, line style)`` per name, stable in order of first appearance; ``baseline`` is dark grey, dashed."""
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        i = sum(1 for n in out if n != baseline)
        if name not in out:
            out[name] = (BASELINE_COLOR, "--") if name == baseline else (PALETTE[i % 10], STYLES[i // 10 % 4])
    return out


def short(text: str, n: int = 28) -> str:
    """``text`` cut to ``n`` characters with an ellipsis in the middle, so both ends stay readable."""
    head = (n - 1) * 2 // 5
    return text if len(text) <= n else text[:head] + "…" + text[len(text) - (n - 1 - head) :]


@dataclass
class _Chart:
    id: str
    title: str
    subtitle: str | None = field(default=None, kw_only=True)
    caption: str | None = field(default=None, kw_only=True)
    x_label: str | None = field(default=None, kw_only=True)
    y_label: str | None = field(default=None, kw_only=True)
    y_fmt: Callable[[float], str] | None = field(default=None, kw_only=True)
    log_y: bool = field(default=False, kw_only=True)
    size: tuple[float, float] = field(default=(6.4, 3.3), kw_only=True)

    def finish(self, ax: Any, legend: bool) -> None:
        ax.figure.suptitle(short(self.title, 70), x=0.01, ha="left", fontsize=11, fontweight="bold")
        if self.subtitle:
            ax.set_title(self.subtitle, fontsize=8.5, color="#59636e", loc="left")
        ax.set_xlabel(self.x_label or "")
        ax.set_ylabel(self.y_label or "")
        if self.log_y:
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
        if self.y_fmt:
            ax.yaxis.set_major_formatter(lambda v, _pos: self.y_fmt(v))
        if legend:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


@dataclass
class Line:
    """One series: points ``(x, y)``, optional 95% intervals ``(lo, hi)`` and a tooltip per point. ``reference``
    draws it as a dashed horizontal line across the plot at its first ``y`` (the uncompressed baseline)."""

    name: str
    points: list[tuple[float, float]]
    tips: list[str] | None = None
    intervals: list[tuple[float, float]] | None = None
    color: str = PALETTE[0]
    style: str = "-"
    reference: bool = False

    def clean(self, log_y: bool) -> Line:
        """The finite points (positive ones on a log axis), sorted by x, with their tips and intervals."""
        keep = sorted(
            (i for i, (x, y) in enumerate(self.points) if math.isfinite(x + y) and (y > 0 or not log_y)),
            key=lambda i: self.points[i][0],
        )
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return replace(self, points=pick(self.points), tips=pick(self.tips), intervals=pick(self.intervals))


@dataclass
class LineChart(_Chart):
    """Lines over one x axis; ``x_ticks`` pins the ticks (labelled by ``x_fmt``), ``y_range`` the y limits."""

    lines: list[Line]
    x_ticks: list[float] | None = None
    x_fmt: Callable[[float], str] | None = None
    y_range: tuple[float, float] | None = None
    log_x: bool = False
    zero_based: bool = False

    def data(self) -> dict[str, Any]:
        lines = [ln.clean(self.log_y) for ln in self.lines]
        series = {ln.name: {"points": ln.points, "intervals": ln.intervals, "reference": ln.reference} for ln in lines}
        return {"kind": "line", "log_y": self.log_y, "series": {k: v for k, v in series.items() if v["points"]}}

    def draw(self, fig: Any, marks: Marks) -> None:
        ax = fig.add_subplot()
        lines = [ln for ln in (ln.clean(self.log_y) for ln in self.lines) if ln.points]
        xs_all = [x for ln in lines for x, _ in ln.points] or [0.0]
        plain = [ln for ln in lines if not ln.reference]
        for i, ln in enumerate(lines):
            if ln.reference:
                ax.axhline(ln.points[0][1], color=ln.color, ls="--", lw=1.3, label=short(ln.name), gid=f"s{i}")
                marks[f"s{i}"] = ((ln.tips or [ln.name])[0], [])
                continue
            xs, ys = zip(*ln.points, strict=True)
            if ln.intervals and not self.log_x:  # error bars, nudged sideways so that series do not hide each other
                nudge = (plain.index(ln) - (len(plain) - 1) / 2) * (max(xs_all) - min(xs_all)) * 0.008
                err = [[y - lo for y, (lo, _) in zip(ys, ln.intervals, strict=True)],
                       [hi - y for y, (_, hi) in zip(ys, ln.intervals, strict=True)]]  # fmt: skip
                ax.errorbar([x + nudge for x in xs], ys, err, fmt="none", ecolor=ln.color, alpha=0.45, capsize=2)
            ms = 4 if len(xs) <= 40 else 2
            ax.plot(xs, ys, color=ln.color, ls=ln.style, lw=2, marker="o", ms=ms, label=short(ln.name), gid=f"s{i}")
            marks[f"s{i}"] = (ln.name, ln.tips or [])
        if self.log_x:
            ax.set_xscale("log", base=2)
        if self.x_ticks:
            ax.set_xticks(self.x_ticks)
        if self.x_fmt:
            ax.xaxis.set_major_formatter(lambda v, _pos: self.x_fmt(v))
        if self.y_range or self.zero_based:
            ax.set_ylim(*(self.y_range or (0, None)))
        if self.zero_based:
            ax.set_xlim(left=0)
        if not lines:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="#59636e")
        self.finish(ax, legend=bool(lines))


@dataclass
class BarChart(_Chart):
    """Grouped bars: one group per entry of ``groups``, one bar per series in each (``None``: no bar); ``ref``
    draws a dashed horizontal reference line."""

    groups: list[str]
    series: dict[str, list[float | None]]
    tips: dict[str, list[str]] = field(default_factory=dict)
    ref: float | None = None
    ref_label: str | None = None

    def data(self) -> dict[str, Any]:
        return {"kind": "bar", "groups": self.groups, "series": self.series, "log_y": self.log_y}

    def draw(self, fig: Any, marks: Marks) -> None:
        ax = fig.add_subplot()
        width = 0.8 / max(len(self.series), 1)
        for si, (name, values) in enumerate(self.series.items()):
            ok = [gi for gi, v in enumerate(values) if v is not None and math.isfinite(v) and (v > 0 or not self.log_y)]
            for k, gi in enumerate(ok):
                x = gi + (si - (len(self.series) - 1) / 2) * width
                label = short(name) if k == 0 and len(self.series) > 1 else None
                ax.bar(x, values[gi], width * 0.92, color=PALETTE[si % 10], label=label, gid=f"b{si}-{gi}")
                tips = self.tips.get(name)
                marks[f"b{si}-{gi}"] = (tips[gi] if tips else f"{self.groups[gi]}: {values[gi]:.4g}", [])
        if self.ref is not None:
            ax.axhline(self.ref, color=BASELINE_COLOR, ls="--", lw=1.3, label=self.ref_label, gid="ref")
            marks["ref"] = (self.ref_label or f"{self.ref:g}", [])
        step = max(1, math.ceil(len(self.groups) / 32))
        crowded = max(map(len, self.groups), default=0) * len(self.groups) > 60  # labels would overlap: slant them
        labels = [short(g, 24) for g in self.groups[::step]]
        ax.set_xticks(
            range(0, len(self.groups), step), labels, rotation=45 * crowded, ha="right" if crowded else "center"
        )
        ax.grid(axis="x", visible=False)
        shown = [v for vs in self.series.values() for v in vs if v is not None and math.isfinite(v) and v > 0]
        if self.log_y and shown:  # whole decades, so bar heights compare as orders of magnitude
            lo, hi = math.floor(math.log10(min(shown))), math.ceil(math.log10(max(shown)))
            ax.set_ylim(10.0**lo, 10.0 ** max(hi, lo + 1))
        self.finish(ax, legend=len(self.series) > 1 or bool(self.ref_label))


@dataclass
class Heatmap(_Chart):
    """A grid of values (rows x columns; ``None``/NaN grey) on the Blues scale from ``lo`` to ``hi`` (default: the
    data's range); ``log`` colours on a log scale over 4 decades and leaves non-positive cells blank.
    ``tip(row, col, value)`` gives each cell's tooltip."""

    grid: list[list[float | None]]
    tip: Callable[[int, int, float | None], str]
    lo: float | None = None
    hi: float | None = None
    log: bool = False

    def data(self) -> dict[str, Any]:
        return {"kind": "heatmap", "grid": self.grid, "lo": self.lo, "hi": self.hi, "log": self.log}

    def draw(self, fig: Any, marks: Marks) -> None:
        import numpy as np
        from matplotlib import colormaps
        from matplotlib.colors import LogNorm, Normalize

        ax = fig.add_subplot()
        values = np.array([[math.nan if v is None else v for v in row] for row in self.grid], dtype=float)
        shown = np.ma.masked_where(~(values > 0) if self.log else ~np.isfinite(values), values)  # masked: grey/blank
        lo = self.lo if self.lo is not None else float(shown.min()) if shown.count() else 0.0
        hi = self.hi if self.hi is not None else float(shown.max()) if shown.count() else 1.0
        norm = LogNorm(max(lo, hi * 1e-4), hi) if self.log else Normalize(lo, hi if hi > lo else lo + 1.0)
        cmap = colormaps["Blues"].with_extremes(bad="#ffffff" if self.log else "#d0d7de")
        if shown.size <= VECTOR_CELLS:  # a shape per cell, each with its tooltip; row 0 (first layer) on top
            mesh = ax.pcolormesh(shown, cmap=cmap, norm=norm, gid="cells")
            marks["cells"] = (None, [self.tip(i, j, v) for i, row in enumerate(self.grid) for j, v in enumerate(row)])
            ax.invert_yaxis()
        else:  # too many cells for shapes (MBs of SVG): one embedded image, a pixel per cell, values in data-spec
            rows, cols = shown.shape
            mesh = ax.imshow(
                shown, cmap=cmap, norm=norm, aspect="auto", interpolation="none", extent=(0, cols, rows, 0)
            )
        ax.grid(False)
        ax.tick_params(labelsize=7, length=2)
        for axis, count in ((ax.xaxis, values.shape[1]), (ax.yaxis, values.shape[0])):
            ticks = range(0, count, max(1, math.ceil(count / 12)))  # every cell labelled, or every k-th if crowded
            axis.set_ticks([i + 0.5 for i in ticks], [str(i) for i in ticks])
        bar = fig.colorbar(mesh, ax=ax, fraction=0.08, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        if self.log:
            _plain_log_labels(bar.ax.yaxis)
        self.finish(ax, legend=False)


Chart = LineChart | BarChart | Heatmap


def _plain_log_labels(axis: Any) -> None:
    """Log-axis labels as plain numbers (matplotlib's default needs mathtext, which is off so that "$" stays text)."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels 2..9 x 10^k only when few decades show


def overlap_note(lines: Sequence[Line]) -> str | None:
    """A sentence naming series whose points coincide exactly (so that one line hides the others)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for ln in (ln for ln in lines if not ln.reference and ln.clean(False).points):
        groups[tuple(sorted((round(x, 9), round(y, 6)) for x, y in ln.clean(False).points))].append(ln.name)
    same = [n if len(n) <= 4 else [*n[:3], f"{len(n) - 3} more"] for n in groups.values() if len(n) > 1]
    return "Overlapping lines (identical values): " + "; ".join(" = ".join(n) for n in same) + "." if same else None


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True).replace("://", ":&#47;&#47;")


def _add_titles(svg: str, gid: str, title: str | None, marks: list[str]) -> str:
    """Give the group ``gid`` a ``<title>`` and its marks (``<use>`` markers, else ``<path>`` cells) one each."""
    start = svg.find(f'<g id="{gid}">')
    if start < 0:
        return svg
    start += len(f'<g id="{gid}">')
    depth, end = 1, len(svg)
    for m in re.finditer(r"<g\b|</g>", svg[start:]):  # the end of this group: its matching </g>
        depth += 1 if m.group(0) == "<g" else -1
        if depth == 0:
            end = start + m.start()
            break
    body, tips = svg[start:end], iter(marks)
    tag = "use" if "<use " in body else "path"

    def titled(m: re.Match[str]) -> str:
        tip = next(tips, None)
        return m.group(0) if tip is None else f"{m.group(0)[:-2]}><title>{_esc(tip)}</title></{tag}>"

    body = re.sub(rf"<{tag}\b[^>]*/>", titled, body) if marks else body
    return svg[:start] + (f"<title>{_esc(title)}</title>" if title else "") + body + svg[end:]


def render_svg(chart: Chart) -> str:
    """The chart as one inline ``<svg>`` element (deterministic: same chart, same string)."""
    import matplotlib as mpl
    import matplotlib.style
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with mpl.style.context(["default", RC]):  # matplotlib's defaults, not the user's matplotlibrc: same page anywhere
        fig = Figure(figsize=chart.size, layout="constrained")
        FigureCanvasSVG(fig)  # the SVG canvas lays out and prints: no Agg canvas, no pyplot
        marks: Marks = {}
        chart.draw(fig, marks)
        buf = io.StringIO()
        fig.canvas.print_svg(buf, metadata={"Date": None, "Creator": None})
    svg = re.sub(r'\b(d|x|y|transform)="([^"]*)"', _two_decimals, buf.getvalue())
    for gid, (title, tips) in marks.items():
        svg = _add_titles(svg, gid, title, tips)
    svg = re.sub(r"<metadata>.*?</metadata>\s*|<style .*?</style>", "", svg[svg.index("<svg") :], flags=re.S)
    svg = re.sub(r'\s(?:xmlns(?::\w+)?|version)="[^"]*"', "", svg, count=4)  # HTML gives inline SVG its namespaces
    prefix = re.sub(r"[^A-Za-z0-9-]", "-", chart.id) + "--"
    svg = (
        re.sub(r'\bid="', f'id="{prefix}', svg)
        .replace('href="#', f'href="#{prefix}')
        .replace("url(#", f"url(#{prefix}")
    )
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{_esc(chart.title)}" ', 1)
    return svg.replace("://", ":&#47;&#47;")  # text from the data never carries a URL scheme into the page


def _two_decimals(m: re.Match[str]) -> str:
    """Geometry to 1/100 of a point (matplotlib writes 6 decimals): a third less SVG, no visible change."""
    short_numbers = re.sub(r"(\.\d\d)\d+", r"\1", m.group(2))
    return f'{m.group(1)}="{short_numbers}"'


def figure_html(chart: Chart) -> str:
    """``<figure class="chart" data-chart="ID" data-spec="JSON">`` with the chart's SVG and caption."""
    notes = [chart.caption, overlap_note(chart.lines) if isinstance(chart, LineChart) else None]
    caption = " ".join(n for n in notes if n)
    spec = json.dumps(_jsonable(chart.data()), separators=(",", ":"), allow_nan=False)
    return (
        f'<figure class="chart" data-chart="{_esc(chart.id)}" data-spec="{_esc(spec)}">{render_svg(chart)}'
        + (f"<figcaption>{_esc(caption)}</figcaption>" if caption else "")
        + "</figure>"
    )


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, floats to 6 significant digits and non-finite ones as ``None`` (JSON has no
    NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):  # 6 significant digits, as the tables show at most
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value
