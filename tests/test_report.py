"""Summary numbers and the self-contained HTML report, on a small synthetic run (no model, no browser)."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kvsieve.bench.report import esc, render_report, write_report
from kvsieve.bench.stats import mcnemar_exact, wilson_interval
from kvsieve.bench.summary import (
    NO_COMPRESSION,
    Budget,
    best_method_per_budget,
    load_config,
    load_rows,
    make_cell,
    mean_scores,
    mean_scores_by_task,
    memory_table,
    partial_lines,
    rich_summary_table,
    score_table,
    score_tables,
    speed_table,
    summary_tables,
)

MODES = ("agnostic", "aware")
TASKS = ("niah", "qa")
METHODS = ("snapkv", "pyramidkv", "adakv:snapkv")
COMPRESSIONS = (0.25, 0.5, 0.75)
# Sample 0 of each length s runs at LENGTHS[s] with CONTEXT[s] real tokens (multiples of 4, so (1 - c) * ctx is
# exact); the config (1 sample, 2 lengths) expects exactly these rows.
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
                                "sample": 0,
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
        "samples": 1,
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


def chart_spec(page: str, chart_id: str) -> dict[str, Any]:
    """The data a chart plots (its ``data-spec`` attribute)."""
    m = re.search(rf'<figure class="chart" data-chart="{re.escape(chart_id)}" data-spec="([^"]*)"', page)
    assert m is not None, chart_id
    return json.loads(html.unescape(m.group(1)))


def figure(page: str, chart_id: str) -> str:
    m = re.search(rf'<figure class="chart" data-chart="{re.escape(chart_id)}".*?</figure>', page, re.S)
    assert m is not None, chart_id
    return m.group(0)


def score_cells(page: str) -> list[dict[str, str]]:
    """The data attributes of every score cell of the page, in order."""
    return [dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m)) for m in re.findall(r'<span class="score" ([^>]*)>', page)]


def terminal(table: Any, width: int = 160) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def binary_rows(full: list[int], method: dict[str, list[int]], task: str = "passkey") -> list[dict[str, Any]]:
    """0/1 scores of ``full`` and methods at 50% on samples 0..n-1 of one task (query-agnostic)."""
    rows = []
    for name, scores in {"full": full, **method}.items():
        for i, s in enumerate(scores):
            rows.append({"model": "m", "task": task, "length": 1024, "seed": 0, "sample": i, "mode": "agnostic",
                         "method": name, "compression": 0.0 if name == "full" else 0.5, "score": float(s)})  # fmt: skip
    return rows


# ============================================================================================ summary
C25, C50, C75 = (Budget("compression", c) for c in COMPRESSIONS)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return synthetic_rows()


def test_row_count(rows: list[dict[str, Any]]) -> None:
    # (full + 3 methods × 3 compressions) × 2 tasks × 2 modes × 2 lengths
    assert len(rows) == (1 + 3 * 3) * 2 * 2 * 2


def test_mean_scores_exact(rows: list[dict[str, Any]]) -> None:
    ms = {k: (c.mean, c.n) for k, c in mean_scores(rows).items()}
    assert ms[("agnostic", "full", NO_COMPRESSION)] == (0.875, 4)
    assert ms[("aware", "full", NO_COMPRESSION)] == (1.0, 4)
    assert ms[("agnostic", "snapkv", C25)] == (0.75, 4)
    assert ms[("agnostic", "snapkv", C75)] == (0.25, 4)
    assert ms[("agnostic", "pyramidkv", C50)] == (0.75, 4)
    assert ms[("agnostic", "adakv:snapkv", C75)] == (0.5, 4)
    assert ms[("aware", "pyramidkv", C75)] == (0.625, 4)
    assert len(ms) == 2 * (1 + 3 * 3)


def test_cells_carry_n_and_a_95_interval(rows: list[dict[str, Any]]) -> None:
    ms = mean_scores(rows)
    binary = ms[("agnostic", "snapkv", C25)]  # scores 1, 1, 1, 0
    assert binary.interval == "Wilson"
    assert (binary.lo, binary.hi) == wilson_interval(3, 4)
    graded = ms[("agnostic", "snapkv", C50)]  # scores 1, 0.5, 0.5, 0: graded, bootstrap
    assert graded.interval == "bootstrap"
    assert 0.0 <= graded.lo < graded.mean == 0.5 < graded.hi <= 1.0
    assert (graded.lo, graded.hi) == (mean_scores(rows)[("agnostic", "snapkv", C50)].lo, graded.hi)  # deterministic
    assert len(graded.scores) == 4  # one per sample, for the paired tests


def test_make_cell_edges() -> None:
    assert make_cell([]) is None
    assert make_cell([{"score": None}, {"score": math.nan}, {}]) is None
    right = make_cell([{"sample": i, "score": 1.0} for i in range(5)])
    assert right is not None and (right.mean, right.n, right.hi) == (1.0, 5, 1.0)
    assert right.lo == pytest.approx(wilson_interval(5, 5)[0])
    wrong = make_cell([{"sample": i, "score": 0} for i in range(5)])
    assert wrong is not None and (wrong.mean, wrong.lo) == (0.0, 0.0)
    # an aggregate (another tool's metric over 50 questions) counts as 50 samples, without an interval
    agg = make_cell([{"score": 0.8, "n_aggregated": 50}, {"sample": 1, "score": 0.0}])
    assert agg is not None and (agg.n, agg.interval) == (51, "") and agg.mean == pytest.approx(40 / 51)


def test_mean_scores_by_task_exact(rows: list[dict[str, Any]]) -> None:
    bt = {k: (c.mean, c.n) for k, c in mean_scores_by_task(rows).items()}
    assert bt[("niah", "agnostic", "snapkv", C50)] == (0.75, 2)
    assert bt[("qa", "agnostic", "snapkv", C50)] == (0.25, 2)
    assert bt[("qa", "agnostic", "full", NO_COMPRESSION)] == (0.75, 2)
    assert bt[("qa", "aware", "adakv:snapkv", C75)] == (0.75, 2)


def test_token_budgets_are_their_own_columns() -> None:
    # --budgets rows carry compression 0: they must not pool with each other nor with full.
    rows = [
        {"method": m, "compression": 0.0, "budget_tokens": b, "task": "t", "sample": i, "score": s}
        for m, b, scores in (("full", None, [1, 1]), ("quest", 256, [0, 0]), ("quest", 1024, [1, 0]))
        for i, s in enumerate(scores)
    ]
    ms = mean_scores(rows)
    assert set(ms) == {
        ("agnostic", "full", NO_COMPRESSION),
        ("agnostic", "quest", Budget("tokens", 256)),
        ("agnostic", "quest", Budget("tokens", 1024)),
    }
    assert ms[("agnostic", "quest", Budget("tokens", 1024))].mean == 0.5
    assert [b.label for b in score_table(rows, "agnostic").budgets] == ["0%", "256 tok", "1,024 tok"]
    page = render_report(rows)
    assert {"score-agnostic-all-tokens", "score-agnostic-task-t-tokens"} <= set(chart_ids(page))
    assert chart_spec(page, "score-agnostic-all-tokens")["series"]["quest"]["points"] == [[256, 0.0], [1024, 50.0]]


def test_multiturn_rows_are_scored_apart() -> None:
    rows = binary_rows([1, 1], {"snapkv": [1, 0]})
    rows += [dict(r, turn_mode="multiturn", question_index=1, score=0.0) for r in rows]
    tables = {(t.view, t.task) for t in score_tables(rows)}
    assert ("agnostic · multiturn", None) in tables and ("agnostic", None) in tables
    assert mean_scores(rows)[("agnostic", "snapkv", Budget("compression", 0.5))].mean == 0.5


def test_best_method_per_budget(rows: list[dict[str, Any]]) -> None:
    best = {(b.mode, b.compression): b for b in best_method_per_budget(rows)}
    assert len(best) == 6
    b = best[("agnostic", 0.25)]
    assert (b.method, b.score, b.full_score, b.runner_up, b.runner_up_score) == (
        "adakv:snapkv", 0.875, 0.875, "snapkv", 0.75,
    )  # fmt: skip
    assert b.delta_vs_full == 0.0
    assert b.budget == C25 and b.n == 4
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
    # paired tests, best vs runner-up (Holm over the 3 budgets of a mode) and vs full; 4 samples decide nothing
    assert all(b.vs_runner_up is not None and b.vs_full is not None for b in best.values())
    assert not any(b.vs_runner_up.significant for b in best.values())  # type: ignore[union-attr]


def test_best_method_borrows_full_from_other_mode(rows: list[dict[str, Any]]) -> None:
    no_aware_full = [r for r in rows if not (r["mode"] == "aware" and r["method"] == "full")]
    best = {(b.mode, b.compression): b for b in best_method_per_budget(no_aware_full)}
    assert best[("aware", 0.5)].full_score == 0.875
    table = score_table(no_aware_full, "aware")
    assert table.full_from == "agnostic"
    assert table.tests == 9  # every compressed cell is still compared with (the borrowed) full


def test_paired_tests_against_full_are_exact_and_holm_corrected() -> None:
    full = [1] * 20
    bad = [0] * 12 + [1] * 8  # 12 losses, no win: McNemar p = 2 / 2^12
    meh = [0] + [1] * 19  # one loss: p = 1
    better = [1] * 20
    rows = binary_rows(full, {"bad": bad, "meh": meh, "same": better})
    t = score_table(rows, "agnostic")
    half = Budget("compression", 0.5)
    bad_test, meh_test = t.vs_full[("bad", half)], t.vs_full[("meh", half)]
    assert (bad_test.test, bad_test.n, bad_test.delta) == ("McNemar exact", 20, -0.6)
    assert bad_test.p == mcnemar_exact(0, 12) == 2 / 2**12
    assert bad_test.p_holm == pytest.approx(3 * 2 / 2**12)  # smallest of 3 p-values: x3
    assert bad_test.significant
    assert meh_test.p == 1.0 and not meh_test.significant
    text = terminal(rich_summary_table(rows, "agnostic"))
    bad_line = next(ln for ln in text.splitlines() if ln.startswith("│ bad"))
    assert "40.0▼" in bad_line
    assert "▼" not in next(ln for ln in text.splitlines() if ln.startswith("│ meh"))
    assert "Holm" in text
    cells = {c["mean"]: c for c in score_cells(render_report(rows))}
    assert cells["0.4"]["sig"] == "worse" and float(cells["0.4"]["p-holm"]) == pytest.approx(3 * 2 / 2**12, rel=1e-5)
    assert "sig" not in cells["0.95"]


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


def test_rich_summary_table(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    config = load_config(make_run_dir(tmp_path))
    text = terminal(rich_summary_table(rows, "agnostic", config))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert "0%" in text and "25%" in text and "75%" in text
    full_line = next(ln for ln in lines if ln.startswith("│ full "))
    snap_line = next(ln for ln in lines if ln.startswith("│ snapkv "))
    assert "87.5" in full_line
    assert re.findall(r"\d+\.\d", snap_line) == ["75.0", "50.0", "25.0"]
    # the line under the scores: 95% interval and n
    under = lines[lines.index(snap_line) + 1]
    lo, hi = wilson_interval(3, 4)
    assert f"[{lo * 100:.0f}, {hi * 100:.0f}] n=4" in under
    assert "n=4" in lines[lines.index(full_line) + 1]
    assert lines.index(full_line) < lines.index(snap_line)  # full comes first
    assert "expected" not in text and "Incomplete" not in text  # the config's rows are all there
    assert "[lo, hi]: 95% interval" in text


def test_expected_rows_follow_the_prefill_and_sequence_settings_the_config_lists(
    rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A run of only sparse prefills expects no dense rows; one with dense and a sparse prefill expects both."""
    config = load_config(make_run_dir(tmp_path))
    sparse = [dict(r, prefill="xattention") for r in rows]
    only_sparse = dict(config, prefills=["xattention"])
    tables = [t for t in score_tables(sparse, only_sparse) if t.task is None]
    assert all(t.missing == [] for t in tables)  # complete: every planned row is there, no dense row was planned
    assert "Incomplete" not in terminal(rich_summary_table(sparse, "agnostic", only_sparse))
    both = dict(config, prefills=["dense", "xattention"], sequences=["none", "fastv(layer=3,keep=0.25)"])
    t = next(t for t in score_tables(rows + sparse, both) if t.view == "agnostic" and t.task is None)
    pruned = "full [sequence fastv(layer=3, keep=0.25)]"  # labelled by the spec rows carry (build(...).spec())
    assert ("full [prefill xattention]", NO_COMPRESSION) not in {(m, b) for m, b, _, _ in t.missing}
    assert (pruned, NO_COMPRESSION, 4, 0) in t.missing  # planned, and no row yet: said, not silently absent
    assert ("full [prefill xattention] [sequence fastv(layer=3, keep=0.25)]", NO_COMPRESSION, 4, 0) in t.missing


