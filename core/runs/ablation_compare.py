"""Ablation comparison: what each variant's export holds (samples, tokens, known-bad ids), the variant x
benchmark table of the final checkpoints with deltas vs the baseline, the paired comparison of every variant with
the baseline over the same eval items (95% interval, `significant`; core/evals/paired.py) against the seed-to-seed
noise floor of the baseline, its files and its deck page.

Flyte-free; `tasks/ablation.py:compare_variants` wraps `compare_variants` and `comparison_html`;
`python -m core.runs.ablation_compare <comparison dir>` prints the paired table (what `make demo` shows).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Per-item metrics compared with the baseline: record column -> (name in the tables, higher is better).
# `score` is the published (reference) metric of each benchmark; the others are the early signals.
PAIRED_METRICS = {"score": ("score", True), "answer_nll": ("answer_nll", False), "mc_correct": ("mc_acc", True),
                  "mc_gold_prob": ("mc_gold_prob", True)}
POOLED = "all"  # the benchmark name of answer_nll pooled over every benchmark's items (same unit everywhere)
SEED_SUFFIX = "-seed"  # extra baseline runs are named baseline-seed1, baseline-seed2, ...


def seed_run_name(k: int) -> str:
    """The run name of the baseline trained with seed offset k (k >= 1)."""
    return f"baseline{SEED_SUFFIX}{k}"


@dataclass
class ExportCounts:
    """One variant's export: sample and token counts, and the ids it holds."""

    n_samples: int
    n_tokens: int
    ids: set[str]


def count_export(root: str, tokenizer: Any = None) -> ExportCounts:
    """Samples and tokens of the export under `root` (`<root>/shards/*.tar`): tokens of every turn joined by
    newlines, with `tokenizer` (a transformers tokenizer) or characters/4 without one."""
    from core.io.wds import iter_samples, list_shards

    n_samples = n_tokens = 0
    ids = set()
    for s in iter_samples(list_shards(os.path.join(root, "shards")), load_images=False, verify_images=False):
        text = "\n".join(t.value for t in s.conversations)
        n_tokens += len(tokenizer(text)["input_ids"]) if tokenizer is not None else len(text) // 4
        n_samples += 1
        ids.add(s.id)
    return ExportCounts(n_samples, n_tokens, ids)


def comparison_table(variants: Sequence[str], checkpoints: Sequence[Sequence[str]], summary, counts: Sequence[dict]):
    """variant x benchmark table of the final checkpoint's scores, with deltas vs `baseline`.

    :param variants: variant specs, in grid order.
    :param checkpoints: per variant, its checkpoint URIs in epoch order (the last one is compared).
    :param summary: the evaluation summary DataFrame (checkpoint, benchmark, score, parse_rate, status, ...).
    :param counts: per variant {"n_samples", "n_tokens"}.
    :return: (wide DataFrame: variant, n_samples, n_tokens, <bench>, <bench>_delta..., long DataFrame of all epochs)
    """
    import pandas as pd

    owner = {c: v for v, cks in zip(variants, checkpoints) for c in cks}
    last = {cks[-1]: v for v, cks in zip(variants, checkpoints) if cks}
    long = summary.copy()
    long["variant"] = long["checkpoint"].map(owner)
    final = long[long["checkpoint"].isin(last)]
    wide = final.pivot_table(index="variant", columns="benchmark", values="score", aggfunc="first")
    benches = sorted(wide.columns)
    rows = []
    for v, c in zip(variants, counts):
        row = {"variant": v, "n_samples": int(c.get("n_samples", 0)), "n_tokens": int(c.get("n_tokens", 0))}
        for b in benches:
            row[b] = float(wide.loc[v, b]) if v in wide.index and pd.notna(wide.loc[v, b]) else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if "baseline" in set(variants):
        base = table[table["variant"] == "baseline"].iloc[0]
        for b in benches:
            table[f"{b}_delta"] = table[b] - base[b]
        table["tokens_vs_baseline"] = table["n_tokens"] / max(int(base["n_tokens"]), 1)
    if benches:
        table["mean_score"] = table[benches].mean(axis=1)
    return table, long


