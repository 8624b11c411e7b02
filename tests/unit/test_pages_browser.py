"""The deck pages as a browser shows them (scripts/check_pages.py): rendered in headless Chromium, with the shared
stylesheet applied, no broken image, no sideways page scroll, no squeezed table, each step page opening with its
own step and the run report linking pages that exist.

The rendering tests need Chromium (`apt-get install -y chromium`) and are skipped, saying so, where it is
missing (CI has none; there tests/tasks/test_decks_pages.py checks each page's sections with an HTML parser).
The rules themselves (`check_facts`) are tested without a browser.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_pages", ROOT / "scripts" / "check_pages.py")
check_pages = importlib.util.module_from_spec(_spec)
sys.modules["check_pages"] = check_pages
_spec.loader.exec_module(check_pages)

BROWSER = check_pages.find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="Chromium is not installed (apt-get install -y chromium): the deck pages were NOT "
                            "rendered in a browser; only the HTML-parser checks of test_decks_pages.py ran")


def _facts(**over):
    base = {"title": "mmcurate x", "body_max_width": "1200px", "broken_images": [], "scroll_width": 1280,
            "client_width": 1280, "tall_rows": [], "sections": ["semdedup"], "links": []}
    return base | over


def test_rules_flag_each_problem(tmp_path):
    page, pages = tmp_path / "semdedup.html", {"index", "ingest", "semdedup", "export_baseline", "train_baseline"}
    assert check_pages.check_facts(page, _facts(), pages) == []
    bad = check_pages.check_facts(page, _facts(
        title="", body_max_width="none", broken_images=["data:image/png;base64,xx"], scroll_width=1900,
        tall_rows=["a b c"], sections=["ingest", "semdedup"]), pages)
    assert len(bad) == 7, bad  # title, stylesheet, image, sideways scroll, squeezed rows, first section, foreign
    assert any("not its own step" in p for p in bad) and any("other steps: ['ingest']" in p for p in bad)
    # suffixed pages open with their step's section (the train deck's is named "training")
    assert check_pages.check_facts(tmp_path / "export_baseline.html", _facts(sections=["export"]), pages) == []
    assert check_pages.check_facts(tmp_path / "train_baseline.html", _facts(sections=["training"]), pages) == []
    # the run report: its first sections, and no link to a page that is not there
    (tmp_path / "ingest.html").write_text("x")
    index = _facts(sections=["what happened", "funnel", "steps", "config"], links=["ingest.html", "gone.html"])
    assert check_pages.check_facts(tmp_path / "index.html", index, pages) == ["link to a missing page: gone.html"]


def _write_pages(decks: Path) -> None:
    """A run report plus step pages made with the project's own page builders: a wide text table (more columns
    than fit the page), a figure, a card grid."""
    from core.foundation.report import deck_page, figure_html, new_figure, table_html
    from core.runs.index import run_index_html

    decks.mkdir(parents=True)
    wide = [{f"column_{j}": f"value {i} {j} sign-flip permutation, exact" for j in range(14)} for i in range(8)]
    fig, ax = new_figure()
    ax.plot([0, 1, 2], [3, 1, 2])
    (decks / "semdedup.html").write_text(deck_page("mmcurate semdedup", [
        ("semdedup", table_html(wide, "a table wider than the page") + figure_html(fig, "a figure"))]))
    (decks / "ingest.html").write_text(deck_page("mmcurate ingest", [("ingest", table_html(wide[:2]))]))
    counts = pd.DataFrame([{"step": s, "inputs": 10, "kept": 9, "modified": 0, "dropped": 1, "quarantined": 0}
                           for s in ("ingest", "semdedup")])
    reasons = pd.DataFrame([{"step": "semdedup", "decision": "keep", "reason": "semdedup_skipped:no_image_embedding",
                             "count": 31}, {"step": "semdedup", "decision": "drop", "reason": "semdedup", "count": 1}])
    (decks / "index.html").write_text(run_index_html(
        {"sentence": "10 source records -> 9 samples out of export"}, counts, reasons, ["ingest", "semdedup"],
        config={"semdedup": True}, code={"git": "abc"}))


@needs_browser
def test_pages_render_and_read_well_in_chromium(tmp_path):
    decks = tmp_path / "run" / "decks"
    _write_pages(decks)
    report = check_pages.check_folders([decks], tmp_path / "shots", BROWSER, quiet=True)
    assert {Path(p).name for p in report} == {"index.html", "ingest.html", "semdedup.html"}
    for path, r in report.items():
        assert r["problems"] == [], (path, r["problems"])
        assert Path(r["screenshot"]).stat().st_size > 5_000  # a rendered page, not an empty canvas
    sem = report[str(decks / "semdedup.html")]["facts"]
    assert sem["n_images"] == 1 and sem["n_tables"] == 1 and sem["sections"] == ["semdedup"]
    index = report[str(decks / "index.html")]["facts"]
    assert set(index["links"]) == {"ingest.html", "semdedup.html"}


@needs_browser
def test_chromium_check_fails_a_page_with_a_foreign_step_and_a_broken_image(tmp_path):
    from core.foundation.report import deck_page

    decks = tmp_path / "run" / "decks"
    decks.mkdir(parents=True)
    (decks / "ingest.html").write_text(deck_page("mmcurate ingest", [("ingest", "<p>ok</p>")]))
    (decks / "embed.html").write_text(deck_page("mmcurate embed", [
        ("ingest", "<p>the previous step's deck</p>"), ("embed", '<img src="data:image/png;base64,AAAA"/>'),
        ("wide", '<div style="width:3000px">a page-wide element</div>')]))
    report = check_pages.check_folders([decks], None, BROWSER, quiet=True)
    problems = report[str(decks / "embed.html")]["problems"]
    assert any("not its own step" in p for p in problems), problems
    assert any("broken image" in p for p in problems), problems
    assert any("scrolls sideways" in p for p in problems), problems
    assert report[str(decks / "ingest.html")]["problems"] == []


@needs_browser
def test_cli_exit_status(tmp_path):
    decks = tmp_path / "run" / "decks"
    _write_pages(decks)
    assert check_pages.main([str(decks), "--browser", BROWSER]) == 0
    assert check_pages.main([str(tmp_path / "nothing")]) == 2
