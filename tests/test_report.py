"""Summary numbers and the self-contained HTML report, on a small synthetic run (no model, no browser)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kvsieve.bench.report import esc, line_chart, linear_ticks, log_ticks, write_report
from kvsieve.bench.summary import (
    best_method_per_budget,
    load_rows,
    mean_scores,
    mean_scores_by_task,
    memory_table,
    rich_summary_table,
    speed_table,
)

MODES = ("agnostic", "aware")
TASKS = ("niah", "qa")
METHODS = ("snapkv", "pyramidkv", "adakv:snapkv")
COMPRESSIONS = (0.25, 0.5, 0.75)
# Each sample s runs at LENGTHS[s] with CONTEXT[s] real tokens (multiples of 4, so (1 - c) * ctx is exact).
LENGTHS = (1024, 2048)
CONTEXT = (1016, 2040)
BYTES_PER_TOKEN = 1000
ADAKV_OVERHEAD = 8000  # bytes adakv holds on top of its budget (per-head bookkeeping, say)

# SCORES[mode][method][compression] = (niah s0, niah s1, qa s0, qa s1); binary fractions keep means exact.
SCORES: dict[str, dict[str, dict[float, tuple[float, float, float, float]]]] = {
    "agnostic": {
        "full": {0.0: (1, 1, 1, 0.5)},
        "snapkv": {0.25: (1, 1, 1, 0), 0.5: (1, 0.5, 0.5, 0), 0.75: (0.5, 0, 0.5, 0)},
        "pyramidkv": {0.25: (1, 0.5, 0.5, 0.5), 0.5: (1, 1, 0.5, 0.5), 0.75: (0.5, 0.5, 0, 0)},
        "adakv:snapkv": {0.25: (1, 1, 1, 0.5), 0.5: (1, 0.5, 0.5, 0.5), 0.75: (1, 0.5, 0.5, 0)},
    },
    "aware": {
        "full": {0.0: (1, 1, 1, 1)},
        "snapkv": {0.25: (1, 1, 1, 1), 0.5: (1, 1, 1, 0.5), 0.75: (1, 1, 0.5, 0.5)},
        "pyramidkv": {0.25: (1, 1, 1, 0.5), 0.5: (1, 1, 0.5, 0.5), 0.75: (1, 0.5, 0.5, 0.5)},
        "adakv:snapkv": {0.25: (1, 1, 1, 1), 0.5: (1, 1, 1, 1), 0.75: (1, 1, 1, 0.5)},
    },
}
# Prefill seconds for sample 0; sample 1 takes 1.5× as long. Decode is constant per method.
PREFILL = {"full": 2.0, "snapkv": 2.5, "pyramidkv": 3.0, "adakv:snapkv": 3.5}
DECODE = {"full": 1 / 32, "snapkv": 1 / 64, "pyramidkv": 3 / 128, "adakv:snapkv": 5 / 256}

# 6 score charts (all + 2 tasks, per mode), 3 memory-vs-context charts, speed, streaming.
CHARTS_BASE = 11
CHARTS_WITH_MEMORY = CHARTS_BASE + 2  # + measured KV and peak RSS from memory.jsonl

URL_PREDICTION = "see https://example.com and http://x.y <script>alert(1)</script>"


def synthetic_rows() -> list[dict[str, Any]]:
    """Rows for full + 3 methods × 3 compressions × 2 tasks × 2 modes × 2 samples."""
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        for method, by_comp in SCORES[mode].items():
            for comp, scores in by_comp.items():
                for ti, task in enumerate(TASKS):
                    for sample in (0, 1):
                        ctx = CONTEXT[sample]
                        kept = int(ctx * (1 - comp))
                        shared = mode == "agnostic" and method != "full"
                        prefill = 0.01 if shared else PREFILL[method] * (1.5 if sample else 1.0)
                        score = float(scores[2 * ti + sample])
                        rows.append(
                            {
                                "run_id": "run-1",
                                "model": "SmolLM2-135M",
                                "method": method,
                                "method_params": {"window": 32} if method != "full" else {},
                                "compression": comp,
                                "budget_tokens": kept if method != "full" else None,
                                "task": task,
                                "length": LENGTHS[sample],
                                "context_tokens": ctx,
                                "depth": 0.5 if task == "niah" else None,
                                "mode": mode,
                                "sample": sample,
                                "seed": 0,
                                "score": score,
                                "prediction": URL_PREDICTION if score == 0 else "the answer",
                                "answers": ["the answer"],
                                "kv_tokens": float(kept),
                                "kv_bytes": kept * BYTES_PER_TOKEN
                                + (ADAKV_OVERHEAD if method == "adakv:snapkv" else 0),
                                "kv_bytes_full": ctx * BYTES_PER_TOKEN,
                                "prefill_seconds": prefill,
                                "decode_seconds_per_token": DECODE[method],
                                "shared_prefill": shared,
                                "versions": {"kvsieve": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0"},
                                "timestamp": "2025-06-01T12:00:00Z",
                            }
                        )
    return rows


def streaming_rows() -> list[dict[str, Any]]:
    """Full fails past a 3k window (ppl explodes, then is infinite); snapkv on 512 tokens stays flat."""
    full = [10.0, 11.0, 12.0, 200.0, 900.0, math.inf]
    snap = [10.5, 11.0, 11.5, 12.0, 12.0, 12.5]
    out: list[dict[str, Any]] = []
    for method, budget, ppls in (("full", None, full), ("snapkv", 512, snap)):
        for i, ppl in enumerate(ppls):
            out.append(
                {
                    "method": method,
                    "budget": budget,
                    "bucket_start": i * 1000,
                    "bucket_end": (i + 1) * 1000,
                    "nll": math.log(ppl),
                    "ppl": ppl,
                    "kv_tokens": (i + 1) * 1000 if budget is None else 512,
                }
            )
    return out


def memory_rows() -> list[dict[str, Any]]:
    """A memory.jsonl: two methods, the second in two variants, at three context lengths."""
    out: list[dict[str, Any]] = []
    for ctx in (1024, 4096, 16384):
        out.append(
            {"method": "full", "variant": None, "context_tokens": ctx, "kv_bytes": ctx * 9216,
             "peak_rss_bytes": 600_000_000 + ctx * 9216}
        )  # fmt: skip
        for variant, keep in (("dense", 0.5), ("paged", 0.25)):
            out.append(
                {"method": "snapkv", "variant": variant, "context_tokens": ctx,
                 "kv_bytes": int(ctx * keep) * 9216, "peak_rss_bytes": 600_000_000 + int(ctx * keep) * 9216}
            )  # fmt: skip
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_run_dir(root: Path, *, with_memory: bool = False) -> Path:
    """A run directory with results.jsonl, config.json, streaming.jsonl (and memory.jsonl if asked)."""
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "results.jsonl", synthetic_rows())
    write_jsonl(root / "streaming.jsonl", streaming_rows())
    if with_memory:
        write_jsonl(root / "memory.jsonl", memory_rows())
    config = {
        "model": "SmolLM2-135M",
        "tasks": list(TASKS),
        "methods": ["full", *METHODS],
        "compressions": list(COMPRESSIONS),
        "lengths": list(LENGTHS),
        "samples": 2,
        "mode": "both",
        "seed": 0,
        "command": ["kvsieve", "bench", "--methods", "snapkv,pyramidkv,adakv:snapkv", "--out", "bench-out"],
        "machine": {"cpu": "test cpu", "gpu": None, "docs": "https://example.org/not-a-link"},
    }
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def chart_ids(page: str) -> list[str]:
    """The data-chart ids of the report's chart figures, in page order."""
    return re.findall(r'<figure class="chart" data-chart="([^"]+)"', page)


