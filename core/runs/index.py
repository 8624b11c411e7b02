"""The run report page, `decks/index.html`: where a person starts after a run.

What happened (the summary sentence), the funnel of samples through the steps (plot), one card per step with
its counts and top reasons linking to the step's own page, known-bad recall when ids were given, other pages,
the config and the code version. Flyte-free; `tasks/run_report.py` writes it beside the step pages it collects.
Every data-derived string is escaped (`core.foundation.report.esc` / `plot_text`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import pandas as pd

from core.foundation.report import esc, figure_html, html_page, new_figure, plot_texts, table_html

INDEX_PAGE = "index"
TOP_REASONS = 3


def page_href(name: str) -> str:
    """Relative link to the page `<name>.html` beside the index (URL-quoted, then HTML-escaped)."""
    return esc(quote(f"{name}.html"))


def funnel_html(counts: pd.DataFrame, source_records: int | None = None) -> str:
    """Samples through the steps: one bar per step, what entered it (grey) and what it passed on (green)."""
    if counts.empty:
        return "<p><i>no step ran</i></p>"
    steps = list(counts["step"])
    inputs = counts["inputs"].astype(int).tolist()
    passed = (counts["kept"] + counts["modified"]).astype(int).tolist()
    labels = (["source"] if source_records is not None else []) + steps
    fig, ax = new_figure(7, 0.5 + 0.42 * len(labels))
    y = list(range(len(labels)))
    off = 1 if source_records is not None else 0
    top = max([source_records or 0] + inputs + [1])
    if source_records is not None:
        ax.barh([0], [source_records], color="#8ab")
        ax.text(source_records + top * 0.01, 0, f"{source_records} records", va="center", fontsize=8)
    ax.barh(y[off:], inputs, color="#ddd", label="entered the step")
    ax.barh(y[off:], passed, color="#4a8", label="passed on")
    for yi, p, n in zip(y[off:], passed, inputs):
        ax.text(max(p, n) + top * 0.01, yi, f"{p} / {n}", va="center", fontsize=8)
    ax.set_yticks(y, plot_texts(labels))
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel("samples")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)  # above the bars
    return figure_html(fig, "samples through the steps (passed on / entered)")


# Which reasons a card shows first: what the step removed, then what it rewrote, then notes on kept samples.
_DECISION_RANK = {"drop": 0, "quarantine": 0, "modify": 1, "keep": 2}


def _reasons_of(reasons: pd.DataFrame, step: str, n: int = TOP_REASONS) -> list[dict[str, Any]]:
    if reasons.empty:
        return []
    r = reasons[reasons["step"] == step]
    r = r.assign(_rank=r["decision"].map(_DECISION_RANK).fillna(3))
    r = r.sort_values(["_rank", "count", "reason"], ascending=[True, False, True]).head(n)
    return [{"decision": x["decision"], "reason": x["reason"], "n": int(x["count"])} for x in r.to_dict("records")]


def step_card(row: Mapping[str, Any], reasons: Sequence[Mapping[str, Any]], page: str | None) -> str:
    """One step: its name (linking to its page when it has one), counts, top reasons."""
    name = esc(row["step"])
    head = f'<a href="{page_href(page)}">{name}</a>' if page else name
    counts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(row[k])}</td></tr>"
                     for k in ("inputs", "kept", "modified", "dropped", "quarantined"))
    body = f"<table>{counts}</table>"
    if reasons:
        body += "<div class='muted'>top reasons</div><table>" + "".join(
            f"<tr><td>{esc(r['decision'])}</td><td>{esc(r['reason'])}</td><td>{esc(r['n'])}</td></tr>"
            for r in reasons) + "</table>"
    link = "" if page else "<div class='muted'>no deck page</div>"
    return f'<div class="card"><h3>{head}</h3>{body}{link}</div>'


def run_index_html(summary: Mapping[str, Any], counts: pd.DataFrame, reasons: pd.DataFrame, pages: Sequence[str],
                   config: Mapping[str, Any] | None = None, code: Mapping[str, Any] | None = None) -> str:
    """The whole index page.

    :param summary: the run summary (summary.json: `sentence`, `final_samples`, `source_accounting`, `known_bad`).
    :param counts: per-step counts (step, inputs, kept, modified, dropped, quarantined), pipeline order.
    :param reasons: decisions with a reason (step, decision, reason, count).
    :param pages: names of the deck pages beside the index (`<name>.html`), e.g. every step's and run_summary.
    :param config: the run's config (JSON-able), shown as JSON.
    :param code: the code version (name -> value), shown as a table.
    """
    page_set = [p for p in pages if p != INDEX_PAGE]
    acc = summary.get("source_accounting") or {}
    parts = [f"<section><h2>what happened</h2><p>{esc(summary.get('sentence', ''))}</p></section>",
             f"<section><h2>funnel</h2>{funnel_html(counts, acc.get('source_records'))}</section>"]
    cards = []
    for row in counts.to_dict("records"):
        page = row["step"] if row["step"] in page_set else None
        cards.append(step_card(row, _reasons_of(reasons, row["step"]), page))
    parts.append(f"<section><h2>steps</h2><div class='cards'>{''.join(cards)}</div></section>")
    known_bad = summary.get("known_bad")
    if known_bad is not None:
        parts.append("<section><h2>known-bad recall</h2>"
                     + table_html(known_bad["per_step"], f"{known_bad['n_ids']} known-bad ids: what each step did")
                     + "</section>")
    steps = set(counts["step"]) if len(counts) else set()
    others = [p for p in page_set if p not in steps]
    if others:
        links = "".join(f'<li><a href="{page_href(p)}">{esc(p)}</a></li>' for p in others)
        parts.append(f"<section><h2>other pages</h2><ul>{links}</ul></section>")
    if config is not None:
        text = json.dumps(config, indent=1, sort_keys=True, default=str)
        parts.append(f"<section><h2>config</h2><details><summary>{esc(len(text.splitlines()))} lines of JSON"
                     f"</summary><pre>{esc(text)}</pre></details></section>")
    if code:
        parts.append("<section><h2>code version</h2>" + table_html([dict(code)]) + "</section>")
    return html_page("mmcurate run report", "\n".join(parts))
