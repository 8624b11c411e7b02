"""Small HTML building blocks for Flyte Decks and standalone reports (matplotlib figures, tables, images).

Flyte-free: tasks pass the returned HTML strings to `flytekit.Deck`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any


def figure_html(fig: Any, title: str = "", dpi: int = 90) -> str:
    """Render a matplotlib figure to an inline base64 PNG <img> and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    head = f"<h3>{html.escape(title)}</h3>" if title else ""
    return f'{head}<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def new_figure(width: float = 6.0, height: float = 3.5) -> tuple[Any, Any]:
    """A (fig, ax) pair on the non-interactive Agg backend (safe on headless workers)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def image_html(data: bytes, max_px: int = 160, caption: str = "") -> str:
    """An encoded image (any PIL-readable bytes) as an inline thumbnail with an optional caption; decoded
    through the project's checks (core.images.decode_image), so a decompression bomb is not decoded."""
    from core.images import decode_image

    try:
        im = decode_image(data)
        im.thumbnail((max_px, max_px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        tag = f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'
    except Exception as e:  # a thumbnail must never sink a report; say why it is missing
        tag = f"<i>[image not renderable: {html.escape(getattr(e, 'reason', '') or type(e).__name__)}]</i>"
    cap = f"<br/><small>{html.escape(caption)}</small>" if caption else ""
    return f'<div style="display:inline-block;margin:4px;vertical-align:top">{tag}{cap}</div>'


def table_html(rows: Sequence[Mapping[str, Any]] | Any, title: str = "", max_rows: int = 200) -> str:
    """A list of dicts or a pandas DataFrame as an HTML table (escaped, truncated to max_rows)."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    head = f"<h3>{html.escape(title)}</h3>" if title else ""
    more = f"<p><i>{len(df) - max_rows} more rows not shown</i></p>" if len(df) > max_rows else ""
    return head + df.head(max_rows).to_html(index=False, escape=True, float_format=lambda x: f"{x:.4g}") + more


def text_html(text: str, title: str = "") -> str:
    """Preformatted, escaped text block (sample conversations, logs)."""
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    return f'{head}<pre style="white-space:pre-wrap;max-width:900px">{html.escape(text)}</pre>'


def page(*parts: str) -> str:
    """Join report parts into one HTML fragment."""
    return "\n".join(parts)


DECKS_DIR = "decks"


def deck_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A standalone HTML page of deck sections `(name, html)` (what Flyte shows as one task's decks)."""
    body = "\n".join(f"<section><h2>{html.escape(name)}</h2>\n{part}\n</section>" for name, part in sections)
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


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