def test_summary_flags_cells_with_fewer_rows_than_the_config_expects(
    rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    run = make_run_dir(tmp_path)
    config = load_config(run)
    # lose one row of snapkv @ 50% (agnostic), and score another one NaN (a failed scorer)
    lost = next(r for r in rows if (r["mode"], r["method"], r["compression"]) == ("agnostic", "snapkv", 0.5))
    nan = next(r for r in rows if (r["mode"], r["method"], r["compression"]) == ("agnostic", "snapkv", 0.75))
    partial = [dict(r, score=math.nan) if r is nan else r for r in rows if r is not lost]
    table = score_table(partial, "agnostic")
    assert table.missing == []  # without the config nothing is known
    t = next(t for t in score_tables(partial, config) if t.view == "agnostic" and t.task is None)
    assert sorted(t.missing) == [("snapkv", C50, 4, 3), ("snapkv", C75, 4, 3)]
    assert t.cells[("snapkv", C50)].n == 3 and t.cells[("snapkv", C50)].missing == 1
    text = terminal(rich_summary_table(partial, "agnostic", config))
    assert text.count("n=3 of 4 expected") == 2
    assert "Incomplete" in text and "agnostic · snapkv @ 50%: 3 of 4 expected rows (1 missing or unscored)" in text
    # a method the config lists that has no row at all is shown, not silently absent
    no_pyramid = [r for r in rows if r["method"] != "pyramidkv"]
    text = terminal(rich_summary_table(no_pyramid, "agnostic", config))
    assert "pyramidkv" in text and text.count("n=0 of 4 expected") == 3
    # the report says so too, in the cell and in a warning box at the top
    write_jsonl(run / "results.jsonl", partial)
    page = write_report(run).read_text(encoding="utf-8")
    assert 'class="warnings"' in page and "3 of 4 expected rows" in page
    assert {"expected": "4", "present": "3"}.items() <= next(
        c for c in score_cells(page) if c.get("present") == "3"
    ).items()


def test_summary_tables_cover_every_view(rows: list[dict[str, Any]]) -> None:
    titles = [t.title for t in summary_tables(rows)]
    assert titles == ["Mean score ×100 — query-agnostic", "Mean score ×100 — query-aware"]


def test_empty_inputs(tmp_path: Path) -> None:
    assert load_rows(tmp_path) == []
    assert mean_scores([]) == {}
    assert mean_scores_by_task([]) == {}
    assert best_method_per_budget([]) == []
    assert speed_table([]) == []
    assert memory_table([]) == []
    assert score_tables([]) == []
    assert "no results" in terminal(rich_summary_table([], "aware"))
    assert partial_lines(tmp_path) == 0


def test_load_rows_skips_unreadable_lines(tmp_path: Path) -> None:
    text = b'{"method": "full", "score": 1.0}\n\n\xff\xfe garbage\n[1, 2]\n{"method": "snap'
    (tmp_path / "results.jsonl").write_bytes(text)
    with pytest.warns(UserWarning, match=r"skipped 3 line\(s\).*line 3, 4, 5"):
        got = load_rows(tmp_path)
    assert got == [{"method": "full", "score": 1.0}]
    (tmp_path / "results.jsonl.partial").write_text('{"method": "sn\n\n{"x"\n', encoding="utf-8")
    assert partial_lines(tmp_path) == 2


def test_rows_with_extra_and_missing_fields_are_tolerated() -> None:
    rows = binary_rows([1, 0], {"snapkv": [1, 1]})
    rows = [dict(r, question_index=0, turn_mode=None, kernel="chunked", some_future_field=[1]) for r in rows]
    rows.append({"method": "snapkv"})  # nothing else at all
    assert mean_scores(rows)[("agnostic", "snapkv", Budget("compression", 0.5))].n == 2
    assert render_report(rows).endswith("</html>\n")


def test_rows_with_a_prefill_or_sequence_method_are_their_own_cells() -> None:
    rows = binary_rows([1, 0], {"snapkv": [1, 1]})
    pruned = [dict(r, sequence="fastv(keep=0.25)", score=0.0) for r in rows]
    cells = mean_scores(rows + pruned)
    assert cells[("agnostic", "snapkv", Budget("compression", 0.5))].n == 2  # not pooled with the pruned rows
    assert cells[("agnostic", "snapkv [sequence fastv(keep=0.25)]", Budget("compression", 0.5))].mean == 0.0
    assert cells[("agnostic", "full", Budget("compression", 0.0))].mean == 0.5  # full stays the unpruned baseline


# ============================================================================================ report
@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = make_run_dir(tmp_path_factory.mktemp("run"))
    path = write_report(out)
    assert path == out / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_is_self_contained(report: str) -> None:
    assert report.startswith("<!DOCTYPE html>")
    assert "://" not in report  # no URL of any scheme, not even matplotlib's SVG namespaces or metadata
    assert "<script" not in report.lower()  # the prediction's <script> is escaped, and we ship none
    assert "&lt;script&gt;" in report
    assert not re.search(r"""\b(?:src|href)\s*=\s*["'](?!#|data:)""", report)
    assert "@import" not in report and not re.search(r"url\((?!#)", report)  # only in-page references
    assert "<?xml" not in report and "<!DOCTYPE svg" not in report and "<metadata" not in report


def test_report_charts(report: str) -> None:
    ids = chart_ids(report)
    assert len(ids) == len(set(ids)) == CHARTS_BASE
    for mode in MODES:
        assert f"score-{mode}-all" in ids
        for task in TASKS:
            assert f"score-{mode}-task-{task}" in ids
    assert {"speed", "streaming"} <= set(ids)
    assert sum(i.startswith("memory-context-") for i in ids) == 3
    for chart_id in ids:  # every chart holds one svg and plots something
        assert figure(report, chart_id).count("<svg") == 1
        spec = chart_spec(report, chart_id)
        assert spec["series"] and all(s if isinstance(s, list) else s["points"] for s in spec["series"].values())
    # element ids are unique across the page's charts (each chart's ids carry its own prefix)
    svg_ids = re.findall(r'<(?:g|path|clipPath|defs|svg)[^>]* id="([^"]+)"', report)
    assert len(svg_ids) == len(set(svg_ids))


def test_report_score_chart_content(report: str) -> None:
    spec = chart_spec(report, "score-agnostic-task-qa")
    series = spec["series"]
    assert list(series) == ["full", "snapkv", "pyramidkv", "adakv:snapkv"]
    assert series["full"]["reference"] and series["full"]["points"] == [[0.0, 75.0]]
    assert series["snapkv"]["points"] == [[0.25, 50.0], [0.5, 25.0], [0.75, 25.0]]
    lo, hi = wilson_interval(1, 2)  # snapkv @ 25% on qa: scores 1, 0
    assert series["snapkv"]["intervals"][0] == pytest.approx([lo * 100, hi * 100])
    # hover tooltips on the points
    fig = figure(report, "score-agnostic-task-qa")
    assert "<title>snapkv @ 50%: 25.0 " in fig and "(n = 2)" in fig
    assert fig.count("<title>") == 1 + 3 + 3 * 3  # reference, a line per method, a point per budget


def test_report_streaming_uses_log_scale(report: str) -> None:
    assert chart_spec(report, "streaming")["log_y"]
    fig = figure(report, "streaming")
    assert "1 bucket(s) with a non-finite perplexity left out" in fig
    assert len(chart_spec(report, "streaming")["series"]["full"]["points"]) == 5


def test_report_tables(report: str) -> None:
    best = re.search(r'<table class="best">.*?</table>', report, re.S)
    assert best is not None
    cells = re.findall(r"<tr>(.*?)</tr>", best.group(0), re.S)[1:]
    picks = [re.findall(r"<td[^>]*>(.*?)</td>", c, re.S)[:3] for c in cells]
    assert picks[1] == ["Query-agnostic", "50%", "<strong>pyramidkv</strong>"]
    assert [p[2] for p in picks] == ["<strong>adakv:snapkv</strong>", "<strong>pyramidkv</strong>"] + [
        "<strong>adakv:snapkv</strong>"
    ] * 4
    assert best.group(0).count('class="versus"') == 12  # vs full and vs the runner-up, at each of 6 budgets
    # summary cells: score ×100 with one decimal, interval and n under it, numbers in data attributes
    full = next(c for c in score_cells(report) if c["mean"] == "0.875" and c["n"] == "4")
    assert full["interval"] in ("Wilson", "bootstrap") and float(full["lo"]) < 0.875 < float(full["hi"])
    assert ">87.5</span>" in report
    assert "n=4</div>" in report
    # header and configuration
    assert "SmolLM2-135M" in report
    assert "kvsieve bench --methods snapkv,pyramidkv,adakv:snapkv --out bench-out" in report
    assert "machine.cpu" in report
    assert "transformers 5.0.0" in report
    assert "<details><summary>Show 80 rows</summary>" in report
    assert 'class="warnings"' not in report  # complete run, nothing set aside


def test_report_with_memory_file(tmp_path: Path) -> None:
    page = write_report(make_run_dir(tmp_path, with_memory=True)).read_text(encoding="utf-8")
    ids = chart_ids(page)
    assert len(ids) == CHARTS_WITH_MEMORY
    assert {"memory-measured-kv", "memory-measured-rss"} <= set(ids)
    assert set(chart_spec(page, "memory-measured-kv")["series"]) == {"full", "snapkv · dense", "snapkv · paged"}


def test_report_mentions_partial_lines(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    (run / "results.jsonl.partial").write_text('{"method": "snapkv", "sco\n', encoding="utf-8")
    page = write_report(run).read_text(encoding="utf-8")
    assert "1 incomplete line(s) from an interrupted run are set aside in results.jsonl.partial" in page


def test_report_empty_results(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text("", encoding="utf-8")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No results." in page
    assert chart_ids(page) == []
    assert "://" not in page


def test_report_missing_directory_and_only_streaming(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    page = write_report(out).read_text(encoding="utf-8")
    assert "No results." in page
    write_jsonl(out / "streaming.jsonl", streaming_rows())
    page = write_report(out).read_text(encoding="utf-8")
    assert "No results." in page
    assert chart_ids(page) == ["streaming"]


def test_report_is_deterministic(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, with_memory=True)
    first = write_report(run).read_text(encoding="utf-8")
    second = write_report(run).read_text(encoding="utf-8")
    footer = re.compile(r" on \d{4}-\d\d-\d\d \d\d:\d\d UTC")  # the generation time is the only difference allowed
    assert footer.sub("", first) == footer.sub("", second)


def test_report_per_question_section() -> None:
    # a 3-question task: full answers all, snapkv @ 50% loses the later questions
    rows = []
    for method, scores in (("full", [1, 1, 1]), ("snapkv", [1, 0, 0])):
        for sample in range(4):
            for q, s in enumerate(scores):
                rows.append({"model": "m", "task": "multi", "length": 1024, "seed": 0, "sample": sample,
                             "question_index": q, "turn_mode": "independent", "mode": "agnostic", "method": method,
                             "compression": 0.0 if method == "full" else 0.5, "score": float(s)})  # fmt: skip
    page = render_report(rows)
    assert 'id="questions"' in page
    spec = chart_spec(page, "questions-agnostic-50pct")
    assert spec["series"]["snapkv"]["points"] == [[1, 100.0], [2, 0.0], [3, 0.0]]
    assert spec["series"]["full"]["points"] == [[1, 100.0], [2, 100.0], [3, 100.0]]
    table = re.search(r'<table class="questions">.*?</table>', page, re.S)
    assert table is not None and table.group(0).count('data-sig="worse"') == 0  # 4 samples: p = 0.125, not < 5%


# ============================================================================================ helpers
def test_esc_breaks_urls_and_markup() -> None:
    assert esc('<a href="https://x">') == "&lt;a href=&quot;https:&#47;&#47;x&quot;&gt;"


def test_overlapping_lines_are_named(report: str) -> None:
    assert "<figcaption>Overlapping lines (identical values): snapkv = pyramidkv.</figcaption>" in figure(
        report, "memory-context-50pct"
    )
    assert "snapkv = adakv:snapkv" in figure(report, "score-aware-task-niah")


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
    ["only_full", "no_full", "missing_fields", "nan_scores", "odd_mode", "many_methods", "two_models"],
)
def test_report_degenerate_inputs_render(case: str) -> None:
    base = synthetic_rows()
    rows = {
        "only_full": [r for r in base if r["method"] == "full"],
        "no_full": [r for r in base if r["method"] != "full"],
        "missing_fields": [{"method": "snapkv", "compression": 0.5}, {"method": "full", "score": None}, {}],
        "nan_scores": [dict(r, score=math.nan) for r in base],
        "odd_mode": [dict(r, mode="hybrid") for r in base],
        "many_methods": [dict(r, method=f"a-very-long-method-name-{i}:snapkv") for i in range(14) for r in base[:8]],
        "two_models": base + [dict(r, model="other/model") for r in base],
    }[case]
    page = render_report(rows, streaming=[{"method": "full", "ppl": math.inf}], memory=[{"method": "x"}])
    assert page.endswith("</html>\n")
    assert "://" not in page
    if case == "nan_scores":
        assert "No scores." in page
    if case == "odd_mode":
        assert "score-hybrid-all" in chart_ids(page)
    if case == "two_models":  # never pooled: a table and charts per model
        assert {"smollm2-135m-score-agnostic-all", "other-model-score-agnostic-all"} <= set(chart_ids(page))
        assert page.count('<h3 class="model">') >= 3
