"""One page per step: `decks/<step>.html` holds that step's deck only, also when a local run executes several
tasks in one process (flytekit keeps one deck list for all of them), and the run report `decks/index.html`
links every page. Pages are checked with the standard library's HTML parser (no browser in CI)."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from pathlib import Path

from flytekit import Deck, task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.ledger import PASSING, LedgerWriter, step_dir
from core.io.ingest import IngestConfig, ingest
from tasks.decks import save_decks
from tasks.steplog import step_started
from tasks.types import StepOut

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageCheck(HTMLParser):
    """Well-formedness (every opened element closed in order) plus what the tests read: the `<h2>` section
    names, link targets and the title."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: list[str] = []
        self.hrefs: list[str] = []
        self.title = ""
        self._text: list[str] | None = None
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed {self.stack}")

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href"]
        if tag in ("h2", "title"):
            self._text = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("h2", "title") and self._text is not None:
            text, self._text = "".join(self._text), None
            if tag == "h2":
                self.sections.append(text)
            else:
                self.title = text

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def check_page(path: Path) -> PageCheck:
    page = PageCheck(path.read_text("utf-8"))
    assert not page.errors, (path.name, page.errors[:5])
    return page


@task(enable_deck=True)
def first_step(out: str) -> str:
    step_started("first")
    Deck("first deck", "<p>first body</p>")
    return save_decks(out, "first")


@task(enable_deck=True)
def second_step(out: str, after: str) -> str:
    step_started("second")
    Deck("second deck", "<p>second body</p>")
    Deck("second extra", "<p>second extra body</p>")
    return save_decks(out, "second")


@workflow
def two_steps(a: str, b: str) -> str:
    return second_step(out=b, after=first_step(out=a))


def test_each_step_page_holds_only_its_own_decks_in_a_local_run(tmp_path):
    two_steps(a=str(tmp_path / "a"), b=str(tmp_path / "b"))  # one process, one deck list, as `pyflyte run`
    two_steps(a=str(tmp_path / "c"), b=str(tmp_path / "d"))  # a second run in the same process: same deck names
    for d in "ac":
        page = check_page(tmp_path / d / "decks" / "first.html")
        assert page.sections == ["first deck"] and page.title == "mmcurate first"
    for d in "bd":
        page = check_page(tmp_path / d / "decks" / "second.html")
        assert page.sections == ["second deck", "second extra"]
        assert "first body" not in (tmp_path / d / "decks" / "second.html").read_text()


def _ledger(root: Path, step: str, rows: dict[str, str], reason: str = "planted") -> str:
    with LedgerWriter(step_dir(root, step) / f"part-{step}.parquet", step) as led:
        for sid, decision in rows.items():
            led.add(sid, decision, "" if decision in PASSING else reason)
    return str(root)


def _page(root: Path, step: str, body: str) -> None:
    from core.foundation.report import deck_page

    (root / "decks").mkdir(parents=True, exist_ok=True)
    (root / "decks" / f"{step}.html").write_text(deck_page(f"mmcurate {step}", [(step, body)]))


def test_run_report_index_links_every_step_page(tmp_path):
    from core.foundation.configs import preset
    from core.runs.config import CurateConfig
    from tasks.run_report import summarize_run

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": f"g{i}", "conversations": [{"from": "human", "value": "Q?"},
                                                                         {"from": "gpt", "value": "A."}]}) + "\n"
                           for i in range(4)) + json.dumps({"id": "b0", "conversations": []}) + "\n")
    ingest(IngestConfig(source=str(src), image_root="", run_dir=str(tmp_path / "ingest")))
    _page(tmp_path / "ingest", "ingest", "<p>ingest body</p>")
    _ledger(tmp_path / "dedup", "semdedup", {"g0": "drop", "g1": "keep", "g2": "keep", "g3": "keep"}, "near_dup")
    _page(tmp_path / "dedup", "semdedup", "<p>semdedup body</p>")
    _ledger(tmp_path / "ppl", "ppl_filter", {"g1": "keep", "g2": "drop", "g3": "keep"}, "ppl_above_p90")
    (tmp_path / "bad.txt").write_text("g0\n")
    out = summarize_run(steps=[StepOut(s, FlyteDirectory(str(tmp_path / d))) for s, d in
                               (("ingest", "ingest"), ("semdedup", "dedup"), ("ppl_filter", "ppl"))], known_bad_ids=FlyteFile(str(tmp_path / "bad.txt")),
                        config=preset(CurateConfig, "demo"))
    decks = Path(out.path) / "decks"
    pages = sorted(p.stem for p in decks.glob("*.html"))
    assert pages == ["index", "ingest", "run_summary", "semdedup"]
    index = check_page(decks / "index.html")
    assert set(index.hrefs) == {f"{p}.html" for p in pages if p != "index"}  # every page, nothing dangling
    assert index.sections == ["what happened", "funnel", "steps", "known-bad recall", "other pages", "config",
                              "code version"]
    text = (decks / "index.html").read_text()
    assert "5 source records -&gt; 4 passed ingest" in text and "ppl_above_p90" in text and "near_dup" in text
    assert "no deck page" in text  # ppl_filter made no page: its card says so instead of a dead link
    assert '"semdedup": true' in html.unescape(text) and "code_hash" in text  # the config, as JSON
    summary_page = check_page(decks / "run_summary.html")
    assert summary_page.sections[0] == "run summary"
    assert all(s == "run summary" or s.startswith("known-bad: ") for s in summary_page.sections)
    for step in ("ingest", "semdedup"):  # collected pages keep their own step only
        assert check_page(decks / f"{step}.html").sections == [step]
