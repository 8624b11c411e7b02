"""Deck HTML for an evaluation: results table, score vs step per variant, parse rates, failures and sample
answers."""

from __future__ import annotations

from typing import Any

from core.foundation.report import figure_html, new_figure, page, plot_text, table_html, text_html


def _x_axis(ok: Any) -> tuple[list[float], str]:
    """Training position of each row: the global step when every checkpoint has one, else the epoch when
    every one has one, else the checkpoint's rank within its variant."""
    def known(col: str) -> bool:
        return bool(ok[col].notna().all())

    if known("step"):
        return [float(v) for v in ok["step"]], "step"
    if known("epoch"):
        return [float(v) for v in ok["epoch"]], "epoch"
    rank = {c: i for i, c in enumerate(sorted(ok["checkpoint"].unique()))}
    return [float(rank[c]) for c in ok["checkpoint"]], "checkpoint (rank)"


def score_vs_step_html(summary: Any) -> str:
    """One panel per benchmark, one line per variant: reference score (with lmms-eval's stderr as error
    bars) against the checkpoint's global step (epoch when steps are unknown)."""
    ok = summary[summary["status"] == "ok"].copy()
    if ok.empty:
        return text_html("no successful (checkpoint, benchmark) pair to plot", "Score vs step")
    ok["x"], xlabel = _x_axis(ok)
    benches = sorted(ok["benchmark"].unique())
    fig, axes = new_figure(4.0 * min(len(benches), 3), 3.2 * ((len(benches) + 2) // 3))
    fig.clf()
    ncol = min(len(benches), 3)
    for k, bench in enumerate(benches):
        ax = fig.add_subplot((len(benches) + 2) // 3, ncol, k + 1)
        g = ok[ok["benchmark"] == bench]
        for variant, v in g.groupby("variant", sort=True):
            v = v.sort_values("x")
            err = v["score_stderr"].astype(float).fillna(0.0) if "score_stderr" in v else None
            ax.errorbar(v["x"], v["score"], yerr=err, marker="o", capsize=2, label=plot_text(variant or "(no variant)"))
        ax.set_title(plot_text(f"{bench} ({g['metric'].iloc[0]})"), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")  # labels escaped by plot_text
    fig.tight_layout()
    return figure_html(fig, f"Score vs {xlabel} (one line per variant)")


def eval_report_html(summary: Any, table: Any, records: Any, n_examples: int = 3) -> str:
    """The whole evaluation deck."""
    parts = [table_html(table, "Results (score per checkpoint x benchmark; status ok | partial | failed)"),
             score_vs_step_html(summary),
             table_html(summary[["checkpoint_name", "variant", "step", "epoch", "benchmark", "metric", "score",
                                 "score_stderr", "lenient_metric", "lenient_score", "parse_rate", "n", "n_errors",
                                 "status", "error"]], "Per (checkpoint, benchmark); score = reference scoring")]  # fmt: skip
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