@dataclass
class Comparison:
    """The comparison's tables: `table` (one row per variant, final checkpoint), `long` (every
    (checkpoint, benchmark) summary row with its variant) and `paired` (per variant x benchmark x metric: the
    paired difference to the baseline with its interval, p-value, `significant`, the noise floor and a verdict)."""

    table: Any  # pandas DataFrame
    long: Any
    paired: Any = field(default=None)


def final_records(eval_dir: str, runs: Sequence[str], checkpoints: Sequence[Sequence[str]]) -> Any:
    """The per-item records of each run's final checkpoint (`records.parquet` of the evaluation), with a `run`
    column; empty when the evaluation wrote no records."""
    import pandas as pd

    path = os.path.join(eval_dir, "records.parquet")
    if not os.path.exists(path):
        return pd.DataFrame(columns=["run", "benchmark", "sample_id"])
    recs = pd.read_parquet(path)
    last = {cks[-1]: r for r, cks in zip(runs, checkpoints) if cks}
    recs = recs[recs["checkpoint"].isin(last)].copy()
    recs["run"] = recs["checkpoint"].map(last)
    return recs


def _item_values(recs: Any, run: str, bench: str, col: str) -> Any:
    """One run's per-item values of a record column (indexed by sample_id; pooled over benchmarks for POOLED)."""
    import pandas as pd

    r = recs[recs["run"] == run]
    if bench != POOLED:
        r = r[r["benchmark"] == bench]
    if col not in r.columns:
        return pd.Series(dtype=float)
    return pd.Series(pd.to_numeric(r[col], errors="coerce").to_numpy(dtype=float),
                     index=(r["benchmark"] + "/" + r["sample_id"]).to_numpy())


def _verdict(row: dict[str, Any], has_noise: bool) -> str:
    """Significant and outside the noise floor is what a decision can rest on; everything else says why not."""
    if row["n"] == 0:
        return "no paired items"
    if not row["significant"]:
        return "not significant"
    if not has_noise:
        return "significant (no noise floor: one baseline seed)"
    if abs(row["delta"]) <= row["noise"]:
        return "within noise"
    return "significant, outside noise: " + ("better" if row["better"] else "worse")


