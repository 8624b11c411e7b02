"""Analysis of a soup score table: best subsets per benchmark, Pareto front, per-domain marginal contribution,
replays of greedy / beam / surrogate search on the measured table, and the deck."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.mixing.search import (
    Oracle,
    beam,
    greedy,
    heldout_error,
    marginal_contribution,
    pareto_front,
    surrogate_search,
)


def _subset(key: str) -> frozenset[str]:
    return frozenset(key.split("+"))


def analyze(table: Any, domains: Sequence[str], beam_width: int = 3, seed: int = 0) -> dict[str, Any]:
    """`table`: wide soup scores (index subset key `a+b`, columns benchmarks + `overall`)."""
    benches = [c for c in table.columns if c != "overall"]
    clean = table.dropna(subset=["overall"])
    best = {}
    for b in [*benches, "overall"]:
        col = clean[b].dropna()
        if len(col):
            k = max(col.index, key=lambda i: (col[i], -len(i.split("+")), i))
            best[b] = {"subset": k, "score": float(col[k]), "n_distinct_scores": int(col.nunique())}
    per_bench = {s: {b: float(clean.loc[s, b]) for b in benches} for s in clean.index if clean.loc[s, benches].notna().all()}
    front = ["+".join(sorted(s)) for s in pareto_front({_subset(k): v for k, v in per_bench.items()})]
    overall = {_subset(k): float(v) for k, v in clean["overall"].items()}
    marg = {b: marginal_contribution({_subset(k): float(v) for k, v in clean[b].dropna().items()}, domains)
            for b in [*benches, "overall"]}
    out: dict[str, Any] = {"best": best, "pareto_front": front, "marginal": marg, "n_soups": int(len(clean))}
    complete = len(overall) == 2 ** len(domains) - 1
    if complete:  # replay the cheaper strategies on the measured table: how close, with how many evaluations
        opt = max(overall.values())
        rep = {}
        for name, fn in [("greedy", lambda o: greedy(domains, o)), ("beam", lambda o: beam(domains, o, beam_width)),
                         ("surrogate", lambda o: surrogate_search(domains, o, seed=seed))]:
            r = fn(Oracle.from_table(overall))
            rep[name] = {"best": "+".join(sorted(r.best)), "score": r.score, "gap_to_optimum": opt - r.score,
                         "n_evals": r.n_evals, "rounds": r.rounds, "evals_to_optimum": r.evals_to_reach(opt)}
        out["replay"] = rep
        out["optimum"] = opt
    subs = list(overall)
    out["surrogate_heldout"] = heldout_error(subs, [overall[s] for s in subs], list(domains), seed=seed)
    return out


def mixing_report_html(table: Any, domains: Sequence[str], result: dict[str, Any], proxy: Any | None = None,
                       extra: dict[str, Any] | None = None) -> str:
    """Deck: subset x benchmark heatmap, score vs number of domains, per-domain marginal contribution, tables."""
    import pandas as pd

    from core.foundation.report import figure_html, new_figure, page, plot_texts, table_html

    parts = []
    if extra:
        parts.append(table_html([{"key": k, "value": str(v)} for k, v in extra.items()], "Run"))
    t = table.sort_values("overall", ascending=False)
    fig, ax = new_figure(max(5.0, 0.9 * len(t.columns) + 2), max(3.0, 0.22 * len(t) + 1))
    vals = t.to_numpy(dtype=float)
    # each column scaled to [0, 1] so benchmarks on different scales share one colour map
    lo, hi = np.nanmin(vals, axis=0), np.nanmax(vals, axis=0)
    scaled = (vals - lo) / np.where(hi > lo, hi - lo, 1.0)
    im = ax.imshow(scaled, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(t.columns)), plot_texts(t.columns), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(t)), plot_texts(t.index), fontsize=6)
    fig.colorbar(im, ax=ax, label="score (per-column min-max)")
    parts.append(figure_html(fig, "Subset x benchmark (sorted by overall)"))
    fig, ax = new_figure(6, 3.5)
    n = [len(i.split("+")) for i in t.index]
    ax.scatter(n, t["overall"], alpha=0.7)
    means = pd.Series(list(t["overall"]), index=n).groupby(level=0).mean()
    ax.plot(means.index, means.values, "r-", label="mean")
    ax.set_xlabel("domains in the soup")
    ax.set_ylabel("overall score")
    ax.legend()
    parts.append(figure_html(fig, "Score vs number of domains"))
    marg = result["marginal"]["overall"]
    fig, ax = new_figure(6, 3)
    ax.bar(range(len(marg)), [marg[d] for d in marg])
    ax.set_xticks(range(len(marg)), plot_texts(marg))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("mean(with) - mean(without)")
    parts.append(figure_html(fig, "Per-domain marginal contribution (overall)"))
    parts.append(table_html([{"benchmark": b, **v} for b, v in result["best"].items()], "Best subset per benchmark"))
    parts.append(table_html([{"subset": s} for s in result["pareto_front"]], "Pareto front (per-benchmark scores)"))
    if "replay" in result:
        parts.append(table_html([{"strategy": k, **v} for k, v in result["replay"].items()],
                                f"Search strategies replayed on the measured table (optimum {result['optimum']:.4f})"))
    he = result["surrogate_heldout"]
    parts.append(table_html([he], "Surrogate (ridge, indicators + pairs) k-fold held-out error"))
    if proxy is not None:
        parts.append(table_html(proxy, "Proof of the proxy: Spearman(soup score, trained-mixture score), 95% bootstrap interval over mixtures"))
    parts.append(table_html(t.reset_index(names="subset").round(4), "All soups"))
    return page(*parts)


def finite(x: float) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
