"""The HTML report of ``imgstore history`` in a real headless browser: Debian's chromium, driven by
Playwright (the Python package only: the browser is the system's, never a downloaded build).

It opens the report from a file:// URL with the network off and checks that it renders (every
plot laid out with a size), that the page logs no console error and no failed request, and that
every benchmark of the history has its section and exactly one plot.  Skips, saying why, where
chromium or Playwright is missing; .ci/run installs both.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("ruptures")
pytest.importorskip("scipy")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")

from imgstore.analysis.history import load_history  # noqa: E402
from imgstore.analysis.history_html import format_history_html  # noqa: E402

SERIES = Path(__file__).parent / "data" / "history"
CHROMIUM = os.environ.get("IMGSTORE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"needs chromium at {CHROMIUM} (Debian: apt-get install chromium)"
)


def test_report_renders_in_chromium_with_every_benchmark(tmp_path: Path) -> None:
    history = load_history([SERIES])
    names = {series.fullname for machine in history.machines for series in machine.series}
    report = tmp_path / "report.html"
    report.write_text(format_history_html(history), encoding="utf-8")

    errors: list[str] = []
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
            page.goto(report.as_uri(), wait_until="load")
            title = page.title()
            sections = page.eval_on_selector_all(
                "section.benchmark",
                "els => els.map(e => [e.dataset.benchmark, e.querySelectorAll('svg.series').length])",
            )
            sizes = page.eval_on_selector_all(
                "svg.series",
                "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height,"
                " e.querySelectorAll('circle').length, e.querySelectorAll('g.change').length]; })",
            )
            heading = page.inner_text("h1")
        finally:
            browser.close()

    assert errors == []
    assert title == "imgstore benchmark history" and heading == "Benchmark history"
    assert sorted(name for name, _ in sections) == sorted(names)
    assert all(plots == 1 for _, plots in sections)
    assert len(sizes) == len(names)
    assert all(width > 300 and height > 100 and dots >= 32 for width, height, dots, _ in sizes)
    assert sum(changes for *_, changes in sizes) == 2  # the two memmap read_many rows
