"""The explanation as one self-contained HTML page: tokens shaded by importance, per target token, methods side by
side; the faithfulness table and charts when measured.

Like the other kvsieve pages (:mod:`kvsieve.bench.report`, whose CSS and escaping it reuses) the page loads nothing
and runs no script: CSS inline, charts inline SVG (:mod:`kvsieve.charts`), one ``<details>`` per target token (the
first open). Each token is a ``<span class="tok" data-score="...">`` whose background opacity is its score divided by
the largest score of that method for that target token; hovering shows the score.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from kvsieve import __version__
from kvsieve.bench.report import CSS, esc, html_table

from .attribution import ATTRIBUTIONS, METHOD_PREFIX

EXTRA_CSS = """
.methods{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px;margin:.6rem 0 1rem}
.method{border:1px solid var(--border);border-radius:10px;padding:.5rem .7rem;background:#fff;min-width:0}
.method h4{margin:.1rem 0 .4rem;color:var(--fg)}
.tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.8rem;
 white-space:pre-wrap;overflow-wrap:anywhere;line-height:1.65}
.tok{border-radius:3px;padding:0 1px}
.tok.target{outline:2px solid #d1242f;outline-offset:0;background:#fff}
.tok.prev{color:var(--muted)}
details.step{border:1px solid var(--border);border-radius:10px;margin:.5rem 0;padding:.3rem .8rem;
 background:var(--soft)}
details.step summary{cursor:pointer;font-weight:600}
.legend{font-size:.85rem;color:var(--muted)}
.swatch{display:inline-block;width:70px;height:10px;border-radius:3px;vertical-align:middle;
 background:linear-gradient(90deg,rgba(9,105,218,0),rgba(9,105,218,1))}
"""
MAX_TOKENS_SHOWN = 4000  # a longer context is shown from its end (the page stays light)


def _label(token: str) -> str:
    return token.replace("\n", "↵\n").replace("\t", "→\t")


def _token_spans(tokens: list[str], scores: list[float], n_prompt: int, step: int) -> str:
    finite = [v for v in scores if math.isfinite(v)]
    top = max((abs(v) for v in finite), default=0.0) or 1.0
    start = max(0, len(scores) - MAX_TOKENS_SHOWN)
    parts = ['<span class="tok prev">…</span>'] if start else []
    for i in range(start, len(scores)):
        v = scores[i]
        alpha = 0.0 if not math.isfinite(v) else max(0.0, v) / top
        cls = "tok prev" if i >= n_prompt else "tok"
        parts.append(
            f'<span class="{cls}" style="background:rgba(9,105,218,{alpha:.3f})" data-score="{v:.6g}" '
            f'title="{esc(repr(tokens[i]))}: {v:.4g}">{esc(_label(tokens[i]))}</span>'
        )
    target = tokens[n_prompt + step]
    parts.append(f'<span class="tok target" title="target token {step}">{esc(_label(target))}</span>')
    return "".join(parts)


def _describe(name: str) -> str:
    if name.startswith(METHOD_PREFIX):
        return f"eviction scores of kvsieve's {name[len(METHOD_PREFIX) :]} (rank percentiles, averaged)"
    info = ATTRIBUTIONS.get(name)
    return info.summary if info else name


def _steps_section(d: dict[str, Any]) -> str:
    tokens, n_prompt = d["tokens"], d["n_prompt"]
    blocks = []
    n_steps = len(tokens) - n_prompt
    for t in range(n_steps):
        cols = []
        for name in d["methods"]:
            row = d["scores"][name][t]
            cols.append(
                f'<div class="method" data-method="{esc(name)}"><h4>{esc(name)}</h4>'
                f'<div class="tokens">{_token_spans(tokens, row, n_prompt, t)}</div></div>'
            )
        prob = d["target_probs"][t]
        summary = f"target token {t + 1} of {n_steps}: {tokens[n_prompt + t]!r} (p = {prob:.3g})"
        blocks.append(
            f'<details class="step" data-step="{t}"{" open" if t == 0 else ""}><summary>{esc(summary)}</summary>'
            f'<div class="methods">{"".join(cols)}</div></details>'
        )
    intro = (
        "Each box is one method; a token's shade is its score over the largest score of that method for that target "
        "token (hover for the value). Grey tokens are earlier target tokens; the red outline is the token explained."
    )
    legend = '<p class="legend">low <span class="swatch"></span> high</p>'
    return f'<section id="tokens"><h2>Attributions per target token</h2><p class="intro">{esc(intro)}</p>{legend}' + (
        "".join(blocks) + "</section>"
    )


def faithfulness_section(f: dict[str, Any] | None, n_examples: int | None = None) -> str:
    """The faithfulness table and one bar chart per metric (shared with benchmarks/faithfulness.py's page)."""
    if not f:
        return ""
    from kvsieve.charts import BarChart, figure_html

    shares = [f"{s:g}" for s in f["shares"]]
    names = list(f["methods"])
    headers = ["method"] + [f"comp. {float(s):.0%}" for s in shares] + [f"suff. {float(s):.0%}" for s in shares]
    rows = []
    for name in names:
        m = f["methods"][name]
        rows.append(
            [name]
            + [f"{m['comprehensiveness'][s]:.4f}" for s in shares]
            + [f"{m['sufficiency'][s]:.4f}" for s in shares]
        )
    charts = []
    for metric, better in (("comprehensiveness", "higher is better"), ("sufficiency", "lower is better")):
        series = {f"{float(s):.0%}": [f["methods"][n][metric][s] for n in names] for s in shares}
        charts.append(
            figure_html(
                BarChart(
                    f"faith-{metric}",
                    metric.capitalize(),
                    names,
                    series,
                    tips={
                        k: [f"{n}, {k} of the prompt: {v:.4f}" for n, v in zip(names, vals, strict=True)]
                        for k, vals in series.items()
                    },
                    subtitle=f"drop in p(target) ({better})",
                    x_label="method",
                    y_label="p(full) - p(perturbed)",
                    size=(6.4, 3.4),
                )
            )
        )
    where = f" over {n_examples} examples" if n_examples else ""
    intro = (
        f"Comprehensiveness: how much p(target) falls when the method's top-k% prompt tokens are deleted (higher is "
        f"better). Sufficiency: how much it falls when only they are kept (lower is better). Mean over target "
        f"tokens{where}; mean p(target) with the whole prompt: {f['p_full']:.4f}. 'random' is the seeded baseline."
    )
    return (
        f'<section id="faithfulness"><h2>Faithfulness</h2><p class="intro">{esc(intro)}</p>'
        f'{html_table(headers, rows, cls="faith")}<div class="charts">{"".join(charts)}</div></section>'
    )


def _methods_section(d: dict[str, Any]) -> str:
    rows = []
    for name in d["methods"]:
        info = d["info"].get(name, {})
        rows.append([name, _describe(name), f"{info.get('seconds', float('nan')):.2f} s"])
    table = html_table(["method", "what", "time"], rows, align="llr")
    return f'<section id="methods"><h2>Methods</h2>{table}</section>'


def page(title: str, subtitle: str, meta: list[tuple[str, str]], sections: list[tuple[str, str, str]]) -> str:
    """A kvsieve page: header, table of contents and ``(id, label, html)`` sections (empty ones left out)."""
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in meta)
    shown = [(sid, label, body) for sid, label, body in sections if body]
    nav = '<nav class="toc">' + "".join(f'<a href="#{sid}">{esc(label)}</a>' for sid, label, _ in shown) + "</nav>"
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{esc(title)} — {esc(subtitle)}</title>'
        f"<style>{CSS}{EXTRA_CSS}</style></head>"
        f'<body><main><header><h1>{esc(title)}<span class="model">{esc(subtitle)}</span></h1>'
        f'<dl class="meta">{dl}</dl></header>{nav}{"".join(body for _, _, body in shown)}'
        f"<footer>Generated by kvsieve {esc(__version__)} on {esc(generated)}. This file is self-contained: it loads "
        "nothing from the network.</footer></main></body></html>\n"
    )


def render(d: dict[str, Any]) -> str:
    """The page's HTML for an explanation dict (:meth:`kvsieve.explain.Explanation.to_dict`)."""
    n_prompt = d["n_prompt"]
    meta = [
        ("model", d["model"]),
        ("prompt", f"{n_prompt:,} tokens"),
        ("target", f"{d['target']!r} ({len(d['tokens']) - n_prompt} tokens, "
                   f"{'generated greedily' if d['target_generated'] else 'given'})"),
        ("methods", ", ".join(d["methods"])),
    ]  # fmt: skip
    if d.get("command"):
        meta.append(("command", d["command"]))
    sections = [
        ("tokens", "Attributions", _steps_section(d)),
        ("faithfulness", "Faithfulness", faithfulness_section(d.get("faithfulness"))),
        ("methods", "Methods", _methods_section(d)),
    ]
    return page("kvsieve explain", d["model"], meta, sections)
