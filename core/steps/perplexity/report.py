"""Deck HTML for the perplexity step and the slice step (Flyte-free; tasks wrap it in a Deck)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from core.foundation.report import esc, figure_html, new_figure, page, table_html, text_html


def score_report_html(out: str | os.PathLike, summary: dict[str, Any], n_examples: int = 5) -> str:
    """Perplexity histogram (log x), scored-token histogram, summary, highest/lowest perplexity examples."""
    from core.steps.perplexity.pipeline import read_scores

    df = read_scores(out)
    ok = df[df.n_scored > 0]
    parts = [table_html([{k: v for k, v in summary.items() if not isinstance(v, dict)}], "summary")]
    if summary.get("batching"):
        parts.append(table_html([summary["batching"]], "batching (this run): padding waste, tokens/s"))
    if summary.get("reasons"):
        parts.append(table_html([{"reason": k, "count": v} for k, v in summary["reasons"].items()], "quarantined"))
    if len(ok):
        fig, ax = new_figure()
        lo, hi = max(ok.ppl.min(), 1e-3), max(ok.ppl.max(), ok.ppl.min() * 1.01, 1.01)
        ax.hist(ok.ppl, bins=np.geomspace(lo, hi, 40))
        ax.set_xscale("log")
        ax.set_xlabel("perplexity (log scale)")
        ax.set_ylabel("samples")
        for p in (10, 50, 90):
            ax.axvline(np.percentile(ok.ppl, p), ls="--", c="k", lw=0.8)
        parts.append(figure_html(fig, "perplexity (dashed: p10, p50, p90)"))
    fig, ax = new_figure()
    ax.hist(df.n_scored, bins=40)
    ax.set_xlabel("scored tokens per sample")
    ax.set_ylabel("samples")
    parts.append(figure_html(fig, "scored tokens"))
    if len(ok):
        fig, ax = new_figure()
        ax.scatter(ok.n_scored, ok.ppl, s=6, alpha=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("scored tokens")
        ax.set_ylabel("perplexity")
        parts.append(figure_html(fig, "perplexity vs scored tokens (few-token samples are noisy: see shrink_tokens)"))
    srt = ok.sort_values("ppl")
    for title, rows in (("highest perplexity", srt.tail(n_examples)[::-1]), ("lowest perplexity", srt.head(n_examples))):
        parts.append(f"<h3>{esc(title)}</h3>")
        for r in rows.itertuples():
            parts.append(text_html(r.preview, f"{r.sample_id}  ppl={r.ppl:.4g}  scored={r.n_scored}"
                                   f"{'  (truncated)' if r.truncated else ''}"))
    return page(*parts)


def slice_report_html(out: str | os.PathLike, result: dict[str, Any]) -> str:
    """Slice sizes and perplexity ranges (slices mode) or the kept range and drop counts (range mode)."""
    import pandas as pd

    from core.foundation.ledger import read_ledger, step_dir
    from core.steps.perplexity.slices import STEP

    led = read_ledger(step_dir(out, STEP))
    fig, ax = new_figure()
    ppl = led.score.to_numpy()
    ppl = ppl[np.isfinite(ppl) & (ppl > 0)]
    if len(ppl):
        ax.hist(ppl, bins=np.geomspace(ppl.min(), max(ppl.max(), ppl.min() * 1.01), 40))
        ax.set_xscale("log")
    ax.set_xlabel("perplexity (log scale)")
    ax.set_ylabel("samples")
    if result["mode"] == "range":
        for x in (result["ppl_low"], result["ppl_high"]):
            ax.axvline(x, c="r", lw=1)
        head = table_html([{k: v for k, v in result.items() if not isinstance(v, dict)} | result["counts"]], "range")
        reasons = table_html(pd.DataFrame([{"reason": k, "count": v} for k, v in result["reasons"].items()]), "drops")
        return page(head, reasons, figure_html(fig, "perplexity with kept range (red)"))
    for s in result["slices"][1:]:
        if s["ppl_min"] is not None:
            ax.axvline(s["ppl_min"], c="r", lw=0.6)
    return page(table_html(result["slices"], "slices (00 = lowest perplexity)"),
                figure_html(fig, "perplexity with slice boundaries (red)"))