def paired_comparison(variants: Sequence[str], checkpoints: Sequence[Sequence[str]], eval_dir: str,
                      seed_checkpoints: Sequence[Sequence[str]] = (), val_losses: dict[str, float] | None = None,
                      seed: int = 0) -> Any:
    """Per variant x benchmark x metric: the paired difference `variant - baseline` over the items both final
    checkpoints were scored on (core/evals/paired.py: sign-flip permutation test, 95% interval, `significant`),
    beside the noise floor: the spread (max - min) of the metric's mean over the baseline's seeds (the `baseline`
    run and `seed_checkpoints`, each seed's own row vs `baseline` included). `within_noise` marks a delta no larger
    than that spread. Benchmark `all` pools answer_nll over every benchmark's items. `val_losses` (run -> final
    held-out training loss) adds benchmark `heldout`: its delta and noise floor, no interval (each run holds out
    its own samples, so the losses are not paired). Empty without a baseline."""
    import pandas as pd

    from core.evals.paired import paired_test

    cols = ["variant", "benchmark", "metric", "higher_is_better", "n", "baseline", "value", "delta", "ci_lo",
            "ci_hi", "p_value", "significant", "noise", "n_seeds", "within_noise", "better", "verdict", "test"]
    if "baseline" not in variants:
        return pd.DataFrame(columns=cols)
    seeds = [seed_run_name(k + 1) for k in range(len(seed_checkpoints))]
    runs = list(variants) + seeds
    recs = final_records(eval_dir, runs, list(checkpoints) + list(seed_checkpoints))
    benches = sorted(set(recs["benchmark"])) if len(recs) else []
    cells = [(b, col) for b in benches for col in PAIRED_METRICS] + ([(POOLED, "answer_nll")] if benches else [])
    rows = []
    for bench, col in cells:
        name, hib = PAIRED_METRICS[col]
        base = _item_values(recs, "baseline", bench, col)
        if base.notna().sum() == 0:
            continue  # e.g. mc_acc on a benchmark without multiple-choice items
        seed_vals = [base] + [_item_values(recs, s, bench, col) for s in seeds]
        common = base.dropna().index
        for sv in seed_vals[1:]:
            common = common.intersection(sv.dropna().index)
        means = [float(sv.loc[common].mean()) for sv in seed_vals] if len(common) else []
        noise = max(means) - min(means) if len(means) > 1 else float("nan")
        for run in [v for v in variants if v != "baseline"] + seeds:
            vals = _item_values(recs, run, bench, col)
            idx = base.index.intersection(vals.index)
            r = paired_test(base.loc[idx].to_numpy(), vals.loc[idx].to_numpy(), seed=seed)
            row = {"variant": run, "benchmark": bench, "metric": name, "higher_is_better": hib, "n": r.n,
                   "baseline": r.mean_a, "value": r.mean_b, "delta": r.delta, "ci_lo": r.lo, "ci_hi": r.hi,
                   "p_value": r.p_value, "significant": bool(r.significant), "noise": noise,
                   "n_seeds": len(seed_vals), "within_noise": bool(not math.isnan(noise) and abs(r.delta) <= noise),
                   "better": bool((r.delta > 0) == hib and r.delta != 0), "test": r.method}
            row["verdict"] = "seed spread" if run in seeds else _verdict(row, len(seed_vals) > 1)
            rows.append(row)
    if val_losses and "baseline" in val_losses:
        losses = [val_losses[r] for r in ["baseline"] + seeds if r in val_losses]
        noise = max(losses) - min(losses) if len(losses) > 1 else float("nan")
        b = val_losses["baseline"]
        for run in [v for v in variants if v != "baseline"] + seeds:
            if run not in val_losses:
                continue
            d = val_losses[run] - b
            within = bool(not math.isnan(noise) and abs(d) <= noise)
            verdict = "seed spread" if run in seeds else (
                "within noise" if within else "no interval (unpaired)" if math.isnan(noise) else
                "outside noise (unpaired): " + ("better" if d < 0 else "worse"))
            rows.append({"variant": run, "benchmark": "heldout", "metric": "val_loss", "higher_is_better": False,
                         "n": 1, "baseline": b, "value": val_losses[run], "delta": d, "ci_lo": float("nan"),
                         "ci_hi": float("nan"), "p_value": float("nan"), "significant": False, "noise": noise,
                         "n_seeds": len(losses), "within_noise": within, "better": d < 0, "verdict": verdict,
                         "test": "none: each run holds out its own samples"})  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def final_val_loss(metrics_jsonl: str) -> float:
    """The last `val_loss` a training run logged (its metrics.jsonl); NaN when it logged none."""
    last = float("nan")
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "val_loss" in row:
                    last = float(row["val_loss"])
    return last


