"""Render a diagnosis page in headless Chromium: no console errors, every chart laid out with marks, a screenshot.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install_browser.sh``) and ``selenium``; skipped when
either is missing. The diagnosis comes from a tiny random Llama (so it takes a second), with retrieval scores
attached so every section renders. The full-page screenshot is copied to ``/tmp/kvsieve_diagnose.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from browser import full_page_png
from kvsieve.diagnose import HEAD_STATS, RetrievalResult, StatsConfig, diagnose
from kvsieve.diagnose.report import write_report
from tiny_models import make_model, prompt_ids

pytestmark = pytest.mark.browser

SCREENSHOT_COPY = Path("/tmp/kvsieve_diagnose.png")
MAP_HEADS = [(0, 1), (1, 3)]


def test_diagnosis_page_renders_in_chromium(driver: Any, tmp_path: Path) -> None:
    model = make_model("llama")
    gen = torch.Generator().manual_seed(0)
    retrieval = RetrievalResult(
        scores=torch.rand(2, 4, generator=gen, dtype=torch.float64),
        task="niah_single_number",
        length=64,
        samples=2,
        seed=0,
        accuracy=0.5,
    )
    d = diagnose(
        model,
        prompt_ids(64, seed=2),
        config=StatsConfig(query_start=8, map_size=16),
        map_heads=MAP_HEADS,
        retrieval=retrieval,
        model_name="tiny-llama",
        source="random ids",
    )
    page = write_report(d, tmp_path, command="kvsieve diagnose --model tiny")
    driver.get(page.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert "kvsieve diagnose" in driver.title

    charts = driver.execute_script(
        "return Array.from(document.querySelectorAll('.chart svg')).map(s => {"
        "  const r = s.getBoundingClientRect(), fig = s.closest('.chart');"
        "  return {id: fig.dataset.chart, w: r.width, h: r.height, spec: JSON.parse(fig.dataset.spec),"
        "          tips: s.querySelectorAll('title').length};"
        "});"
    )
    ids = [c["id"] for c in charts]
    want = (
        [f"heat-{s}" for s in (*HEAD_STATS, "retrieval")] + [f"map-{a}.{b}" for a, b in MAP_HEADS] + ["massive-ratio"]
    )
    assert sorted(ids) == sorted(want), ids
    for c in charts:
        assert c["w"] > 100 and c["h"] > 100, c["id"]
        assert c["tips"] > 0, c["id"]  # hover tooltips on the marks
        assert c["spec"].get("grid") or c["spec"].get("series"), c["id"]
    heat = next(c for c in charts if c["id"] == "heat-sink0")
    assert [len(row) for row in heat["spec"]["grid"]] == [4, 4]  # one cell per layer and head
    assert heat["tips"] == 2 * 4
    massive = next(c for c in charts if c["id"] == "massive-ratio")
    assert len(massive["spec"]["series"]["ratio"]) == len(massive["spec"]["groups"]) > 0

    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0
    sections = driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id)")
    assert sections == ["summary", "heatmaps", "maps", "sinks", "massive", "retrieval"]

    png = full_page_png(driver)
    assert png.startswith(b"\x89PNG")
    shot = tmp_path / "diagnosis.png"
    shot.write_bytes(png)
    shutil.copyfile(shot, SCREENSHOT_COPY)

    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
