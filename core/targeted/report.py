"""Deck HTML of targeted generation: subgroups with example questions, retrieval per subgroup with a
gallery, generation rejections by reason with raw outputs, and the filter funnel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from core.foundation.report import (
    esc,
    figure_html,
    image_html,
    new_figure,
    page,
    plot_text,
    plot_texts,
    table_html,
    text_html,
)


def _bar(counts: dict[str, int], title: str, xlabel: str = "count") -> str:
    if not counts:
        return text_html("(nothing to plot)", title)
    fig, ax = new_figure(6, 0.4 + 0.3 * len(counts))
    names = list(counts)  # data (subgroup names, reasons): escaped for mathtext, each its own category
    ax.barh(range(len(names)), [counts[n] for n in names])
    ax.set_yticks(range(len(names)), plot_texts(names))
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    return figure_html(fig, title)


def subgroups_html(ref: pd.DataFrame, n_examples: int = 5) -> str:
    """Subgroup sizes, exclusions by reason, example questions per subgroup."""
    from core.targeted.subgroups import subgroup_examples

    used = ref[ref["used"]]
    parts = [_bar(used.groupby("subgroup").size().to_dict(), "reference samples per subgroup"),
             table_html(ref[~ref["used"]].groupby("reason").size().rename("n").reset_index(), "excluded reference samples")]
    for g, ex in subgroup_examples(ref, n_examples).items():
        fam = used.loc[used["subgroup"] == g, "family"].iloc[0]
        parts.append(table_html(pd.DataFrame(ex), f"subgroup {g} (family {fam}): example questions"))
    return page(*parts)


def retrieval_html(got: pd.DataFrame, fetch: Callable[[list[str]], dict[str, Any]] | None = None, per_group: int = 6) -> str:
    """Retrieved images per subgroup, their similarity, and a gallery of the best ones."""
    parts = [_bar(got.groupby("subgroup").size().to_dict(), "retrieved pool images per subgroup")]
    if len(got):
        fig, ax = new_figure()
        for g, part in got.groupby("subgroup"):
            ax.hist(part["similarity"], bins=20, alpha=0.5, label=plot_text(g))
        ax.set_xlabel("cosine similarity to the subgroup's reference images")
        ax.legend()
        parts.append(figure_html(fig, "similarity of retrieved images"))
    if fetch is not None and len(got):
        top = got[got["rank"] < per_group]
        samples = fetch(top["pool_id"].tolist())
        for g, part in top.groupby("subgroup"):
            cells = [image_html(samples[r.pool_id].image_bytes[0], caption=f"{r.pool_id} sim {r.similarity:.3f}")
                     for r in part.itertuples() if r.pool_id in samples and samples[r.pool_id].image_bytes]
            parts.append(f"<h3>{esc(g)}</h3>" + "".join(cells))
    return page(*parts)


def generation_html(gens: pd.DataFrame, n_examples: int = 4) -> str:
    """Accepted share, rejections by reason, raw outputs per reason."""
    if gens.empty:
        return text_html("no generations", "generation")
    reasons = gens["reason"].replace("", "accepted").value_counts().to_dict()
    parts = [_bar(reasons, f"{len(gens)} generations: accepted and rejected by reason")]
    for r, part in gens.groupby(gens["reason"].replace("", "accepted")):
        parts.append(table_html(part.head(n_examples)[["gen_id", "subgroup", "raw", "conversations_json"]],
                                f"examples: {r}"))
    return page(*parts)


def funnel_html(summary: dict[str, Any]) -> str:
    """retrieved -> accepted by parsing -> after each filter -> exported."""
    g = summary.get("generation", {})
    stages = {"retrieved": summary.get("retrieved", g.get("n_retrieved", 0)), "parsed and valid": g.get("n_accepted", 0)}
    for step, c in summary.get("filters", {}).items():
        stages[f"after {step}"] = c["passed"]
    if "exported" in summary:
        stages["exported"] = summary["exported"]
    rows = [{"step": k, "reason": r, "n": n} for k, c in summary.get("filters", {}).items() for r, n in c["reasons"].items()]
    rows = [{"step": "tg_generate", "reason": r, "n": n} for r, n in g.get("rejected_by_reason", {}).items()] + rows
    return page(_bar(stages, "targeted generation funnel", "samples"), table_html(rows, "rejections by step and reason"))
