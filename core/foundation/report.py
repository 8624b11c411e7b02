"""Small HTML building blocks for Flyte Decks and standalone reports (matplotlib figures, tables, images).

Flyte-free: tasks pass the returned HTML strings to `flytekit.Deck`.

Every string that comes from the data (sample ids, sources, subgroup names, reasons, variant and domain names)
is escaped where it is written: `esc` for HTML (the decks are shown in the Flyte console: unescaped data is
stored XSS), `plot_text` for matplotlib text (labels, legends, tick labels), which otherwise parses `$...$` as
mathtext: an undefined macro in a sample's `source` raised while saving the figure, after all of a step's work.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)


def esc(value: Any) -> str:
    """`value` as text safe inside HTML element content and quoted attributes (`html.escape`, quotes too)."""
    return html.escape(str(value), quote=True)


def plot_text(value: Any) -> str:
    """`value` as matplotlib text that renders literally: every `$` escaped as `\\$`.

    With `usetex` off (`figure_html` forces it off), matplotlib treats text as mathtext only when it holds an
    unescaped `$`; text without one is drawn as written after turning `\\$` back into `$`. So escaping `$` alone
    reproduces any string exactly, backslashes included (escaping those too would draw them doubled). Use it
    on every label, legend entry, title and category (tick label) that comes from data; the figure's own
    numeric tick labels keep mathtext (log axes draw `10^2` with it).
    """
    return str(value).replace("$", r"\$")


def plot_texts(values: Any) -> list[str]:
    """`plot_text` of each value (categories for `bar`/`barh`, tick labels)."""
    return [plot_text(v) for v in values]


def figure_html(fig: Any, title: str = "", dpi: int = 90) -> str:
    """Render a matplotlib figure to an inline base64 PNG <img> and close it.

    TeX is off for every text of the figure whatever the user's matplotlibrc says (`plot_text` escapes for
    mathtext, not for TeX). Should a data string reach a label unescaped and fail to parse as mathtext, the
    figure is drawn again with every text literal (and a warning naming the error) rather than sinking the
    report after the step's work is done.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    def save(**rc: Any) -> bytes:
        buf = io.BytesIO()
        with matplotlib.rc_context({"text.usetex": False, **rc}):  # ticks made while drawing read these
            for t in fig.findobj(Text):
                t.set_usetex(False)
                if rc.get("text.parse_math") is False:
                    t.set_parse_math(False)
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return buf.getvalue()

    try:
        try:
            png = save()
        except ValueError as e:  # mathtext's ParseFatalException is a ValueError
            log.warning("figure %r: a label did not parse as mathtext (%s); drawn with all text literal",
                        title, str(e).splitlines()[0] if str(e) else type(e).__name__)
            png = save(**{"text.parse_math": False})
    finally:
        plt.close(fig)
    head = f"<h3>{esc(title)}</h3>" if title else ""
    return f'{head}<img src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def new_figure(width: float = 6.0, height: float = 3.5) -> tuple[Any, Any]:
    """A (fig, ax) pair on the non-interactive Agg backend (safe on headless workers)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def image_html(data: bytes, max_px: int = 160, caption: str = "") -> str:
    """An encoded image (any PIL-readable bytes) as an inline thumbnail with an optional caption; decoded
    through the project's checks (core.io.images.decode_image), so a decompression bomb is not decoded."""
    from core.io.images import decode_image

    try:
        im = decode_image(data)
        im.thumbnail((max_px, max_px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        tag = f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'
    except Exception as e:  # a thumbnail must never sink a report; say why it is missing
        tag = f"<i>[image not renderable: {esc(getattr(e, 'reason', '') or type(e).__name__)}]</i>"
    cap = f"<br/><small>{esc(caption)}</small>" if caption else ""
    return f'<div style="display:inline-block;margin:4px;vertical-align:top">{tag}{cap}</div>'


def table_html(rows: Sequence[Mapping[str, Any]] | Any, title: str = "", max_rows: int = 200) -> str:
    """A list of dicts or a pandas DataFrame as an HTML table (escaped, truncated to max_rows)."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    head = f"<h3>{esc(title)}</h3>" if title else ""
    more = f"<p><i>{len(df) - max_rows} more rows not shown</i></p>" if len(df) > max_rows else ""
    return head + df.head(max_rows).to_html(index=False, escape=True, float_format=lambda x: f"{x:.4g}") + more


def text_html(text: str, title: str = "") -> str:
    """Preformatted, escaped text block (sample conversations, logs)."""
    head = f"<h4>{esc(title)}</h4>" if title else ""
    return f'{head}<pre style="white-space:pre-wrap;max-width:900px">{esc(text)}</pre>'


def page(*parts: str) -> str:
    """Join report parts into one HTML fragment."""
    return "\n".join(parts)


DECKS_DIR = "decks"


# One small stylesheet for every standalone page (inline: a page is one file that opens anywhere, offline).
# Tables are their own horizontal scroll box (the page never scrolls sideways) and their cells do not wrap: a
# table wider than the page otherwise gets every column at its narrowest (ids broken over lines, rows three
# lines tall; seen in headless Chromium, scripts/check_pages.py). Card tables fit their card; their reason column wraps.
PAGE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0 auto;max-width:1200px;
 padding:12px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;padding-top:8px;border-top:2px solid #dde}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:14px;margin:12px 0 4px}
nav{font-size:13px;color:#555;margin-bottom:8px}a{color:#1a5fb4}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px;display:block;overflow-x:auto;max-width:100%;
 width:max-content;border:0}
th,td{border:1px solid #ccd;padding:3px 8px;text-align:left;vertical-align:top;white-space:nowrap}
th{background:#f0f2f7;position:sticky;top:0}tr:nth-child(even) td{background:#fafbfd}
img{max-width:100%;height:auto}pre{background:#f6f7f9;border:1px solid #e3e5ea;padding:6px 8px;font-size:12px}
section{margin-bottom:12px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ccd;border-radius:6px;padding:8px 12px;min-width:220px;flex:1 1 240px;background:#fcfcfe}
.card h3{margin:0 0 4px}.card table{font-size:12px;display:table;width:100%}
.card td:nth-child(2):not(:last-child){white-space:normal;overflow-wrap:anywhere;width:100%}
.muted{color:#666;font-size:12px}
"""


def html_page(title: str, body: str, nav: str = "") -> str:
    """A standalone HTML document: `title` (escaped), the shared stylesheet, an optional nav line (HTML),
    then `body` (HTML whose data strings are already escaped)."""
    nav_html = f"<nav>{nav}</nav>\n" if nav else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{PAGE_CSS}</style></head>\n<body>{nav_html}<h1>{esc(title)}</h1>\n{body}\n</body></html>\n")


def deck_page(title: str, sections: Sequence[tuple[str, str]], nav: str = "") -> str:
    """A standalone HTML page of deck sections `(name, html)` (what Flyte shows as one task's decks)."""
    body = "\n".join(f"<section><h2>{esc(name)}</h2>\n{part}\n</section>" for name, part in sections)
    return html_page(title, body, nav)


def collect_decks(dirs: Sequence[str], dest: str, suffixes: Sequence[str] | None = None) -> dict[str, str]:
    """Copy every `<dir>/decks/*.html` (dir: path or fsspec URL) into the local folder `dest`.

    Names are kept (`<step>.html`, or `<step>_<suffix>.html` with `suffixes[i]` for `dirs[i]`); a second
    page of the same name gets `-2`, `-3`. A dir without decks is skipped. Returns page name -> copied
    path, in the order found.
    """
    import os

    import fsspec

    os.makedirs(dest, exist_ok=True)
    found: dict[str, str] = {}
    for i, d in enumerate(dirs):
        fs, root = fsspec.core.url_to_fs(d)
        pattern = root.rstrip("/") + f"/{DECKS_DIR}/*.html"
        for src in sorted(fs.glob(pattern)):
            stem = os.path.splitext(os.path.basename(src))[0]
            if suffixes and suffixes[i]:
                stem = f"{stem}_{suffixes[i]}"
            name, k = stem, 1
            while name in found:
                k += 1
                name = f"{stem}-{k}"
            target = os.path.join(dest, f"{name}.html")
            fs.get_file(src, target)
            found[name] = target
    return found


def paths_block(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """`title` then one `  label  path` line per row (the end-of-run listing of where things are)."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join([title] + [f"  {label:<{width}}  {path}" for label, path in rows])
