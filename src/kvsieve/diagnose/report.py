"""The diagnosis as one self-contained HTML page: layer x head heatmaps, attention maps, sinks and outliers.

Like the benchmark report (:mod:`kvsieve.bench.report`, whose CSS and escaping it reuses), the page loads nothing from
anywhere: CSS inline, every chart an inline SVG. Each chart is a ``<figure class="chart" data-chart="ID">`` holding
one ``<svg>``; heatmap cells are ``<rect class="cell">`` and bars ``<rect class="bar">``, each with a ``<title>``.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kvsieve import __version__
from kvsieve.bench.report import CSS, esc, html_table

from .diagnosis import STAT_TITLES

REPORT_FILE = "diagnosis.html"
FONT = 12

# ColorBrewer "Blues": light (low) to dark (high)
_BLUES = (
    (0.0, (247, 251, 255)),
    (0.25, (198, 219, 239)),
    (0.5, (107, 174, 214)),
    (0.75, (33, 113, 181)),
    (1.0, (8, 48, 107)),
)
SHORT_TITLES = {
    "sink0": "Token 0 mass",
    "first_k": "First-k mass",
    "hidden_sink_mass": "Hidden-sink mass",
    "hidden_sink_count": "Hidden sinks (count)",
    "local": "Locality (last w)",
    "entropy": "Entropy (nats)",
    "entropy_norm": "Normalised entropy",
    "hh_top1": "Top-1% share",
    "hh_top10": "Top-10% share",
    "dormant_frac": "Dormant share",
    "output_norm": "Output norm",
    "retrieval": "Retrieval score",
}
_PROBABILITY_STATS = {
    "sink0",
    "first_k",
    "hidden_sink_mass",
    "local",
    "entropy_norm",
    "hh_top1",
    "hh_top10",
    "dormant_frac",
    "retrieval",
}

EXTRA_CSS = """
.heatmaps{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.maps{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
figure.chart rect.cell:hover{stroke:#d1242f;stroke-width:1.5}
.summary-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px;margin:.6rem 0 1rem}
.stat{border:1px solid var(--border);border-radius:10px;padding:.55rem .8rem;background:var(--soft)}
.stat b{display:block;font-size:1.25rem}
.stat span{color:var(--muted);font-size:.85rem}
"""


def color(value: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """``value`` on the Blues scale between ``lo`` and ``hi`` as ``#rrggbb``."""
    x = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    for (x0, c0), (x1, c1) in itertools.pairwise(_BLUES):
        if x <= x1:
            f = (x - x0) / (x1 - x0)
            rgb = [round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True)]
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#{:02x}{:02x}{:02x}".format(*_BLUES[-1][1])


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def _figure(chart_id: str, svg: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart" data-chart="{esc(chart_id)}">{svg}{cap}</figure>'


def _svg_open(chart_id: str, title: str, width: float, height: float) -> str:
    return (
        f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" role="img" '
        f'aria-label="{esc(title)}" font-size="{FONT}" data-chart="{esc(chart_id)}">'
    )


def _legend_bar(x: float, y: float, width: float, lo: float, hi: float, log: bool = False) -> str:
    steps = 24
    w = width / steps
    parts = [
        f'<rect x="{x + i * w:.1f}" y="{y:.1f}" width="{w + 0.3:.1f}" height="8" fill="{color(i / (steps - 1))}"/>'
        for i in range(steps)
    ]
    lo_txt, hi_txt = (f"1e{lo:.0f}", f"1e{hi:.0f}") if log else (_fmt(lo), _fmt(hi))
    parts.append(f'<text x="{x:.1f}" y="{y + 20:.1f}" fill="#57606a">{esc(lo_txt)}</text>')
    parts.append(f'<text x="{x + width:.1f}" y="{y + 20:.1f}" text-anchor="end" fill="#57606a">{esc(hi_txt)}</text>')
    return '<g class="legend">' + "".join(parts) + "</g>"


def heatmap(
    chart_id: str,
    title: str,
    grid: Sequence[Sequence[float | None]],
    *,
    lo: float | None = None,
    hi: float | None = None,
    row_label: str = "layer",
    col_label: str = "head",
    fmt_digits: int = 3,
) -> str:
    """A layer x head heatmap: one ``rect.cell`` per value (``None``: grey, not profiled)."""
    values = [v for row in grid for v in row if v is not None and math.isfinite(v)]
    lo = min(values, default=0.0) if lo is None else lo
    hi = max(values, default=1.0) if hi is None else hi
    n_rows, n_cols = len(grid), max((len(r) for r in grid), default=0)
    cell_w = max(14.0, min(30.0, 240.0 / max(n_cols, 1)))
    cell_h = max(8.0, min(16.0, 420.0 / max(n_rows, 1)))
    left, top = 34.0, 58.0
    width = left + n_cols * cell_w + 12
    height = top + n_rows * cell_h + 40
    out = [_svg_open(chart_id, title, max(width, 260), height)]
    out.append(f'<text class="title" x="4" y="16" font-size="13" font-weight="600">{esc(title)}</text>')
    out.append(f'<text x="{left:.1f}" y="{top - 8:.1f}" fill="#57606a">{esc(col_label)} →</text>')
    for j in range(n_cols):
        if n_cols <= 16 or j % 2 == 0:
            out.append(
                f'<text x="{left + (j + 0.5) * cell_w:.1f}" y="{top - 20:.1f}" text-anchor="middle" '
                f'font-size="10" fill="#57606a">{j}</text>'
            )
    step = 1 if n_rows <= 16 else (2 if n_rows <= 40 else 5)
    for i in range(0, n_rows, step):
        out.append(
            f'<text x="{left - 4:.1f}" y="{top + (i + 0.75) * cell_h:.1f}" text-anchor="end" font-size="10" '
            f'fill="#57606a">{i}</text>'
        )
    out.append('<g class="cells">')
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            x, y = left + j * cell_w, top + i * cell_h
            if v is None or not math.isfinite(v):
                fill, label = "#d0d7de", "not profiled"
            else:
                fill, label = color(v, lo, hi), f"{v:.{fmt_digits}g}"
            out.append(
                f'<rect class="cell" x="{x:.1f}" y="{y:.1f}" width="{cell_w - 1:.1f}" height="{cell_h - 1:.1f}" '
                f'fill="{fill}"><title>{row_label} {i}, {col_label} {j}: {esc(label)}</title></rect>'
            )
    out.append("</g>")
    out.append(
        f'<text x="6" y="{top + n_rows * cell_h / 2:.1f}" font-size="10" fill="#57606a" '
        f'transform="rotate(-90 6 {top + n_rows * cell_h / 2:.1f})" text-anchor="middle">{esc(row_label)}</text>'
    )
    out.append(_legend_bar(left, top + n_rows * cell_h + 8, min(160.0, n_cols * cell_w), lo, hi))
    out.append("</svg>")
    return "".join(out)


def attention_map(chart_id: str, title: str, grid: Sequence[Sequence[float]], n_tokens: int) -> str:
    """A pooled attention map (query bins x key bins), log colour scale; cells with no mass are left blank."""
    m = len(grid)
    size = 300.0
    cell = size / max(m, 1)
    left, top = 40.0, 30.0
    positive = [v for row in grid for v in row if v is not None and v > 0]
    hi = math.log10(max(positive, default=1.0))
    lo = max(math.log10(min(positive, default=1e-6)), hi - 4.0)
    out = [_svg_open(chart_id, title, left + size + 14, top + size + 58)]
    out.append(f'<text class="title" x="4" y="16" font-size="13" font-weight="600">{esc(title)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="#ffffff" stroke="#d0d7de"/>')
    out.append('<g class="cells">')
    per_bin = n_tokens / max(m, 1)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is None or v <= 0:
                continue
            lv = (math.log10(v) - lo) / (hi - lo) if hi > lo else 1.0
            out.append(
                f'<rect class="cell" x="{left + j * cell:.2f}" y="{top + i * cell:.2f}" width="{cell + 0.05:.2f}" '
                f'height="{cell + 0.05:.2f}" fill="{color(lv)}">'
                f"<title>queries {i * per_bin:.0f}-{(i + 1) * per_bin:.0f} → keys {j * per_bin:.0f}-"
                f"{(j + 1) * per_bin:.0f}: {v:.3g}</title></rect>"
            )
    out.append("</g>")
    out.append(
        f'<text x="{left + size / 2:.1f}" y="{top + size + 14:.1f}" text-anchor="middle" font-size="10" '
        f'fill="#57606a">key position (0 … {n_tokens - 1}) →</text>'
    )
    out.append(
        f'<text x="12" y="{top + size / 2:.1f}" font-size="10" fill="#57606a" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + size / 2:.1f})">query position →</text>'
    )
    out.append(_legend_bar(left, top + size + 24, 160.0, lo, hi, log=True))
    out.append("</svg>")
    return "".join(out)


def bars(
    chart_id: str,
    title: str,
    values: Sequence[float | None],
    *,
    log: bool = True,
    x_label: str = "layer",
    y_label: str = "",
) -> str:
    """Vertical bars (``rect.bar``) per index, on a log scale by default."""
    n = len(values)
    width, height = 620.0, 240.0
    left, top, bottom = 56.0, 30.0, 36.0
    plot_w, plot_h = width - left - 16, height - top - bottom
    finite = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    hi = max(finite, default=1.0)
    lo = min(finite, default=1.0)
    if log:
        lo_l, hi_l = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        hi_l = max(hi_l, lo_l + 1)

        def y_of(v: float) -> float:
            return top + plot_h * (1 - (math.log10(v) - lo_l) / (hi_l - lo_l))

        ticks = [(10.0**e, f"1e{e}") for e in range(lo_l, hi_l + 1)]
    else:
        lo_l, hi_l = 0.0, hi

        def y_of(v: float) -> float:
            return top + plot_h * (1 - v / hi_l if hi_l else 1)

        ticks = [(hi_l * f, _fmt(hi_l * f)) for f in (0, 0.5, 1)]
    out = [_svg_open(chart_id, title, width, height)]
    out.append(f'<text class="title" x="4" y="16" font-size="13" font-weight="600">{esc(title)}</text>')
    out.append('<g class="ticks">')
    for v, label in ticks:
        y = y_of(v) if v > 0 or not log else top + plot_h
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(label)}</text>'
        )
    out.append("</g>")
    bw = plot_w / max(n, 1)
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v) or (log and v <= 0):
            continue
        y = y_of(v)
        out.append(
            f'<rect class="bar" x="{left + i * bw + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" '
            f'height="{top + plot_h - y:.1f}" fill="#4e79a7"><title>{x_label} {i}: {_fmt(v, 4)}</title></rect>'
        )
        if n <= 40 and (n <= 20 or i % 2 == 0):
            out.append(
                f'<text x="{left + (i + 0.5) * bw:.1f}" y="{top + plot_h + 14:.1f}" text-anchor="middle" '
                f'font-size="10">{i}</text>'
            )
    out.append(f'<path d="M{left} {top}V{top + plot_h}H{left + plot_w}" fill="none" stroke="#57606a"/>')
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4:.1f}" text-anchor="middle" fill="#57606a">'
        f"{esc(x_label)}</text>"
    )
    if y_label:
        out.append(
            f'<text x="12" y="{top + plot_h / 2:.1f}" text-anchor="middle" fill="#57606a" '
            f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">{esc(y_label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _section(sid: str, title: str, body: str, intro: str | None = None) -> str:
    p = f'<p class="intro">{esc(intro)}</p>' if intro else ""
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{p}{body}</section>'


def _summary_section(d: dict) -> str:
    s = d["summary"]
    cfg = d["config"]
    cards = [
        (f"{s['mean_sink0']:.3f}", "mean attention on token 0 (all heads)"),
        (f"{s['heads_over_half_on_token0']}", "heads with > 50% on token 0"),
        (", ".join(_ranges(s["sink_layers"])) or "none", "layers with mean token-0 mass >= 0.25"),
        (f"{s['heads_with_hidden_sinks']}", "heads with hidden sinks (beyond token 0)"),
        (f"{s['dormant_heads']} / {s['active_heads']}", "dormant / active heads"),
    ]
    if d.get("retrieval"):
        r = d["retrieval"]
        n_ret = sum(1 for row in r["scores"] for v in row if v > 0.1)
        cards.append((f"{n_ret}", f"retrieval heads (score > 0.1) on {r['task']}"))
    grid = (
        '<div class="summary-grid">'
        + "".join(f'<div class="stat"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for v, k in cards)
        + "</div>"
    )
    rows = []
    for row in d["layers"]:
        m = row.get("massive") or {}
        rows.append(
            [
                row["layer"],
                _fmt(row["sink0"]),
                _fmt(row["first_k"]),
                _fmt(row["hidden_sink_mass"]),
                _fmt(row["local"]),
                _fmt(row["entropy_norm"]),
                _fmt(row["hh_top10"]),
                len(row["dormant_heads"]),
                _fmt(m.get("max_abs")),
                ", ".join(str(x) for x in m.get("massive_dims", [])[:4]) or "–",
            ]
        )
    table = html_table(
        [
            "layer",
            "token 0",
            f"first {cfg['first_k']}",
            "hidden sinks",
            f"last {cfg['window']}",
            "entropy (norm.)",
            "top 10%",
            "dormant heads",
            "max |h|",
            "massive dims",
        ],
        rows,
    )
    intro = (
        f"Means over the heads of each layer and over the {d['input']['counted_queries']:,} queries at positions "
        f">= {d['input']['query_start']}. {d['heads_note']}."
    )
    return _section("summary", "Summary", grid + table, intro)


def _ranges(xs: Sequence[int]) -> list[str]:
    out: list[str] = []
    for x in sorted(xs):
        if out and out[-1].split("–")[-1] == str(x - 1):
            out[-1] = out[-1].split("–")[0] + f"–{x}"
        else:
            out.append(str(x))
    return out


def _heatmap_section(d: dict) -> str:
    figs = []
    for name, grid in d["head_stats"].items():
        prob = name in _PROBABILITY_STATS
        svg = heatmap(f"heat-{name}", SHORT_TITLES.get(name, name), grid, lo=0.0, hi=1.0 if prob else None)
        figs.append(_figure(f"heat-{name}", svg, STAT_TITLES.get(name, name)))
    intro = (
        "One cell per layer (rows) and query head (columns); hover a cell for its value. Probability-like "
        "statistics share the 0–1 scale; the others run from 0 to their maximum."
    )
    return _section("heatmaps", "Layer x head heatmaps", f'<div class="heatmaps">{"".join(figs)}</div>', intro)


def _maps_section(d: dict) -> str:
    maps = d["maps"]["heads"]
    if not maps:
        return ""
    figs = [
        _figure(
            f"map-{key}",
            attention_map(
                f"map-{key}",
                f"Attention map, layer {key.split('.')[0]} head {key.split('.')[1]}",
                grid,
                d["maps"]["n_tokens"],
            ),
        )
        for key, grid in maps.items()
    ]
    intro = (
        f"Attention pooled into {d['maps']['size']} x {d['maps']['size']} bins: a cell is the mean over the "
        "queries of its row bin of the attention mass they put on the keys of its column bin (log colour)."
    )
    return _section("maps", "Attention maps of chosen heads", f'<div class="maps">{"".join(figs)}</div>', intro)


def _massive_section(d: dict) -> str:
    layers = [row for row in d["layers"] if row.get("massive")]
    if not layers:
        return ""
    ratio = [row["massive"]["ratio"] for row in layers]
    chart = _figure(
        "massive-ratio",
        bars("massive-ratio", "Largest |activation| / median |activation|", ratio, y_label="ratio (log)"),
    )
    rows = []
    for row in layers:
        m = row["massive"]
        carriers = ", ".join(f"{c['position']} {c['token']!r}" for c in m.get("carrier_tokens", [])[:5])
        top = m["top"][0] if m["top"] else None
        rows.append(
            [
                row["layer"],
                _fmt(m["max_abs"], 4),
                _fmt(m["median_abs"]),
                _fmt(m["ratio"]),
                ", ".join(str(x) for x in m["massive_dims"][:6]) or "–",
                carriers or "–",
                f"pos {top['position']}, dim {top['dim']}" if top else "–",
            ]
        )
    cfg = d["config"]
    table = html_table(
        ["layer", "max |h|", "median |h|", "ratio", "massive dims", "carrier tokens", "largest at"], rows
    )
    intro = (
        f"Residual stream after each decoder layer. Massive activations (Sun et al. 2024): |h| >= "
        f"{cfg['massive_abs']:g} and >= {cfg['massive_ratio']:g} x the layer's median."
    )
    return _section("massive", "Massive activations", f'<div class="charts">{chart}</div>{table}', intro)


def _sinks_section(d: dict) -> str:
    rows = []
    for row in d["layers"]:
        for s in row["hidden_sinks"][:5]:
            rows.append(
                [
                    row["layer"],
                    s["position"],
                    repr(s["token"]),
                    ", ".join(map(str, s["heads"])),
                    _fmt(s["max_mean_attention"]),
                ]
            )
    cfg = d["config"]
    intro = (
        f"Tokens beyond position 0 whose mean attention, over the counted queries that see them (at least "
        f"{cfg['sink_min_seen']}), exceeds {cfg['sink_threshold']:g} in some head (ACT's rule); up to 5 per layer."
    )
    body = (
        html_table(["layer", "position", "token", "heads", "max mean attention"], rows)
        if rows
        else ('<p class="note">No hidden sinks found.</p>')
    )
    return _section("sinks", "Hidden sinks", body, intro)


def _retrieval_section(d: dict) -> str:
    r = d.get("retrieval")
    if not r:
        return ""
    flat = sorted(((v, i, j) for i, row in enumerate(r["scores"]) for j, v in enumerate(row)), reverse=True)[:12]
    rows = [[f"{i}.{j}", _fmt(v)] for v, i, j in flat]
    intro = (
        f"Copy-paste retrieval score (Wu et al. 2024) on {r['samples']} {r['task']} samples of {r['length']} "
        f"tokens; the model answered {r['accuracy']:.0%} of them correctly."
    )
    return _section("retrieval", "Retrieval heads", html_table(["layer.head", "score"], rows), intro)


def render(d: dict, command: str | None = None) -> str:
    """The page's HTML for a diagnosis dict (see :func:`kvsieve.diagnose.diagnose`)."""
    inp = d["input"]
    meta = [
        ("model", d["model"]),
        ("input", f"{inp['n_tokens']:,} tokens from {inp['source'] or 'input ids'}"),
        ("first tokens", " ".join(repr(t) for t in inp["first_tokens"])),
        ("heads", f"{d['n_layers']} layers x {d['n_heads']} query heads ({d['n_kv_heads']} KV heads)"),
        ("profiled in", f"{d['seconds']:.2f} s"),
    ]
    if command:
        meta.append(("command", command))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in meta)
    sections = [
        _summary_section(d),
        _heatmap_section(d),
        _maps_section(d),
        _sinks_section(d),
        _massive_section(d),
        _retrieval_section(d),
    ]
    labels = [
        ("summary", "Summary"),
        ("heatmaps", "Heatmaps"),
        ("maps", "Attention maps"),
        ("sinks", "Hidden sinks"),
        ("massive", "Massive activations"),
        ("retrieval", "Retrieval heads"),
    ]
    nav = (
        '<nav class="toc">'
        + "".join(
            f'<a href="#{sid}">{esc(label)}</a>' for (sid, label), sec in zip(labels, sections, strict=True) if sec
        )
        + "</nav>"
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"kvsieve diagnose — {d['model']}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}{EXTRA_CSS}</style></head>'
        f'<body><main><header><h1>kvsieve diagnose<span class="model">{esc(d["model"])}</span></h1>'
        f'<dl class="meta">{dl}</dl></header>{nav}{"".join(s for s in sections if s)}'
        f"<footer>Generated by kvsieve {esc(__version__)} on {esc(generated)}. This file is self-contained: it loads "
        "nothing from the network.</footer></main></body></html>\n"
    )


def write_report(d: dict, out_dir: str | Path, command: str | None = None) -> Path:
    """Write ``out_dir/diagnosis.html`` atomically and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / REPORT_FILE
    fd, tmp = tempfile.mkstemp(prefix=".diagnosis-", suffix=".html", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render(d, command))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
