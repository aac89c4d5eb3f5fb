"""Render the synthetic report in headless Chromium: no console errors, every chart laid out, a screenshot.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install_browser.sh``) and the ``selenium``
package; skipped when either is missing. The full-page screenshot is kept as ``report.png`` in the
test's run directory and copied to ``/tmp/kvsieve_report.png``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from browser import full_page_png
from kvsieve.bench.report import write_report
from test_report import CHARTS_WITH_MEMORY, make_run_dir

pytestmark = pytest.mark.browser

SCREENSHOT_COPY = Path("/tmp/kvsieve_report.png")


def test_report_renders_in_chromium(driver: Any, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", with_memory=True)
    report = write_report(run_dir)
    driver.get(report.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert "kvsieve report" in driver.title

    charts = driver.execute_script(
        "return Array.from(document.querySelectorAll('.chart svg')).map(s => {"
        "  const r = s.getBoundingClientRect(), fig = s.closest('.chart');"
        "  return {id: fig.dataset.chart, w: r.width, h: r.height,"
        "          series: Object.keys(JSON.parse(fig.dataset.spec).series),"
        "          tips: s.querySelectorAll('title').length, text: s.querySelectorAll('text').length};"
        "});"
    )
    assert len(charts) == CHARTS_WITH_MEMORY, [c["id"] for c in charts]
    for c in charts:
        assert c["w"] > 100 and c["h"] > 100, c
        assert c["series"] and c["tips"] > 0 and c["text"] > 0, c  # data, hover tooltips, axis labels
    score = next(c for c in charts if c["id"] == "score-agnostic-all")
    assert score["series"] == ["full", "snapkv", "pyramidkv", "adakv:snapkv"]

    # score cells show their interval and n under the score
    cells = driver.execute_script(
        "return Array.from(document.querySelectorAll('table.scores td .sub')).map(e => e.textContent)"
    )
    assert cells and all(re.fullmatch(r"\[[\d.]+, [\d.]+\] n=\d+", c) for c in cells), [
        c for c in cells if "n=" not in c
    ]

    # nothing overflows the page sideways
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0

    png = full_page_png(driver)
    assert png.startswith(b"\x89PNG")
    shot = run_dir / "report.png"
    shot.write_bytes(png)
    shutil.copyfile(shot, SCREENSHOT_COPY)

    logs = driver.get_log("browser")
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, severe