def compare_variants(variants: Sequence[str], checkpoints: Sequence[Sequence[str]], export_dirs: Sequence[str],
                     eval_dir: str, out_dir: str, tokenizer_dir: str | None = None,
                     known_bad: Iterable[str] | None = None, seed_checkpoints: Sequence[Sequence[str]] = (),
                     train_metrics: Sequence[str] | None = None,
                     seed_train_metrics: Sequence[str] | None = None) -> Comparison:
    """Compare the variants of an ablation grid; write `<out_dir>/comparison.parquet`, `comparison.csv` and
    `scores_by_epoch.parquet`.

    :param variants: variant specs, in grid order.
    :param checkpoints: per variant, its checkpoint URIs in epoch order (the last one is compared).
    :param export_dirs: per variant, its local export directory (manifest.json + shards/).
    :param eval_dir: the evaluation's output directory (summary.parquet).
    :param out_dir: where the tables go (created).
    :param tokenizer_dir: training tokenizer (HF directory) for token counts; characters/4 when None.
    :param known_bad: ids of known low-quality samples: adds `known_bad_kept` (how many the variant's export
        kept) and `known_bad_removed` (how many it removed vs the baseline export, or vs the union of the
        exports when the grid has no baseline).
    :param seed_checkpoints: checkpoints of the baseline retrained with other seeds (`baseline-seed1`, ...): the
        noise floor of every paired row.
    :param train_metrics: per variant, its training metrics.jsonl (the held-out loss); `seed_train_metrics` the
        same for the seed runs.

    Also writes `paired.parquet` / `paired.csv` (`paired_comparison`) and adds the pooled answer NLL
    (`answer_nll`, `_delta`, `_lo`, `_hi`, `_noise`, `_verdict`) and `val_loss` / `val_loss_delta` to the table.
    """
    import pandas as pd

    tok = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    exports = [count_export(root, tok) for root in export_dirs]
    summary = pd.read_parquet(os.path.join(eval_dir, "summary.parquet"))
    counts = [{"n_samples": e.n_samples, "n_tokens": e.n_tokens} for e in exports]
    table, long = comparison_table(variants, checkpoints, summary, counts)
    if known_bad is not None:  # recall of each variant's filter on the known-bad ids, against the baseline export
        bad = set(known_bad)
        exported = [e.ids for e in exports]
        base = exported[list(variants).index("baseline")] if "baseline" in variants else set().union(*exported)
        table["known_bad_kept"] = [len(ids & bad) for ids in exported]
        table["known_bad_removed"] = [len((base - ids) & bad) for ids in exported]
    seeds = [seed_run_name(k + 1) for k in range(len(seed_checkpoints))]
    val = {}
    for run, path in [*zip(variants, train_metrics or []), *zip(seeds, seed_train_metrics or [])]:
        val[run] = final_val_loss(path)
    paired = paired_comparison(variants, checkpoints, eval_dir, seed_checkpoints, val)
    _add_headline(table, paired, val)
    os.makedirs(out_dir, exist_ok=True)
    table.to_parquet(os.path.join(out_dir, "comparison.parquet"), index=False)
    table.to_csv(os.path.join(out_dir, "comparison.csv"), index=False)
    paired.to_parquet(os.path.join(out_dir, "paired.parquet"), index=False)
    paired.to_csv(os.path.join(out_dir, "paired.csv"), index=False)
    long.to_parquet(os.path.join(out_dir, "scores_by_epoch.parquet"), index=False)
    log.info("ablation table:\n%s", table.to_string(index=False))
    log.info("paired comparison with the baseline:\n%s", format_paired(paired))
    return Comparison(table, long, paired)


def _add_headline(table: Any, paired: Any, val: dict[str, float]) -> None:
    """The pooled answer NLL (its paired delta, interval, noise floor, verdict) and the held-out training loss as
    columns of the one-row-per-variant table."""
    if val:
        table["val_loss"] = [val.get(v, float("nan")) for v in table["variant"]]
        if "baseline" in val:
            table["val_loss_delta"] = table["val_loss"] - val["baseline"]
    pooled = paired[(paired["benchmark"] == POOLED) & (paired["metric"] == "answer_nll")].set_index("variant") \
        if len(paired) else None
    if pooled is None or pooled.empty:
        return
    base = float(pooled["baseline"].iloc[0])
    table["answer_nll"] = [base if v == "baseline" else pooled["value"].get(v, float("nan")) for v in table["variant"]]
    for col, src in (("delta", "delta"), ("lo", "ci_lo"), ("hi", "ci_hi"), ("noise", "noise")):
        table[f"answer_nll_{col}"] = [0.0 if v == "baseline" and col == "delta" else pooled[src].get(v, float("nan"))
                                      for v in table["variant"]]  # fmt: skip
    table["answer_nll_verdict"] = ["reference" if v == "baseline" else pooled["verdict"].get(v, "")
                                   for v in table["variant"]]  # fmt: skip


