"""The diagnosis as one self-contained HTML page: layer x head heatmaps, attention maps, sinks and outliers.

Like the benchmark report (:mod:`kvsieve.bench.report`, whose CSS and escaping it reuses), the page loads nothing from
anywhere: CSS inline, every chart an inline SVG drawn by matplotlib (:mod:`kvsieve.charts`). Each chart is a
``<figure class="chart" data-chart="ID" data-spec="JSON">`` holding one ``<svg>``; ``data-spec`` holds the plotted
grid or bars, and every heatmap cell and bar has a ``<title>`` tooltip.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kvsieve import __version__
from kvsieve.bench.report import CSS, esc, html_table
from kvsieve.charts import BarChart, Heatmap, figure_html

from .diagnosis import STAT_TITLES

REPORT_FILE = "diagnosis.html"
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
figure.chart g[id$="--cells"] path:hover{stroke:#d1242f;stroke-width:1.5}
.summary-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px;margin:.6rem 0 1rem}
.stat{border:1px solid var(--border);border-radius:10px;padding:.55rem .8rem;background:var(--soft)}
.stat b{display:block;font-size:1.25rem}
.stat span{color:var(--muted);font-size:.85rem}
"""


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def _value(v: float | None) -> str:
    return "not profiled" if v is None or not math.isfinite(v) else f"{v:.3g}"


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
        size = (3.4, min(6.5, 1.4 + 0.15 * len(grid)))
        figs.append(
            figure_html(
                Heatmap(
                    f"heat-{name}",
                    SHORT_TITLES.get(name, name),
                    grid,
                    lambda i, j, v: f"layer {i}, head {j}: {_value(v)}",
                    lo=0.0,
                    hi=1.0 if name in _PROBABILITY_STATS else None,
                    x_label="head",
                    y_label="layer",
                    caption=STAT_TITLES.get(name, name),
                    size=size,
                )
            )
        )
    intro = (
        "One cell per layer (rows) and query head (columns); hover a cell for its value. Probability-like "
        "statistics share the 0–1 scale; the others run from 0 to their maximum."
    )
    return _section("heatmaps", "Layer x head heatmaps", f'<div class="heatmaps">{"".join(figs)}</div>', intro)


def _maps_section(d: dict) -> str:
    maps, n = d["maps"]["heads"], d["maps"]["n_tokens"]
    if not maps:
        return ""
    figs = []
    for key, grid in maps.items():
        per = n / max(len(grid), 1)
        layer, head = key.split(".")
        figs.append(
            figure_html(
                Heatmap(
                    f"map-{key}",
                    f"Attention map, layer {layer} head {head}",
                    grid,
                    lambda i, j, v, per=per: (
                        f"queries {i * per:.0f}-{(i + 1) * per:.0f} → keys {j * per:.0f}-"
                        f"{(j + 1) * per:.0f}: {_value(v)}"
                    ),
                    log=True,
                    x_label=f"key bin ({per:.3g} tokens each)",
                    y_label="query bin",
                    size=(3.8, 3.6),
                )
            )
        )
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
    chart = figure_html(
        BarChart(
            "massive-ratio",
            "Largest |activation| / median |activation|",
            [str(row["layer"]) for row in layers],
            {"ratio": ratio},
            tips={"ratio": [f"layer {row['layer']}: {_fmt(v, 4)}" for row, v in zip(layers, ratio, strict=True)]},
            log_y=True,
            x_label="layer",
            y_label="ratio (log)",
        )
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
