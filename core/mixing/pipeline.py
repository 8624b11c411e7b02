"""The pieces of a mixing search that touch data and models (Flyte-free): per-domain exports, expert and
mixture training with equal compute, held-out loss per domain, domain perplexity rankings, score tables.

`run_mixing_search` (core/mixing/local.py) chains them for a local run; tasks/mixing.py wraps them for Flyte.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field  # noqa: F401
from pathlib import Path
from typing import Any

from core.foundation.configs import ConfigJSON, register_preset
from core.foundation.ledger import LedgerWriter, read_ledger
from core.foundation.step import ShardStep, Unit, write_json_atomic
from core.mixing.plan import ExpertPlan

NLL_PREFIX = "nll_"  # held-out loss "benchmarks": score = -mean token NLL on that domain's held-out samples


@dataclass
class MixingConfig(ConfigJSON):
    """One mixing search. Training: `batch_size`, `lr` (constant by default: experts stay near the base),
    `budget_steps` per expert (0 = the largest domain's steps per epoch x `epochs`). Soups: `method`
    (uniform | weighted | task_arithmetic). Search: exhaustive up to `exhaustive_max_k` domains.
    Proof: `proxy_top` best subsets plus `proxy_random` random ones are trained on the real mixture with
    `mixture_compute` = `sum` (the soup's total: |S| x budget) or `expert` (one budget). `balance_domains`: every
    domain's training set is cut to the smallest domain's size (by hash), so a mixture (the domains' training
    sets concatenated) weighs its domains equally, as the uniform soup does; off, a mixture weighs domains by
    their sizes."""

    benchmarks: list[str]
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "constant"
    epochs: int = 1
    budget_steps: int = 0
    max_seq_len: int = 256
    val_size: int = 4
    heldout_per_domain: int = 8
    method: str = "uniform"
    exhaustive_max_k: int = 8
    beam_width: int = 3
    proxy_top: int = 3
    proxy_random: int = 2
    mixture_compute: str = "sum"
    balance_domains: bool = False
    eval_max_samples: int = 0
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mixture_compute not in ("sum", "expert"):
            raise ValueError(f"mixture_compute {self.mixture_compute!r} not in (sum, expert)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule {self.lr_schedule!r}")


@register_preset(MixingConfig, "tiny", default=True)
def tiny_mixing_config(**overrides: Any) -> MixingConfig:
    """CPU preset for the demo: 16 steps of 4 per expert, held-out loss + two fixture benchmarks (4 items)."""
    base: dict[str, Any] = dict(benchmarks=["countbench", "chartqa"], batch_size=4, lr=2e-3, budget_steps=16,
                                val_size=4, heldout_per_domain=8, eval_max_samples=4, device="cpu")
    base.update(overrides)
    return MixingConfig(**base)


def split_heldout(groups: Mapping[str, Sequence[str]], n: int, seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train ids, held-out ids) per domain: the `n` ids with the smallest hash(seed, id) are held out, so the
    split does not depend on the order or on the other domains."""
    train, held = {}, {}
    for d, ids in groups.items():
        ranked = sorted(ids, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
        k = min(n, max(0, len(ids) - 1))
        held[d] = sorted(ranked[:k])
        train[d] = sorted(ranked[k:])
    return train, held


def balance_train_sets(train: Mapping[str, Sequence[str]], seed: int = 0) -> dict[str, list[str]]:
    """Every domain cut to the smallest domain's size: the ids with the smallest hash(seed, id) are kept (the
    same rule as `split_heldout`, so the cut does not depend on order)."""
    if not train:
        return {}
    m = min(len(v) for v in train.values())
    return {d: sorted(sorted(ids, key=lambda i: hashlib.sha1(f"{seed}:keep:{i}".encode()).hexdigest())[:m])
            for d, ids in train.items()}


def export_ids(shards: Sequence[str], ledger_dirs: Sequence[str], ids: Sequence[str], out: str, name: str,
               steps: Sequence[str], domain_of_id: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Export `ids` through the existing export (core.steps.export.export_curated) as subset `name`; with
    `domain_of_id`, the manifest gains `domain_counts` (samples per domain)."""
    from core.steps.export import MANIFEST, ExportConfig, export_curated

    cfg = ExportConfig(steps=list(steps), max_samples=1000, subset_name=name)
    manifest = export_curated(shards, list(ledger_dirs), out, cfg, subset_ids=ids)
    if domain_of_id is not None:
        counts: dict[str, int] = {}
        for sh in manifest["shards"]:
            for i in sh["ids"]:
                d = domain_of_id.get(i, "")
                counts[d] = counts.get(d, 0) + 1
        manifest["domain_counts"] = dict(sorted(counts.items()))
        write_json_atomic(manifest, os.path.join(out, MANIFEST), indent=1, sort_keys=True)
    return manifest


def base_train_config(cfg: MixingConfig, steps: int) -> Any:
    """The TrainConfig of the shared base (trained on all domains before the experts): `steps` steps (0 = no cap)
    with the search's batch size, lr, sequence length, held-out size and device; the rest is TrainConfig's
    `default` preset (cosine schedule, seed 0). The training task fills the paths."""
    from core.foundation.configs import preset
    from core.train.config import TrainConfig

    return preset(TrainConfig, "default", max_steps=steps or None, batch_size=cfg.batch_size, lr=float(cfg.lr),
                  max_seq_len=cfg.max_seq_len, val_size=cfg.val_size, device=cfg.device)


def train_plan(data_dir: str, base_ckpt: str, plan: ExpertPlan, cfg: MixingConfig, out_dir: str) -> str:
    """Train one expert (or mixture) from `base_ckpt` with the built-in trainer for exactly `plan.steps`
    steps; returns the final checkpoint directory."""
    from core.train.config import TrainConfig
    from core.train.loop import train

    tcfg = TrainConfig(output_dir=out_dir, vision_model="", lm_path="", init_from=base_ckpt, stage="full",
                       epochs=plan.epochs, max_steps=plan.steps, batch_size=plan.batch_size, lr=cfg.lr,
                       lr_schedule=cfg.lr_schedule, max_seq_len=cfg.max_seq_len, val_size=cfg.val_size,
                       val_every_n_steps=max(plan.steps, 1), ckpt_every_n_steps=0, seed=cfg.seed, device=cfg.device)
    res = train(data_dir, tcfg)
    if res.global_step != plan.steps:
        raise RuntimeError(f"{plan.name}: trained {res.global_step} steps, planned {plan.steps}")
    return res.checkpoints[-1]


def _load_scorer(ckpt: str, device: str) -> Any:
    from core.evals.backends import _LOAD_LOCK  # transformers model construction is not thread-safe
    from core.train.mini_llava import load_mini_llava

    with _LOAD_LOCK:  # eval workers may run as threads (evaluate_checkpoints); loads are serialized there too
        model = load_mini_llava(ckpt, device=device)
    model.eval()
    return model


def _nll_batches(model: Any, data_dir: str, device: str, max_seq_len: int, batch_size: int):
    """(sample ids, summed assistant-token NLL, token count) per batch of the shards in `data_dir`."""
    import torch

    from core.train.data import Collator, ConversationDataset, build_index, list_tar_shards, read_entry

    entries = build_index(list_tar_shards(data_dir))
    ds = ConversationDataset(entries, model.tokenizer, model.preprocess, model.image_token_id, model.n_image_tokens,
                             max_seq_len)
    collate = Collator(model.tokenizer.pad_token_id)
    with torch.no_grad():
        for j in range(0, len(entries), batch_size):
            b = collate([ds[i] for i in range(j, min(j + batch_size, len(entries)))])
            s, n = model(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
            ids = [read_entry(entries[i])[0]["id"] for i in range(j, min(j + batch_size, len(entries)))]
            yield ids, float(s), int(n)


def sample_nll(ckpt: str, data_dir: str, device: str = "cpu", max_seq_len: int = 256) -> list[dict[str, Any]]:
    """Per sample of the shards in `data_dir`: id, summed assistant-token NLL and token count under `ckpt`
    (images seen by the model, image and prompt tokens masked; the trainer's own encoding)."""
    model = _load_scorer(ckpt, device)
    rows = [{"sample_id": ids[0], "nll_sum": s, "n_tokens": n}
            for ids, s, n in _nll_batches(model, data_dir, device, max_seq_len, 1)]
    del model
    return rows


def heldout_scores(ckpt: str, heldout: Mapping[str, str], device: str = "cpu", max_seq_len: int = 256,
                   batch_size: int = 8) -> dict[str, float]:
    """`nll_<domain>` -> -(token-mean NLL) of `ckpt` on each domain's held-out shards (higher is better); the
    model is loaded once and scores batches (right padding is masked, so a batch's sum is the samples' sum)."""
    model = _load_scorer(ckpt, device)
    out = {}
    for d, data_dir in sorted(heldout.items()):
        tot = tok = 0.0
        for _, s, n in _nll_batches(model, data_dir, device, max_seq_len, batch_size):
            tot, tok = tot + s, tok + n
        out[NLL_PREFIX + d] = -tot / tok if tok else math.nan
    del model
    return out


class DomainPerplexityStep(ShardStep):
    """Domain perplexity on the shared shard-step base (core/foundation/step.py): a unit is one domain, its training
    export scored by the domain's expert and by the base (`sample_nll`); one ledger part per domain,
    resumable by domain. The ledger `perplexity` has the layout `slice_by_perplexity` ranks: keep rows with
    extra.nll = log(ppl_expert / ppl_base) (so the score, its exp, is the ratio) and extra.n_scored; samples
    without scored tokens are quarantined `ppl_no_scored_tokens`. `summary()` writes
    `domain_perplexity/summary.json` ({domain: {n, median_ratio}}) from the ledger.

    :param experts: domain -> expert checkpoint.  :param base: the shared base checkpoint.
    :param data: domain -> shards directory of its samples.  :param nll: the scorer (default `sample_nll`).
    """

    name = "perplexity"
    stamp_attrs = ("experts", "base", "max_seq_len")  # the models scoring it (core/foundation/step.py stamp)

    def __init__(self, out: str | os.PathLike, experts: Mapping[str, str], base: str, data: Mapping[str, str],
                 device: str = "cpu", max_seq_len: int = 256, nll: Any = None):
        super().__init__(out)
        self.experts, self.base, self.data, self.device, self.max_seq_len = experts, base, data, device, max_seq_len
        self.nll = nll or sample_nll

    def unit_name(self, url: str) -> str:
        return url  # the units are domain names

    def process(self, unit: Unit, led: LedgerWriter) -> int:
        d, data = unit.name, self.data[unit.name]
        e_rows = self.nll(self.experts[d], data, self.device, self.max_seq_len)
        b_rows = {r["sample_id"]: r for r in self.nll(self.base, data, self.device, self.max_seq_len)}
        for r in e_rows:
            n = int(r["n_tokens"])
            if n <= 0:
                led.add(r["sample_id"], "quarantine", "ppl_no_scored_tokens", shard=r.get("shard", ""), domain=d)
                continue
            e, b = r["nll_sum"], b_rows[r["sample_id"]]["nll_sum"]
            log_ratio = (e - b) / n
            led.add(r["sample_id"], "keep", score=math.exp(log_ratio), shard=r.get("shard", ""), nll=log_ratio,
                    n_scored=n, domain=d, expert_ppl=math.exp(e / n), base_ppl=math.exp(b / n))
        return len(e_rows)

    def summary(self) -> dict[str, Any]:
        """{domain: {n, median_ratio}} of the kept samples (all parts), also written as summary.json."""
        led = read_ledger(self.ledger_dir)
        ratios: dict[str, list[float]] = {}
        for score, extra in zip(led.loc[led["decision"] == "keep", "score"], led.loc[led["decision"] == "keep", "extra"]):
            ratios.setdefault(json.loads(extra)["domain"], []).append(float(score))
        summary = {d: {"n": len(v), "median_ratio": float(sorted(v)[len(v) // 2])} for d, v in sorted(ratios.items())}
        write_json_atomic(summary, Path(self.out, "domain_perplexity", "summary.json"), indent=1)
        return summary


def score_table(summary: Any, name_of: Mapping[str, str]) -> Any:
    """Eval summary rows (checkpoint, benchmark, score) -> wide table: one row per name (subset key), one
    column per benchmark, plus `overall` (mean over benchmarks)."""
    df = summary[summary["checkpoint"].isin(list(name_of))].copy()
    df["name"] = df["checkpoint"].map(name_of)
    wide = df.pivot_table(index="name", columns="benchmark", values="score", aggfunc="first")
    wide.columns.name = None
    wide["overall"] = wide.mean(axis=1)
    return wide


def spearman_by_benchmark(soup: Any, trained: Any, n_boot: int = 2000, seed: int = 0) -> Any:
    """Spearman rank correlation between soup and trained-mixture scores per benchmark (and overall), with its
    95% percentile bootstrap interval over mixtures (`core.mixing.stats.spearman_interval`, the statistic of
    benchmarks/mixing_proxy.py) and the number of pairs; NaN where fewer than 3 pairs or one side is constant."""
    import pandas as pd

    from core.mixing.stats import spearman_interval

    rows = []
    common = [i for i in trained.index if i in soup.index]
    for b in trained.columns:
        if b not in soup.columns:
            continue
        x = soup.loc[common, b].astype(float)
        y = trained.loc[common, b].astype(float)
        ok = ~(x.isna() | y.isna())
        st = spearman_interval(x[ok].to_numpy(), y[ok].to_numpy(), n_boot, seed=seed)
        rows.append({"benchmark": b, "spearman": st["rho"], "ci_low": st["lo"], "ci_high": st["hi"],
                     "p_value": st["p_value"], "n_pairs": st["n"],
                     "n_distinct_soup": int(x[ok].nunique()), "n_distinct_trained": int(y[ok].nunique())})
    return pd.DataFrame(rows)
