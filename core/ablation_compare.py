"""Ablation comparison: what each variant's export holds (samples, tokens, known-bad ids), the variant x
benchmark table of the final checkpoints with deltas vs the baseline, its files and its deck page.

Flyte-free; `tasks/ablation.py:compare_variants` wraps `compare_variants` and `comparison_html`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ExportCounts:
    """One variant's export: sample and token counts, and the ids it holds."""

    n_samples: int
    n_tokens: int
    ids: set[str]


def count_export(root: str, tokenizer: Any = None) -> ExportCounts:
    """Samples and tokens of the export under `root` (`<root>/shards/*.tar`): tokens of every turn joined by
    newlines, with `tokenizer` (a transformers tokenizer) or characters/4 without one."""
    from core.wds import iter_samples, list_shards

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
    """The comparison's tables: `table` (one row per variant, final checkpoint) and `long` (every
    (checkpoint, benchmark) summary row with its variant)."""

    table: Any  # pandas DataFrame
    long: Any


def compare_variants(variants: Sequence[str], checkpoints: Sequence[Sequence[str]], export_dirs: Sequence[str],
                     eval_dir: str, out_dir: str, tokenizer_dir: str | None = None,
                     known_bad: Iterable[str] | None = None) -> Comparison:
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
    os.makedirs(out_dir, exist_ok=True)
    table.to_parquet(os.path.join(out_dir, "comparison.parquet"), index=False)
    table.to_csv(os.path.join(out_dir, "comparison.csv"), index=False)
    long.to_parquet(os.path.join(out_dir, "scores_by_epoch.parquet"), index=False)
    log.info("ablation table:\n%s", table.to_string(index=False))
    return Comparison(table, long)


def comparison_html(cmp: Comparison) -> str:
    """The ablation deck page: the table, scores by variant (bars) and score vs step (one line per variant)."""
    from core.evals.report import score_vs_step_html
    from core.report import figure_html, new_figure, page, plot_text, plot_texts, table_html

    table, long = cmp.table, cmp.long
    parts = [table_html(table, "variant x benchmark (final checkpoint), deltas vs baseline")]
    benches = sorted(set(long["benchmark"]))
    if benches:
        fig, ax = new_figure(7, 3.5)
        w = 0.8 / max(len(table), 1)
        for i, row in table.reset_index(drop=True).iterrows():
            ax.bar([j + i * w for j in range(len(benches))], [row.get(b, float("nan")) for b in benches], w,
                   label=plot_text(row["variant"]))
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(benches))], plot_texts(benches), rotation=20)
        ax.set_ylabel("score")
        ax.legend(fontsize=7)
        parts.append(figure_html(fig, "scores by variant"))
        parts.append(score_vs_step_html(long))  # one line per variant over its checkpoints' steps
    return page(*parts)


def collect_ablation_decks(out_dir: str, variants: Sequence[str], checkpoints: Sequence[Sequence[str]],
                           shared_dirs: Sequence[str], export_dirs: Sequence[str], eval_dir: str) -> list[str]:
    """Copy every deck page of the grid to `<out_dir>/decks/`: the shared steps', each export's, each
    variant's training (its final checkpoint's, named `train_<variant>`) and the evaluation's. Returns the
    page names (`core.report.collect_decks`)."""
    from core.ablation import parse_variant
    from core.report import DECKS_DIR, collect_decks

    names = [parse_variant(v).name for v in variants]
    trained = [(n, cks[-1]) for n, cks in zip(names, checkpoints) if cks]
    dirs = [*shared_dirs, *export_dirs, *(ck for _, ck in trained), eval_dir]
    suffixes = [""] * (len(shared_dirs) + len(export_dirs)) + [n for n, _ in trained] + [""]
    return list(collect_decks(dirs, os.path.join(out_dir, DECKS_DIR), suffixes))
