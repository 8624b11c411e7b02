"""Render the deck pages of a run in headless Chromium and check what a reader sees; save a screenshot of each.

    python scripts/check_pages.py demo_out/run/decks [demo_out/ablation/decks ...] [--shots demo_out/page_shots]
    make check-pages                      # the demo's two deck folders (after `make demo`)

Chromium comes from Debian's packages (`apt-get install -y chromium`); `--browser` or $CHROMIUM names another
binary. One browser serves every page, driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`,
standard library only). Per page, after the load event, the rendered document must show:
  - the shared stylesheet applied (core/foundation/report.py PAGE_CSS: body max-width 1200px) and a title;
  - no broken image (every <img> decoded, non-zero size), no page-wide horizontal scroll at 1280 px (wide
    tables scroll inside their own box instead) and no text-table row wrapped over 3+ lines (squeezed columns);
  - a step page (`<step>.html`, `<step>_<suffix>.html`) starts with its own step's section and holds no
    section of another step that has a page in the same folder;
  - index.html: its sections, and every link pointing at a page that exists.
A full-page PNG per page lands in --shots/<folder name>/ (look at them: tables, figures, cards).
Exit status 1 when a check fails, 2 when no browser or no page is found.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WIDTH = 1280
TALL_ROW_PX = 45  # a 13px table row with its padding: ~25px for one line, ~44px for two
MAX_SHOT_HEIGHT = 12_000  # px; longer pages are cut in the screenshot (the checks still see the whole page)
INDEX_SECTIONS = ("what happened", "funnel", "steps")  # the run report's first sections, in this order
# Step pages whose section is named differently from the step (the train task's deck is "training").
SECTION_ALIASES = {"train": ("training",)}
# Pages that are no single step's page.
NOT_STEP_PAGES = {"index", "run_summary"}

# Runs in the page after its load event; returns what the checks read (JSON-serialisable).
PAGE_PROBE = r"""
(() => {
  const de = document.documentElement;
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0))
                     .map(i => (i.getAttribute('src') || '').slice(0, 60));
  const cs = getComputedStyle(document.body);
  // rows of text tables (no image, code block or nested table; not a card's) taller than two lines: columns
  // squeezed to their narrowest words
  const tall = [...document.querySelectorAll('tr')].filter(r =>
      !r.closest('.card') && !r.querySelector('img, pre, table') && r.getBoundingClientRect().height > TALL_ROW_PX)
    .map(r => r.textContent.trim().replace(/\s+/g, ' ').slice(0, 60));
  return {
    title: document.title,
    sections: [...document.querySelectorAll('h2')].map(e => e.textContent.trim()),
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
    n_images: imgs.length, broken_images: broken,
    n_tables: document.querySelectorAll('table').length, tall_rows: tall,
    scroll_width: de.scrollWidth, client_width: de.clientWidth, height: de.scrollHeight,
    body_max_width: cs.maxWidth, font: cs.fontFamily,
  };
})()
"""


def find_browser(explicit: str | None = None) -> str | None:
    """The Chromium binary: `explicit`, $CHROMIUM, or the first of chromium / chromium-browser / google-chrome
    on PATH."""
    for cand in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


class Browser:
    """Headless Chromium driven over `--remote-debugging-pipe` (fd 3: commands in, fd 4: replies out; each
    message is JSON ended by a NUL byte), with one page target."""

    def __init__(self, binary: str, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="mmc-chromium-")
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        # The child sees our ends as fds 3 (read) and 4 (write); dup2 in preexec keeps them open in the child.
        # (copied above 10 first, so that neither lands on 3 or 4 before it is placed)
        def child_fds() -> None:
            import fcntl

            r, w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)
        self._log = open(os.path.join(self._profile, "chromium.log"), "wb")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
             f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, pass_fds=(3, 4),  # the numbers in the child, kept open after preexec_fn
            preexec_fn=child_fds,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self._events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            if time.time() > deadline:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (log: {self._log.name})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one DevTools command (to the page's session when `session`) and return its result."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.time() + self.timeout_s
        while True:
            for i, ev in enumerate(self._events):
                if ev.get("method") == method:
                    return self._events.pop(i)
            self._events.append(self._read(deadline))

    def render(self, url: str, shot: Path | None) -> dict[str, Any]:
        """Load `url` at WIDTH px, return PAGE_PROBE's result; write a full-page PNG to `shot`."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=900,
                  deviceScaleFactor=1, mobile=False)
        self._events.clear()
        nav = self.call("Page.navigate", session=True, url=url)
        if nav.get("errorText"):
            raise RuntimeError(f"{url}: {nav['errorText']}")
        self.wait_event("Page.loadEventFired")
        probe = self.call("Runtime.evaluate", session=True, returnByValue=True,
                          expression=PAGE_PROBE.replace("TALL_ROW_PX", str(TALL_ROW_PX)))
        if "exceptionDetails" in probe:
            raise RuntimeError(f"{url}: probe failed: {probe['exceptionDetails']}")
        facts = probe["result"]["value"]
        if shot is not None:
            h = max(1, min(int(facts["height"]), MAX_SHOT_HEIGHT))
            png = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": WIDTH, "height": h, "scale": 1})
            shot.parent.mkdir(parents=True, exist_ok=True)
            shot.write_bytes(base64.b64decode(png["data"]))
        return facts

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # already gone: nothing to close
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def own_sections(stem: str) -> set[str]:
    """Section names that open page `stem`'s own step: the page name, the part before `_<suffix>` of a
    suffixed page (`export_baseline` -> export, `train_ppl-0-90` -> train) and that step's SECTION_ALIASES."""
    names = {stem}
    if "_" in stem:
        names.add(stem.split("_", 1)[0])
    for n in list(names):
        names.update(SECTION_ALIASES.get(n, ()))
    return names