def _interval(lo: float, hi: float) -> str:
    if math.isnan(lo):
        return ""
    return f"[{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "(unbounded: too few items)"


def format_paired(paired: Any, metrics: Sequence[str] = ("score", "answer_nll", "mc_acc", "val_loss")) -> str:
    """The paired table as text: one line per variant x benchmark x metric, delta with its 95% interval, p, the
    baseline seeds' spread and the verdict."""
    if paired is None or paired.empty:
        return "(no paired comparison: the grid has no baseline or the evaluation wrote no records)"
    p = paired[paired["metric"].isin(metrics)].copy()
    p["delta (95% CI)"] = [f"{d:+.3f} {_interval(lo, hi)}" for d, lo, hi in zip(p["delta"], p["ci_lo"], p["ci_hi"])]
    p["p"] = [f"{x:.3f}" if not math.isnan(x) else "" for x in p["p_value"]]
    p["noise"] = [f"±{x:.3f}" if not math.isnan(x) else "" for x in p["noise"]]
    p["dir"] = ["higher=better" if h else "lower=better" for h in p["higher_is_better"]]
    cols = ["variant", "benchmark", "metric", "dir", "n", "baseline", "value", "delta (95% CI)", "p", "noise", "verdict"]
    return p[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    """Print the paired comparison of a published ablation (its paired.parquet)."""
    import argparse

    import pandas as pd

    ap = argparse.ArgumentParser(description="Print an ablation's paired comparison with the baseline.")
    ap.add_argument("comparison_dir", help="the ablation's output folder (paired.parquet)")
    ap.add_argument("--metrics", nargs="+", default=["score", "answer_nll", "mc_acc", "val_loss"],
                    help="metrics to show (score, answer_nll, mc_acc, mc_gold_prob, val_loss)")
    a = ap.parse_args(argv)
    print(format_paired(pd.read_parquet(os.path.join(a.comparison_dir, "paired.parquet")), a.metrics))


def comparison_html(cmp: Comparison) -> str:
    """The ablation deck page: the table, the paired comparison (table and each variant's delta with its 95%
    interval against the baseline seeds' noise band), scores by variant (bars) and score vs step."""
    from core.evals.report import score_vs_step_html
    from core.foundation.report import figure_html, new_figure, page, plot_text, plot_texts, table_html

    table, long = cmp.table, cmp.long
    parts = [table_html(table, "variant x benchmark (final checkpoint), deltas vs baseline")]
    if cmp.paired is not None and len(cmp.paired):
        parts.append(delta_plot_html(cmp.paired))
        parts.append(table_html(cmp.paired, "paired difference to the baseline over the same items (95% interval, "
                                            "sign-flip permutation test), noise = spread of the baseline seeds"))
    benches = sorted(set(long["benchmark"]))
    if benches:
        fig, ax = new_figure(7, 3.5)
        w = 0.8 / max(len(table), 1)
        for i, row in table.reset_index(drop=True).iterrows():
            ax.bar([j + i * w for j in range(len(benches))], [row.get(b, float("nan")) for b in benches], w,
                   label=plot_text(row["variant"]))
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(benches))], plot_texts(benches), rotation=20)
        ax.set_ylabel("score")
        ax.legend(fontsize=7)  # labels escaped by plot_text: a `$` in a variant name is text, not math
        parts.append(figure_html(fig, "scores by variant"))
        parts.append(score_vs_step_html(long))  # one line per variant over its checkpoints' steps
    return page(*parts)