# ============================================================================================ summary
@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return synthetic_rows()


def test_row_count(rows: list[dict[str, Any]]) -> None:
    # (full + 3 methods × 3 compressions) × 2 tasks × 2 modes × 2 samples
    assert len(rows) == (1 + 3 * 3) * 2 * 2 * 2


def test_mean_scores_exact(rows: list[dict[str, Any]]) -> None:
    ms = mean_scores(rows)
    assert ms[("agnostic", "full", 0.0)] == (0.875, 4)
    assert ms[("aware", "full", 0.0)] == (1.0, 4)
    assert ms[("agnostic", "snapkv", 0.25)] == (0.75, 4)
    assert ms[("agnostic", "snapkv", 0.75)] == (0.25, 4)
    assert ms[("agnostic", "pyramidkv", 0.5)] == (0.75, 4)
    assert ms[("agnostic", "adakv:snapkv", 0.75)] == (0.5, 4)
    assert ms[("aware", "pyramidkv", 0.75)] == (0.625, 4)
    assert len(ms) == 2 * (1 + 3 * 3)


def test_mean_scores_by_task_exact(rows: list[dict[str, Any]]) -> None:
    bt = mean_scores_by_task(rows)
    assert bt[("niah", "agnostic", "snapkv", 0.5)] == (0.75, 2)
    assert bt[("qa", "agnostic", "snapkv", 0.5)] == (0.25, 2)
    assert bt[("qa", "agnostic", "full", 0.0)] == (0.75, 2)
    assert bt[("qa", "aware", "adakv:snapkv", 0.75)] == (0.75, 2)


