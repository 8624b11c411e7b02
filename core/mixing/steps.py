"""One function per workflow step (each wrapped by one task in tasks/mixing.py): plan the expert trainings
and export their data, evaluate one soup in a worker, choose the subsets for the proof of the proxy."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.mixing.domains import check_domain_name, load_domains
from core.mixing.pipeline import MixingConfig, balance_train_sets, export_ids, heldout_scores, split_heldout
from core.mixing.plan import ExpertPlan, expert_budget, plan_training
from core.mixing.soups import HoldLog, SoupStore, subset_key


def prepare_experts(shards: Sequence[str], ledger_dirs: Sequence[str], steps: Sequence[str], domains_out: str,
                    cfg: MixingConfig, out: str) -> dict[str, Any]:
    """Split each domain into train / held-out, export both per domain, plan equal compute per expert.

    Writes `<out>/train/<domain>/`, `<out>/heldout/<domain>/` (exports) and `<out>/plan.json`
    ({domains, sizes, budget_steps, plans, heldout}); returns the plan dict."""
    groups = load_domains(domains_out)
    train, held = split_heldout(groups, cfg.heldout_per_domain, cfg.seed)
    if cfg.balance_domains:
        train = balance_train_sets(train, cfg.seed)
    sizes = {d: len(v) for d, v in train.items()}
    budget = expert_budget(sizes, cfg.batch_size, cfg.val_size, cfg.epochs, cfg.budget_steps)
    plans = [plan_training(d, [d], sizes, budget, cfg.batch_size, cfg.val_size) for d in sorted(train)]
    dom_of = {i: d for d, ids in groups.items() for i in ids}
    for d in sorted(train):
        check_domain_name(d)  # the folder train/<d> must stay inside `out`
        export_ids(shards, ledger_dirs, train[d], os.path.join(out, "train", d), f"domain_{d}", steps, dom_of)
        if held[d]:
            export_ids(shards, ledger_dirs, held[d], os.path.join(out, "heldout", d), f"heldout_{d}", steps, dom_of)
    plan = {"domains": sorted(train), "sizes": sizes, "heldout_sizes": {d: len(v) for d, v in held.items()},
            "budget_steps": budget, "batch_size": cfg.batch_size, "plans": [asdict(p) for p in plans],
            "train_ids": train, "heldout_ids": held}
    Path(out, "plan.json").write_text(json.dumps(plan, indent=1))
    return plan


def heldout_dirs(root: str) -> dict[str, str]:
    """{domain: shards dir} of the held-out exports written by `prepare_experts`."""
    base = Path(root) / "heldout"
    return {p.name: str(p / "shards") for p in sorted(base.iterdir())} if base.is_dir() else {}


def evaluate_soup(uri: str, experts: Mapping[str, str], base: str | None, heldout_root: str, cfg: MixingConfig,
                  cache_dir: str, out_dir: str, work_dir: str = "") -> str:
    """One eval worker: materialise the soup (or fetch a plain checkpoint), score held-out loss per domain,
    run the benchmarks through the existing runner (`core.evals.runner.evaluate_checkpoint`), delete the
    soup. Writes records/summary.parquet (held-out loss rows appended to the summary) and holds.json."""
    import pandas as pd

    from core.evals.config import EvalConfig
    from core.evals.results import SUMMARY_COLUMNS, write_parquet
    from core.evals.runner import evaluate_checkpoint

    held = heldout_dirs(heldout_root) if heldout_root else {}
    dev = cfg.device

    def probe(local: str) -> dict[str, float]:
        return heldout_scores(local, held, dev, cfg.max_seq_len) if held else {}

    log = HoldLog()
    store = SoupStore(experts, base, cfg.method, local_dir=work_dir, log=log, probe=probe)
    ecfg = EvalConfig(cache_dir=cache_dir, benchmarks=list(cfg.benchmarks), backend="auto", device=dev,
                      batch_size=4, max_samples=cfg.eval_max_samples, concurrency=1)
    try:
        wdir = evaluate_checkpoint(uri, ecfg, out_dir, store)
    finally:
        store.close()
    summary = pd.read_parquet(os.path.join(wdir, "summary.parquet"))
    extra = [{**{c: None for c in SUMMARY_COLUMNS}, **r, "checkpoint_name": r["checkpoint"].rsplit("/", 1)[-1],
              "metric": "neg_token_nll", "parse_rate": 1.0, "n": 0, "n_errors": 0, "status": "ok", "error": ""}
             for r in store.probe_rows]
    if not store.probe_rows and held:  # the soup could not be built: its held-out rows are failed too
        extra = [{**{c: None for c in SUMMARY_COLUMNS}, "checkpoint": uri, "benchmark": "nll_" + d, "score": float("nan"),
                  "status": "failed", "error": "soup_not_built", "n": 0, "n_errors": 0} for d in held]
    rows = summary.to_dict("records") + extra
    write_parquet(rows, SUMMARY_COLUMNS, os.path.join(wdir, "summary.parquet"))
    log.write(os.path.join(wdir, "holds.json"))
    return wdir


def choose_proxy_subsets(table: Any, cfg: MixingConfig) -> list[str]:
    """The `proxy_top` best subsets by overall score plus `proxy_random` others drawn with `cfg.seed`, all among
    the subsets of two or more domains (a one-domain mixture trained with one expert's compute *is* that expert,
    a pair that agrees by construction and would inflate the correlation)."""
    ranked = [s for s in table.sort_values("overall", ascending=False).index if "+" in s]
    top = ranked[: cfg.proxy_top]
    rest = [s for s in ranked if s not in top]
    rnd = random.Random(cfg.seed).sample(rest, min(cfg.proxy_random, len(rest)))
    return top + sorted(rnd)


def plan_mixtures(subsets: Sequence[str], plan: Mapping[str, Any], cfg: MixingConfig) -> list[ExpertPlan]:
    """Mixture trainings: the subset's domains concatenated, with the soup's total compute (`sum`: |S| x the
    expert budget) or one expert's (`expert`)."""
    out = []
    for key in subsets:
        doms = key.split("+")
        steps = plan["budget_steps"] * (len(doms) if cfg.mixture_compute == "sum" else 1)
        out.append(plan_training("mix_" + key, doms, plan["sizes"], steps, cfg.batch_size, cfg.val_size))
    return out


