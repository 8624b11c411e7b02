"""Deck HTML for an evaluation: results table, score vs epoch, parse rates, failures and sample answers."""

from __future__ import annotations

from typing import Any

from core.report import figure_html, new_figure, page, table_html, text_html


def score_vs_epoch_html(summary: Any) -> str:
    """One line per benchmark: score against epoch (checkpoints without an epoch use their rank)."""
    ok = summary[summary["status"] == "ok"].copy()
    if ok.empty:
        return text_html("no successful (checkpoint, benchmark) pair to plot", "Score vs epoch")
    names = sorted(ok["checkpoint"].unique(), key=lambda c: (ok.loc[ok["checkpoint"] == c, "epoch"].iloc[0] is None, c))
    rank = {c: i for i, c in enumerate(names)}
    ok["x"] = [e if e == e and e is not None else rank[c] for e, c in zip(ok["epoch"], ok["checkpoint"], strict=True)]
    fig, ax = new_figure(6.5, 3.8)
    for bench, g in ok.groupby("benchmark"):
        g = g.sort_values("x")
        ax.plot(g["x"], g["score"], marker="o", label=f"{bench} ({g['metric'].iloc[0]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return figure_html(fig, "Score vs epoch")


def eval_report_html(summary: Any, table: Any, records: Any, n_examples: int = 3) -> str:
    """The whole evaluation deck."""
    parts = [table_html(table, "Results (score per checkpoint x benchmark; status ok | partial | failed)"),
             score_vs_epoch_html(summary),
             table_html(summary[["checkpoint_name", "benchmark", "metric", "score", "parse_rate", "n", "n_errors",
                                 "status", "error"]], "Per (checkpoint, benchmark)")]  # fmt: skip
    failed = summary[summary["status"] != "ok"]
    if not failed.empty:
        parts.append(table_html(failed[["checkpoint", "benchmark", "error"]], "Failed (checkpoint, benchmark) pairs"))
    if len(records):
        cols = ["checkpoint_name", "benchmark", "sample_id", "raw_output", "parsed_output", "parsing_success", "score",
                "error"]  # fmt: skip
        bad = records[(~records["parsing_success"].astype(bool)) | (records["error"] != "")]
        if len(bad):
            parts.append(table_html(bad[cols].head(50), "Failed samples (unparsable or errored; first 50)"))
        ex = records.groupby("benchmark", group_keys=False).head(n_examples)
        parts.append(table_html(ex[cols + ["prompt"]], f"Example answers ({n_examples} per benchmark)"))
    return page(*parts)