def test_best_method_per_budget(rows: list[dict[str, Any]]) -> None:
    best = {(b.mode, b.compression): b for b in best_method_per_budget(rows)}
    assert len(best) == 6
    b = best[("agnostic", 0.25)]
    assert (b.method, b.score, b.full_score, b.runner_up, b.runner_up_score) == (
        "adakv:snapkv", 0.875, 0.875, "snapkv", 0.75,
    )  # fmt: skip
    assert b.delta_vs_full == 0.0
    b = best[("agnostic", 0.5)]
    assert (b.method, b.score, b.runner_up) == ("pyramidkv", 0.75, "adakv:snapkv")
    assert b.delta_vs_full == pytest.approx(-0.125)
    # snapkv and pyramidkv tie at 0.25 for second place: the name that sorts first wins.
    b = best[("agnostic", 0.75)]
    assert (b.method, b.score, b.runner_up, b.runner_up_score) == ("adakv:snapkv", 0.5, "pyramidkv", 0.25)
    # A tie for first place (adakv:snapkv and snapkv both 1.0) also goes to the first name.
    b = best[("aware", 0.25)]
    assert (b.method, b.score, b.full_score, b.runner_up) == ("adakv:snapkv", 1.0, 1.0, "snapkv")
    assert best[("aware", 0.75)].method == "adakv:snapkv"
    assert best[("aware", 0.75)].score == 0.875


def test_best_method_borrows_full_from_other_mode(rows: list[dict[str, Any]]) -> None:
    no_aware_full = [r for r in rows if not (r["mode"] == "aware" and r["method"] == "full")]
    best = {(b.mode, b.compression): b for b in best_method_per_budget(no_aware_full)}
    assert best[("aware", 0.5)].full_score == 0.875


def test_speed_table(rows: list[dict[str, Any]]) -> None:
    speed = {s.method: s for s in speed_table(rows)}
    assert list(speed) == ["full", "snapkv", "pyramidkv", "adakv:snapkv"]
    full = speed["full"]
    assert (full.prefill_seconds, full.decode_seconds_per_token) == (2.5, 1 / 32)
    assert (full.prefill_ratio, full.decode_ratio) == (1.0, 1.0)
    snap = speed["snapkv"]
    # shared (agnostic) prefills are left out: median of 2.5 and 3.75 → 3.125
    assert snap.prefill_seconds == 3.125
    assert snap.prefill_ratio == 1.25
    assert snap.decode_ratio == 0.5
    assert not snap.prefill_shared
    assert speed["pyramidkv"].decode_ratio == 0.75
    assert speed["adakv:snapkv"].prefill_ratio == 1.75
    assert speed["adakv:snapkv"].decode_ratio == 0.625


def test_speed_table_only_shared_prefills(rows: list[dict[str, Any]]) -> None:
    agn = [r for r in rows if r["mode"] == "agnostic"]
    snap = next(s for s in speed_table(agn) if s.method == "snapkv")
    assert snap.prefill_shared
    assert snap.prefill_seconds == 0.01


def test_memory_table(rows: list[dict[str, Any]]) -> None:
    mem = {(m.method, m.compression): m for m in memory_table(rows)}
    assert len(mem) == 1 + 3 * 3
    full = mem[("full", 0.0)]
    assert full.kv_bytes == 1_528_000.0
    assert full.ratio == 1.0
    snap = mem[("snapkv", 0.5)]
    assert (snap.kv_bytes, snap.kv_bytes_full, snap.kv_tokens) == (764_000.0, 1_528_000.0, 764.0)
    assert snap.ratio == 0.5
    assert mem[("snapkv", 0.75)].ratio == 0.25
    ada = mem[("adakv:snapkv", 0.5)]
    assert ada.kv_bytes == 772_000.0
    assert ada.ratio == pytest.approx(772_000 / 1_528_000, rel=1e-15)