def delta_plot_html(paired: Any, metrics: Sequence[str] = ("answer_nll", "score", "mc_acc")) -> str:
    """One panel per (benchmark, metric): each run's paired delta to the baseline with its 95% interval (an arrow
    where the interval is unbounded), over the grey band +-noise (the baseline seeds' spread)."""
    from core.foundation.report import figure_html, new_figure

    cells = paired[paired["metric"].isin(metrics)][["benchmark", "metric"]].drop_duplicates()
    cells = cells.sort_values(["metric", "benchmark"], key=lambda c: c.map(lambda x: (x != "answer_nll", x)))
    if cells.empty:
        return ""
    ncol = min(len(cells), 3)
    nrow = (len(cells) + ncol - 1) // ncol
    fig, _ = new_figure(4.0 * ncol, 2.8 * nrow)
    fig.clf()
    for k, (bench, metric) in enumerate(cells.itertuples(index=False)):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        g = paired[(paired["benchmark"] == bench) & (paired["metric"] == metric)].reset_index(drop=True)
        noise = float(g["noise"].iloc[0])
        if not math.isnan(noise):
            ax.axhspan(-noise, noise, color="0.85", label="seed spread")
        ax.axhline(0, color="0.4", lw=0.8)
        finite = [v for v in [*g["ci_lo"], *g["ci_hi"], *g["delta"]] if math.isfinite(v)] or [0.0]
        span = max(max(abs(v) for v in finite), noise if not math.isnan(noise) else 0.0, 1e-6) * 1.3
        for i, r in g.iterrows():
            lo, hi = max(r["ci_lo"], -span), min(r["ci_hi"], span)
            color = "C3" if r["verdict"].startswith("significant, outside") else "C0" if r["variant"] != "baseline" \
                else "0.5"
            if r["verdict"] == "seed spread":
                color = "0.5"
            ax.errorbar([i], [r["delta"]], yerr=[[r["delta"] - lo], [hi - r["delta"]]], fmt="o", color=color,
                        capsize=3)
        ax.set_ylim(-span, span)
        ax.set_xticks(range(len(g)), list(g["variant"]), rotation=25, fontsize=7, parse_math=False)
        better = "higher" if bool(g["higher_is_better"].iloc[0]) else "lower"
        ax.set_title(f"{bench}: {metric} delta ({better} is better)", fontsize=8, parse_math=False)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return figure_html(fig, "paired delta vs baseline with 95% interval; grey band: baseline seed-to-seed spread; "
                            "red: significant and outside the band")


def collect_ablation_decks(out_dir: str, variants: Sequence[str], checkpoints: Sequence[Sequence[str]],
                           shared_dirs: Sequence[str], export_dirs: Sequence[str], eval_dir: str) -> list[str]:
    """Copy every deck page of the grid to `<out_dir>/decks/`: the shared steps', each export's, each
    variant's training (its final checkpoint's, named `train_<variant>`; the baseline seeds' runs may follow the
    variants, `train_baseline-seed<k>`) and the evaluation's. Returns the
    page names (`core.foundation.report.collect_decks`)."""
    from core.foundation.report import DECKS_DIR, collect_decks
    from core.runs.ablation import parse_variant

    names = [v if v.startswith("baseline" + SEED_SUFFIX) else parse_variant(v).name for v in variants]
    trained = [(n, cks[-1]) for n, cks in zip(names, checkpoints) if cks]
    dirs = [*shared_dirs, *export_dirs, *(ck for _, ck in trained), eval_dir]
    suffixes = [""] * (len(shared_dirs) + len(export_dirs)) + [n for n, _ in trained] + [""]
    return list(collect_decks(dirs, os.path.join(out_dir, DECKS_DIR), suffixes))


if __name__ == "__main__":
    main()