def mixture_ids(key: str, plan: Mapping[str, Any]) -> list[str]:
    """Training ids of a mixture (the domains' training ids concatenated; held-out ids stay out)."""
    return sorted(i for d in key.split("+") for i in plan["train_ids"][d])


def soup_uris(domains: Sequence[str]) -> list[str]:
    """`soup/<subset>` for every non-empty subset, by size then name."""
    from core.mixing.search import power_set
    from core.mixing.soups import soup_uri

    return [soup_uri(sorted(s)) for s in power_set(domains)]


def key_of(uri: str) -> str:
    """Subset key of a soup uri (`soup/a+b` -> `a+b`)."""
    return subset_key(uri.rsplit("/", 1)[-1].split("+"))


def export_mixtures(subsets: Sequence[str], plan: Mapping[str, Any], cfg: MixingConfig, shards: Sequence[str],
                    ledger_dirs: Sequence[str], steps: Sequence[str], out: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Export each mixture's training data (domains concatenated, domain counts in the manifest) and plan its
    training; returns (key, export dir, plan dict) per subset."""
    dom_of = {i: d for d, ids in plan["train_ids"].items() for i in ids}
    res = []
    for key, p in zip(subsets, plan_mixtures(subsets, plan, cfg)):
        for dom in key.split("+"):
            check_domain_name(dom)
        d = os.path.join(out, "mix_" + key.replace("+", "__"))
        export_ids(shards, ledger_dirs, mixture_ids(key, plan), d, "mix_" + key, steps, dom_of)
        res.append((key, d, asdict(p)))
    return res


def holds_peak(worker_dirs: Sequence[str]) -> dict[str, int]:
    """Measured peaks over all workers' hold logs: soups (models materialised) and expert copies at once."""
    from core.mixing.soups import peak_held

    rows = []
    for d in worker_dirs:
        p = os.path.join(d, "holds.json")
        if os.path.exists(p):
            rows += json.load(open(p))
    return {"peak_soups_held": peak_held(rows, "soup"), "peak_experts_held": peak_held(rows, "expert"),
            "n_hold_intervals": len(rows)}


def train_expert(data_dir: str, base: str, plan: ExpertPlan, cfg: MixingConfig, out: str,
                 external_command: str = "") -> str:
    """Train one expert (or mixture) from `base` for exactly the planned steps: the built-in trainer
    (`train_plan`), or the team's trainer as a command template (core.train.external placeholders: data_dir,
    ckpt_dir, epochs, lr, plus max_steps, batch_size, init_from). Returns the final checkpoint directory."""
    from core.mixing.pipeline import train_plan

    if not external_command:
        return train_plan(data_dir, base, plan, cfg, out)
    from core.train.external import ExternalTrainer, ExternalTrainerConfig

    ext = ExternalTrainerConfig(image="", command=external_command,
                                extra={"max_steps": str(plan.steps), "batch_size": str(plan.batch_size),
                                       "init_from": base})
    cks = ExternalTrainer(ext, train={"epochs": plan.epochs, "lr": cfg.lr}).fit(data_dir, out)
    if not cks:
        raise RuntimeError(f"{plan.name}: the external trainer wrote no checkpoint directory under {out}")
    return cks[-1]
