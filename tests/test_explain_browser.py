"""Render an explanation page in headless Chromium: no console errors, tokens shaded per method and target token,
charts laid out, nothing overflowing sideways, a screenshot.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install_browser.sh``) and ``selenium``; skipped when
either is missing. The explanation comes from the tiny random Llama of the unit tests (seconds). The full-page
screenshot is copied to ``/tmp/kvsieve_explain.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from browser import full_page_png
from kvsieve.explain import explain
from kvsieve.models import load_model
from tiny_model_dir import save_tiny_model_dir

pytestmark = pytest.mark.browser

SCREENSHOT_COPY = Path("/tmp/kvsieve_explain.png")
METHODS = ["saliency", "attention_rollout", "fai", "method:snapkv(window=4)"]


def test_explanation_page_renders_in_chromium(driver: Any, tmp_path: Path) -> None:
    model, tok = load_model(save_tiny_model_dir(tmp_path / "model"))
    prompt = " ".join(f"w{i}" for i in range(1, 60))
    result = explain(model, tok, prompt, target=" w61 w62", method=METHODS, faithfulness=True)
    _, page = result.write(tmp_path / "out", command="kvsieve explain --prompt ...")
    driver.get(page.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert "kvsieve explain" in driver.title

    boxes = driver.execute_script(
        "return Array.from(document.querySelectorAll('details.step')).map(d => ({step: d.dataset.step, open: d.open,"
        "  methods: Array.from(d.querySelectorAll('.method')).map(m => ({name: m.dataset.method,"
        "    w: m.getBoundingClientRect().width, tokens: m.querySelectorAll('.tok').length,"
        "    shaded: Array.from(m.querySelectorAll('.tok')).filter(t => getComputedStyle(t).backgroundColor !="
        "      'rgba(0, 0, 0, 0)').length}))}))"
    )
    assert [b["step"] for b in boxes] == ["0", "1"] and boxes[0]["open"] and not boxes[1]["open"]
    first = boxes[0]["methods"]
    assert [m["name"] for m in first] == METHODS
    for m in first:
        assert m["w"] > 200 and m["tokens"] == result.n_prompt + 1, m  # the prompt plus the target token
        assert m["shaded"] > result.n_prompt // 2, m  # scores show as shades

    charts = driver.execute_script(
        "return Array.from(document.querySelectorAll('.chart svg')).map(s => {const r = s.getBoundingClientRect();"
        "  return {w: r.width, h: r.height, tips: s.querySelectorAll('title').length}})"
    )
    assert len(charts) == 2 and all(c["w"] > 100 and c["h"] > 100 and c["tips"] > 0 for c in charts), charts
    rows = driver.execute_script("return document.querySelectorAll('table.faith tbody tr').length")
    assert rows == len(METHODS) + 1  # and the random baseline
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0

    png = full_page_png(driver)
    assert png.startswith(b"\x89PNG")
    shot = tmp_path / "explain.png"
    shot.write_bytes(png)
    shutil.copyfile(shot, SCREENSHOT_COPY)
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
