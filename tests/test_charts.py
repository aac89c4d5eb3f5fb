"""The matplotlib chart module: inline SVG fit for a self-contained page, its data, tooltips, determinism."""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
from typing import Any

from kvsieve.charts import BarChart, Heatmap, Line, LineChart, colors_for, figure_html, overlap_note, render_svg


def spec_of(fig: str) -> dict[str, Any]:
    m = re.search(r'data-spec="([^"]*)"', fig)
    assert m is not None
    return json.loads(html.unescape(m.group(1)))


def line_chart(**kw: Any) -> LineChart:
    lines = [
        Line("full", [(0.0, 80.0)], ["full: 80"], reference=True),
        Line("snapkv", [(0.5, 60.0), (0.25, 70.0), (0.75, math.nan)], ["at 50%", "at 25%", "nan"], [(50, 70)] * 3),
        Line("empty", []),
    ]
    return LineChart("c1", "Scores", lines, x_label="compression", y_label="score", **kw)


def test_svg_is_inline_ready_and_url_free() -> None:
    fig = figure_html(line_chart(subtitle="see http://example.com"))
    assert fig.startswith('<figure class="chart" data-chart="c1" data-spec=')
    assert fig.count("<svg") == 1 and fig.endswith("</figure>")
    assert "://" not in fig  # no xmlns, DOCTYPE or RDF metadata URL, and data text has its scheme broken
    assert "<?xml" not in fig and "<!DOCTYPE" not in fig and "<metadata" not in fig and "<script" not in fig
    assert "<style" not in fig  # matplotlib's global `*{...}` rule would leak into the page
    ids = re.findall(r'\bid="([^"]+)"', fig)
    assert ids and all(i.startswith("c1--") for i in ids)  # prefixed: charts can share a page
    refs = re.findall(r'(?:href="#|url\(#)([^")]+)', fig)
    assert refs and set(refs) <= set(ids)  # every internal reference resolves
    assert "example.com" in fig  # the text itself stays


def test_line_chart_data_drops_non_finite_points_and_sorts() -> None:
    spec = spec_of(figure_html(line_chart()))
    assert spec["kind"] == "line"
    assert list(spec["series"]) == ["full", "snapkv"]  # the empty series is left out
    assert spec["series"]["snapkv"] == {"points": [[0.25, 70.0], [0.5, 60.0]], "intervals": [[50, 70], [50, 70]],
                                        "reference": False}  # fmt: skip
    assert spec["series"]["full"]["reference"]


def test_tooltips_follow_the_points() -> None:
    svg = render_svg(line_chart())
    titles = re.findall(r"<title>([^<]*)</title>", svg)
    assert titles == ["full: 80", "snapkv", "at 25%", "at 50%"]  # group title, then one per point in x order


def test_rendering_is_deterministic() -> None:
    assert figure_html(line_chart()) == figure_html(line_chart())


def test_heatmap_cells_and_missing_values() -> None:
    grid = [[0.1, None, 0.5], [math.nan, 0.9, 1.0]]
    fig = figure_html(Heatmap("h", "Heat", grid, lambda i, j, v: f"r{i} c{j}: {v}", lo=0.0, hi=1.0))
    assert spec_of(fig)["grid"] == [[0.1, None, 0.5], [None, 0.9, 1.0]]  # NaN is null in JSON
    assert re.findall(r"<title>([^<]*)</title>", fig) == [
        "r0 c0: 0.1", "r0 c1: None", "r0 c2: 0.5", "r1 c0: nan", "r1 c1: 0.9", "r1 c2: 1.0",
    ]  # fmt: skip
    log = figure_html(Heatmap("m", "Map", [[0.5, 0.0], [0.25, 0.25]], lambda i, j, v: f"{v}", log=True))
    assert spec_of(log)["log"] and "$" not in log  # log colour bar labelled without mathtext


def test_bar_chart() -> None:
    fig = figure_html(
        BarChart(
            "b",
            "Speed",
            ["snapkv", "h2o"],
            {"prefill": [1.5, None], "decode": [0.5, 0.8]},
            y_label="x",
            tips={"prefill": ["p snapkv", "p h2o"]},
            ref=1.0,
            ref_label="full = 1×",
        )
    )
    assert spec_of(fig)["series"] == {"prefill": [1.5, None], "decode": [0.5, 0.8]}
    titles = re.findall(r"<title>([^<]*)</title>", fig)
    assert titles == ["p snapkv", "snapkv: 0.5", "h2o: 0.8", "full = 1×"]  # the missing bar has none
    assert "$" not in figure_html(BarChart("l", "Log", ["0", "1"], {"r": [5.0, 6.3]}, log_y=True))


def test_dollar_signs_are_text_not_math() -> None:
    fig = figure_html(LineChart("d", "$cost$ of $x$", [Line("a$b$", [(0, 1)])]))
    assert "$cost$ of $x$" in fig and "a$b$" in fig


def test_colors_and_overlaps() -> None:
    colors = colors_for(["full", *[f"m{i}" for i in range(12)]], baseline="full")
    assert colors["full"] == ("#3a3a3a", "--")
    assert colors["m0"][1] == "-" and colors["m10"] == (colors["m0"][0], "--")  # palette wraps: new dash
    same = [Line("a", [(0, 1), (1, 2)]), Line("b", [(1, 2), (0, 1)]), Line("c", [(0, 1)])]
    assert overlap_note(same) == "Overlapping lines (identical values): a = b."
    assert overlap_note(same[:1]) is None


def test_charts_change_nothing_global() -> None:
    """Drawing charts leaves matplotlib's global state alone: no pyplot, no backend chosen, rcParams unchanged."""
    code = (
        "import sys, matplotlib as mpl\n"
        "before = mpl.rcParams.copy()\n"
        "from kvsieve.charts import LineChart, Line, figure_html\n"
        "figure_html(LineChart('x', 't', [Line('a', [(0, 1), (1, 2)])]))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "raw = lambda rc: {k: repr(dict.__getitem__(rc, k)) for k in rc}  # raw values: reading 'backend' resolves it\n"
        "changed = [k for k, v in raw(mpl.rcParams).items() if raw(before)[k] != v]\n"
        "assert not changed, changed\n"
        "import kvsieve, kvsieve.bench.report\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_the_report_does_not_import_matplotlib() -> None:
    code = "import sys, kvsieve.bench.report, kvsieve.diagnose.report\nassert 'matplotlib' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_large_heatmaps_are_one_image() -> None:
    grid = [[(i + 1) * (j + 1) / 4096 if j <= i else 0.0 for j in range(64)] for i in range(64)]  # 4,096 cells
    fig = figure_html(Heatmap("map", "Map", grid, lambda i, j, v: "never shown", log=True))
    assert fig.count("<image") == 2 and 'href="data:image/png;base64,' in fig  # the map and its colour bar
    assert "never shown" not in fig and len(fig) < 200_000  # not a shape (and tooltip) per cell
    assert spec_of(fig)["grid"][63][63] == 1.0  # the values themselves stay readable


def test_a_users_matplotlib_settings_change_no_chart() -> None:
    code = (
        "import matplotlib as mpl\n"
        "mpl.rcParams.update({'figure.facecolor': 'yellow', 'xtick.labelsize': 20, 'axes.labelcolor': 'red'})\n"
        "from kvsieve.charts import LineChart, Line, figure_html\n"
        "print(figure_html(LineChart('x', 't', [Line('a', [(0, 1), (1, 2)])])), end='')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == figure_html(LineChart("x", "t", [Line("a", [(0, 1), (1, 2)])]))
