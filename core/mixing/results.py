"""The reduces of a mixing search (Flyte-free; tasks/mixing.py wraps each in one task): the expert data with the
all-domains export for the base, the soup table with its analysis and report, and the proof of the proxy with
the recommended mixture's export. Each writes its files under `out` and returns what the task reports."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from core.mixing.pipeline import MixingConfig, export_ids, score_table, spearman_by_benchmark
from core.mixing.steps import (
    choose_proxy_subsets,
    export_mixtures,
    holds_peak,
    key_of,
    mixture_ids,
    prepare_experts,
)

# The ledgers a mixing export reads (tasks pass the ingest output and the assign_domains output, in this order).
STEPS = ["ingest", "domains"]


def _domain_of(plan: dict[str, Any]) -> dict[str, str]:
    return {i: d for d, ids in plan["train_ids"].items() for i in ids}


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def load_plan(prep_dir: str) -> dict[str, Any]:
    """The plan.json `prepare_expert_data` wrote."""
    with open(os.path.join(prep_dir, "plan.json")) as f:
        return json.load(f)


def prepare_expert_data(shards: Sequence[str], ledger_dirs: Sequence[str], domains_dir: str, cfg: MixingConfig,
                        out: str) -> dict[str, Any]:
    """`prepare_experts` (train / held-out exports per domain, plan.json) plus `<out>/all/`: every domain's
    training data in one export (the shared base trains on it). Returns the plan."""
    plan = prepare_experts(shards, ledger_dirs, STEPS, domains_dir, cfg, out)
    all_ids = sorted(i for ids in plan["train_ids"].values() for i in ids)
    export_ids(shards, ledger_dirs, all_ids, os.path.join(out, "all"), "all_domains", STEPS, _domain_of(plan))
    return plan


def analyze_soup_results(result_dirs: Sequence[str], n_lost: int, uris: Sequence[str], plan: dict[str, Any],
                         cfg: MixingConfig, shards: Sequence[str], ledger_dirs: Sequence[str], out: str,
                         mixtures_out: str) -> dict[str, Any]:
    """Reduce the soup evaluations: score table (`soup_scores.csv`), best subsets, Pareto front, marginal
    contributions and search replays (`analysis.json`), the report (`report.html`); choose the proxy subsets and
    export their mixtures under `mixtures_out`.

    :param result_dirs: evaluate_soup outputs that came back.
    :param n_lost: Workers lost (no output).
    :param uris: Every soup URI planned.
    :return: {html, subsets, mixtures: [(key, export dir, plan dict)], table, result}.
    """
    from core.evals.results import collect_results
    from core.mixing.analysis import analyze, mixing_report_html

    res = collect_results(list(result_dirs), out)
    table = score_table(res.summary, {u: key_of(u) for u in uris})
    result = analyze(table, plan["domains"], cfg.beam_width, cfg.seed)
    peaks = holds_peak(list(result_dirs))
    result.update(peaks, n_workers_lost=n_lost, n_soups_planned=len(uris))
    table.to_csv(os.path.join(out, "soup_scores.csv"))
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    html = mixing_report_html(table, plan["domains"], result, extra={"soups evaluated": len(table), **peaks})
    _write(os.path.join(out, "report.html"), html)
    subsets = choose_proxy_subsets(table, cfg)
    mixes = export_mixtures(subsets, plan, cfg, shards, ledger_dirs, STEPS, mixtures_out)
    return {"html": html, "subsets": subsets, "mixtures": mixes, "table": table, "result": result, "peaks": peaks}


def prove_proxy(soups_dir: str, mix_result_dirs: Sequence[str], mix_uris: Sequence[str],
                proxy_subsets: Sequence[str], plan: dict[str, Any], cfg: MixingConfig, shards: Sequence[str],
                ledger_dirs: Sequence[str], out: str, recommended_out: str) -> dict[str, Any]:
    """Spearman of soup score vs trained-mixture score per benchmark with its 95% bootstrap interval
    (`spearman_by_benchmark`), then export the recommended mixture (best overall soup) to `recommended_out`.

    Writes `proxy_spearman.csv`, `proxy_pairs.csv`, `soup_scores.csv`, `result.json`, `report.html` and
    `mixtures/` (the mixtures' collected evaluations) under `out`. Returns {html, result, best, proxy}.
    """
    import pandas as pd

    from core.evals.results import collect_results
    from core.mixing.analysis import mixing_report_html

    soup_table = pd.read_csv(os.path.join(soups_dir, "soup_scores.csv"), index_col=0)
    with open(os.path.join(soups_dir, "analysis.json")) as f:
        result = json.load(f)
    res = collect_results(list(mix_result_dirs), os.path.join(out, "mixtures"))
    trained = score_table(res.summary, dict(zip(mix_uris, proxy_subsets, strict=True)))
    proxy = spearman_by_benchmark(soup_table, trained, seed=cfg.seed)
    pairs = soup_table.loc[[i for i in trained.index if i in soup_table.index]].add_prefix("soup_").join(
        trained.add_prefix("trained_"))
    proxy.to_csv(os.path.join(out, "proxy_spearman.csv"), index=False)
    pairs.to_csv(os.path.join(out, "proxy_pairs.csv"))
    soup_table.to_csv(os.path.join(out, "soup_scores.csv"))
    best = result["best"]["overall"]["subset"]
    manifest = export_ids(shards, ledger_dirs, mixture_ids(best, plan), recommended_out, "mix_" + best, STEPS,
                          _domain_of(plan))
    result.update(recommended=best, recommended_counts=manifest["domain_counts"], proxy=proxy.to_dict("records"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    html = mixing_report_html(soup_table, plan["domains"], result, proxy,
                              extra={"recommended": best, "counts": manifest["domain_counts"],
                                     "peak_soups_held": result.get("peak_soups_held")})
    _write(os.path.join(out, "report.html"), html)
    return {"html": html, "result": result, "best": best, "proxy": proxy}