def check_facts(page: Path, facts: dict[str, Any], pages: set[str]) -> list[str]:
    """What is wrong with one rendered page (empty: nothing)."""
    problems = []
    stem = page.stem
    if not facts["title"]:
        problems.append("no <title>")
    if facts["body_max_width"] != "1200px":
        problems.append(f"shared stylesheet not applied (body max-width {facts['body_max_width']})")
    if facts["broken_images"]:
        problems.append(f"{len(facts['broken_images'])} broken image(s): {facts['broken_images'][:3]}")
    if facts["scroll_width"] > facts["client_width"] + 1:
        problems.append(f"page scrolls sideways at {WIDTH}px: content {facts['scroll_width']}px wide")
    if facts["tall_rows"]:
        problems.append(f"{len(facts['tall_rows'])} table row(s) wrap over 3+ lines (columns squeezed), e.g. "
                        f"{facts['tall_rows'][0]!r}")
    secs = facts["sections"]
    if not secs:
        problems.append("no section (<h2>)")
        return problems
    if stem == "index":
        if tuple(secs[: len(INDEX_SECTIONS)]) != INDEX_SECTIONS:
            problems.append(f"run report sections {secs[:4]}, expected to start with {list(INDEX_SECTIONS)}")
        for href in facts["links"]:
            target = href.split("#", 1)[0]
            if target and "://" not in target and not (page.parent / target).is_file():
                problems.append(f"link to a missing page: {href}")
        return problems
    if stem in NOT_STEP_PAGES:
        return problems
    own = own_sections(stem)
    others = set().union(*(own_sections(p) for p in pages - NOT_STEP_PAGES - {stem})) - own
    if secs[0] not in own:
        problems.append(f"starts with section {secs[0]!r}, not its own step ({' or '.join(sorted(own))})")
    foreign = [s for s in secs if s in others]
    if foreign:
        problems.append(f"holds sections of other steps: {foreign}")
    return problems


def check_folders(folders: list[Path], shots: Path | None, browser: str, quiet: bool = False) -> dict[str, Any]:
    """Render and check every page of `folders` (index.html first); returns {page path: {facts, problems}}."""
    report: dict[str, Any] = {}
    with Browser(browser) as b:
        for folder in folders:
            pages = sorted(folder.glob("*.html"), key=lambda p: (p.stem != "index", p.stem))
            names = {p.stem for p in pages}
            for page in pages:
                shot = shots / folder.parent.name / f"{page.stem}.png" if shots else None
                t0 = time.time()
                try:
                    facts = b.render(page.resolve().as_uri(), shot)
                    problems = check_facts(page, facts, names)
                except Exception as e:  # a page that does not render is a failed check, with the reason
                    facts, problems = {}, [f"did not render: {type(e).__name__}: {e}"]
                report[str(page)] = {"facts": facts, "problems": problems, "screenshot": str(shot) if shot else None}
                if not quiet:
                    status = "ok  " if not problems else "FAIL"
                    what = (f"sections={facts.get('sections', [])[:3]} images={facts.get('n_images')} "
                            f"tables={facts.get('n_tables')} height={facts.get('height')}px") if facts else ""
                    print(f"{status} {page} ({time.time() - t0:.1f}s) {what}")
                    for p in problems:
                        print(f"       - {p}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="deck folders (e.g. demo_out/run/decks)")
    ap.add_argument("--shots", type=Path, default=None, help="where to write one PNG per page (default: none)")
    ap.add_argument("--browser", default=None, help="Chromium binary (default: $CHROMIUM, chromium on PATH)")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-page facts and problems here")
    a = ap.parse_args(argv)
    browser = find_browser(a.browser)
    if browser is None:
        print("check_pages: no Chromium found; install it with `apt-get install -y chromium` (Debian/Ubuntu) "
              "or name one with --browser / $CHROMIUM", file=sys.stderr)
        return 2
    folders = [f for f in a.folders if f.is_dir() and any(f.glob("*.html"))]
    if len(folders) != len(a.folders):
        missing = [str(f) for f in a.folders if f not in folders]
        print(f"check_pages: no pages in {missing}; run `make demo` first", file=sys.stderr)
        return 2
    report = check_folders(folders, a.shots, browser)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    bad = {p: r["problems"] for p, r in report.items() if r["problems"]}
    print(f"check_pages: {len(report) - len(bad)}/{len(report)} pages ok"
          + (f"; screenshots in {a.shots}" if a.shots else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
