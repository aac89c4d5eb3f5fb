"""Render the synthetic report in headless Chromium: no console errors, every chart laid out, a screenshot.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install_browser.sh``) and the ``selenium``
package; skipped when either is missing. The full-page screenshot is kept as ``report.png`` in the
test's run directory and copied to ``/tmp/kvsieve_report.png``.
"""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsieve.bench.report import write_report
from test_report import CHARTS_WITH_MEMORY, make_run_dir

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/kvsieve_report.png")
WINDOW = (1400, 1000)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """A headless Chromium session with browser console logging on."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; run scripts/install_browser.sh")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def _full_page_png(driver: Any) -> bytes:
    """A screenshot of the whole page (Chrome DevTools), not just the window."""
    width, height = driver.execute_script(
        "const e = document.documentElement;"
        "return [Math.ceil(Math.max(e.scrollWidth, document.body.scrollWidth)),"
        "        Math.ceil(Math.max(e.scrollHeight, document.body.scrollHeight))];"
    )
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": int(width), "height": int(height), "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "fromSurface": True}
        )
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return base64.b64decode(shot["data"])


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

    png = _full_page_png(driver)
    assert png.startswith(b"\x89PNG")
    shot = run_dir / "report.png"
    shot.write_bytes(png)
    shutil.copyfile(shot, SCREENSHOT_COPY)

    logs = driver.get_log("browser")
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, severe