def test_rich_summary_table(rows: list[dict[str, Any]]) -> None:
    console = Console(width=120, record=True, color_system=None)
    console.print(rich_summary_table(rows, "agnostic"))
    text = console.export_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert "0%" in text and "25%" in text and "75%" in text
    full_line = next(ln for ln in lines if " full " in ln)
    snap_line = next(ln for ln in lines if " snapkv " in ln)
    assert "87.5" in full_line
    assert re.findall(r"\d+\.\d", snap_line) == ["75.0", "50.0", "25.0"]
    # full comes first among the method rows
    assert lines.index(full_line) < lines.index(snap_line)


def test_empty_inputs(tmp_path: Path) -> None:
    assert load_rows(tmp_path) == []
    assert mean_scores([]) == {}
    assert mean_scores_by_task([]) == {}
    assert best_method_per_budget([]) == []
    assert speed_table([]) == []
    assert memory_table([]) == []
    console = Console(width=80, record=True, color_system=None)
    console.print(rich_summary_table([], "aware"))
    assert "no results" in console.export_text()


def test_load_rows_skips_truncated_line(tmp_path: Path) -> None:
    text = '{"method": "full", "score": 1.0}\n\n{"method": "snap'
    (tmp_path / "results.jsonl").write_text(text, encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 1 line"):
        got = load_rows(tmp_path)
    assert got == [{"method": "full", "score": 1.0}]


# ============================================================================================ report
@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = make_run_dir(tmp_path_factory.mktemp("run"))
    path = write_report(out)
    assert path == out / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained(report: str) -> None:
    assert report.startswith("<!DOCTYPE html>")
    assert "http://" not in report
    assert "https://" not in report
    assert "<script" not in report.lower()  # the prediction's <script> is escaped, and we ship none
    assert "&lt;script&gt;" in report
    assert not re.search(r"""\b(?:src|href)\s*=\s*["'](?!#|data:)""", report)
    assert "@import" not in report and "url(" not in report


def test_report_charts(report: str) -> None:
    ids = chart_ids(report)
    assert len(ids) == len(set(ids)) == CHARTS_BASE
    for mode in MODES:
        assert f"score-{mode}-all" in ids
        for task in TASKS:
            assert f"score-{mode}-task-{task}" in ids
    assert {"speed", "streaming"} <= set(ids)
    assert sum(i.startswith("memory-context-") for i in ids) == 3
    # every chart holds one svg with data marks
    figures = re.findall(r'<figure class="chart".*?</figure>', report, flags=re.S)
    assert len(figures) == CHARTS_BASE
    for fig in figures:
        assert fig.count("<svg") == 1
        assert re.search(r'<(?:polyline|path|rect) class="(?:series|bar)', fig), fig[:200]


def test_report_score_chart_content(report: str) -> None:
    fig = re.search(r'<figure class="chart" data-chart="score-agnostic-task-qa".*?</figure>', report, re.S)
    assert fig is not None
    svg = fig.group(0)
    # 3 method polylines + the full reference line, and 3 × 3 + 1 points with tooltips
    assert svg.count('<polyline class="series"') == 4
    assert svg.count('class="series reference"') == 1
    assert svg.count('<circle class="point"') == 10
    assert "snapkv @ 50%: 25.0 (n = 2) — qa" in svg


def test_report_streaming_uses_log_scale(report: str) -> None:
    fig = re.search(r'<figure class="chart" data-chart="streaming".*?</figure>', report, re.S)
    assert fig is not None
    assert "log scale" in fig.group(0)
    assert "1 bucket(s) with a non-finite perplexity left out" in fig.group(0)


def test_report_tables(report: str) -> None:
    best = re.search(r'<table class="best">.*?</table>', report, re.S)
    assert best is not None
    cells = re.findall(r"<tr>(.*?)</tr>", best.group(0), re.S)[1:]
    picks = [re.findall(r"<td[^>]*>(.*?)</td>", c)[:3] for c in cells]
    assert picks[1] == ["Query-agnostic", "50%", "<strong>pyramidkv</strong>"]
    assert [p[2] for p in picks] == ["<strong>adakv:snapkv</strong>", "<strong>pyramidkv</strong>"] + [
        "<strong>adakv:snapkv</strong>"
    ] * 4
    # summary table: score ×100 with one decimal, n in the title
    assert 'title="n = 4">87.5</span>' in report
    # header and configuration
    assert "SmolLM2-135M" in report
    assert "kvsieve bench --methods snapkv,pyramidkv,adakv:snapkv --out bench-out" in report
    assert "machine.cpu" in report
    assert "transformers 5.0.0" in report
    assert "<details><summary>Show 80 rows</summary>" in report


def test_report_with_memory_file(tmp_path: Path) -> None:
    page = write_report(make_run_dir(tmp_path, with_memory=True)).read_text(encoding="utf-8")
    ids = chart_ids(page)
    assert len(ids) == CHARTS_WITH_MEMORY
    assert {"memory-measured-kv", "memory-measured-rss"} <= set(ids)
    assert "snapkv · paged" in page


def test_report_empty_results(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text("", encoding="utf-8")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No results." in page
    assert chart_ids(page) == []
    assert "http://" not in page and "https://" not in page


def test_report_missing_directory_and_only_streaming(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    page = write_report(out).read_text(encoding="utf-8")
    assert "No results." in page
    write_jsonl(out / "streaming.jsonl", streaming_rows())
    page = write_report(out).read_text(encoding="utf-8")
    assert "No results." in page
    assert chart_ids(page) == ["streaming"]


# ============================================================================================ helpers
def test_esc_breaks_urls_and_markup() -> None:
    assert esc('<a href="https://x">') == "&lt;a href=&quot;https:&#47;&#47;x&quot;&gt;"


def test_ticks() -> None:
    assert linear_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert linear_ticks(3, 3) == [2.6, 2.8, 3.0, 3.2, 3.4]
    assert log_ticks(10, 3000) == [10, 100, 1000, 10000]
    assert log_ticks(3, 40) == [1, 2, 5, 10, 20, 50, 100]


def test_line_chart_drops_non_finite() -> None:
    from kvsieve.bench.report import Series

    svg = line_chart(
        "t",
        "t",
        [Series("a", "#000", [(0, 1, "p"), (1, math.nan, "q"), (math.inf, 2, "r")]), Series("b", "#111", [])],
        x_label="x",
        y_label="y",
    )
    assert svg.count('<circle class="point"') == 1
    assert 'data-series="b"' not in svg


def test_overlapping_lines_are_named(report: str) -> None:
    fig = re.search(r'<figure class="chart" data-chart="memory-context-50pct".*?</figure>', report, re.S)
    assert fig is not None
    assert "<figcaption>Overlapping lines (identical values): snapkv = pyramidkv.</figcaption>" in fig.group(0)
    fig = re.search(r'<figure class="chart" data-chart="score-aware-task-niah".*?</figure>', report, re.S)
    assert fig is not None
    assert "snapkv = adakv:snapkv" in fig.group(0)


def test_formatters() -> None:
    from kvsieve.bench.report import fmt_bytes, fmt_seconds

    assert fmt_bytes(1_028_000) == "1,004 KiB"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(3 * 1024**3) == "3 GiB"
    assert fmt_seconds(0.0156) == "15.6 ms"
    assert fmt_seconds(1234.5) == "1,234 s"


@pytest.mark.parametrize(
    "case",
    ["only_full", "no_full", "missing_fields", "nan_scores", "odd_mode", "many_methods"],
)
def test_report_degenerate_inputs_render(case: str) -> None:
    from kvsieve.bench.report import render_report

    base = synthetic_rows()
    rows = {
        "only_full": [r for r in base if r["method"] == "full"],
        "no_full": [r for r in base if r["method"] != "full"],
        "missing_fields": [{"method": "snapkv", "compression": 0.5}, {"method": "full", "score": None}, {}],
        "nan_scores": [dict(r, score=math.nan) for r in base],
        "odd_mode": [dict(r, mode="hybrid") for r in base],
        "many_methods": [dict(r, method=f"a-very-long-method-name-{i}:snapkv") for i in range(14) for r in base[:8]],
    }[case]
    page = render_report(rows, streaming=[{"method": "full", "ppl": math.inf}], memory=[{"method": "x"}])
    assert page.endswith("</html>\n")
    assert "http://" not in page and "https://" not in page
    if case == "nan_scores":
        assert "No scores." in page
    if case == "odd_mode":
        assert "score-hybrid-all" in chart_ids(page)
