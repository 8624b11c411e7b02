"""The proof of the proxy on CPU, Flyte-free: does the uniform soup of domain experts rank data mixtures like
training on those mixtures does?

Protocol (`run_proxy_check`), every piece the workflow's own code:
1. demo data (`core.demo`), ingest, domains from the records' `domain` field (`core.mixing.domains`);
2. per domain a hash-chosen held-out set, the training sets balanced to one size when asked
   (`MixingConfig.balance_domains`, so a mixture weighs its domains equally, as the uniform soup does) and
   exported (`core.mixing.steps.prepare_experts`);
3. the embedded tiny LM and vision tower, a shared base trained on all domains (`core.train.loop.train`);
4. one expert per domain from the base, `budget_steps` steps each (`core.mixing.pipeline.train_plan`);
5. mixtures (subsets of >= 2 domains; a one-domain mixture trained with one expert's compute *is* the expert)
   trained from the same base on the domains' training sets concatenated, with one expert's compute
   (`mixture_compute="expert"`: the first-order match of the uniform soup, base + mean of the experts'
   updates) or the soup's total (`"sum"`);
6. the uniform soup of each mixture's experts (`core.mixing.merge.merge_checkpoints`);
7. every model scored on every domain's held-out answers (`heldout_scores`: minus the token-mean NLL of the
   assistant tokens, image seen); a model's score is the mean over domains (the workflow's `overall`);
8. Spearman(soup score, trained score) over the mixtures with a bootstrap interval over mixtures
   (`core.mixing.stats.spearman_interval`, the statistic `prove_proxy` reports).

Two references are measured in the same run: a proxy without merging (the mean of the mixture's experts'
own scores) and, with `reseed`, the same mixtures trained again with another data-order seed (how well
training ranks mixtures against itself: no proxy can be expected to beat that ceiling).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.mixing.pipeline import NLL_PREFIX, MixingConfig
from core.mixing.stats import N_BOOT, spearman_interval

STEPS = ["ingest", "domains"]
DEMO_DOMAINS = ("chart", "counting", "document", "photo", "text")


@dataclass
class ProxyCheckConfig:
    """One proof of the proxy. Data: `n_samples` demo records (seed `data_seed`), the `domains` kept.
    Models: the embedded tiny LM trained `lm_steps`, a base trained `base_steps` on all domains. Experts and
    mixtures: `mixing` (budget_steps, batch_size, lr, mixture_compute, balance_domains, heldout_per_domain).
    `n_mixtures`: mixtures drawn (seed `mixing.seed`) from the subsets of >= 2 domains (0: all of them).
    `reseed`: train the mixtures a second time with data-order seed `mixing.seed + 1` (the ceiling).
    `threads`: torch intra-op threads while the check runs (1: on a shared 2-core machine two spinning OpenMP
    threads per process made a training step ~10x slower in wall time; 0: leave torch's setting)."""

    mixing: MixingConfig
    n_samples: int = 800
    data_seed: int = 0
    domains: tuple[str, ...] = DEMO_DOMAINS
    lm_steps: int = 300
    base_steps: int = 20
    n_mixtures: int = 12
    reseed: bool = False
    n_boot: int = N_BOOT
    threads: int = 1

    def __post_init__(self) -> None:
        if len(self.domains) < 3:
            raise ValueError("a ranking of mixtures needs at least 3 domains (4 subsets of >= 2 domains)")
        if self.n_mixtures < 0:
            raise ValueError("n_mixtures must be >= 0")


def proxy_mixing_config(**overrides: Any) -> MixingConfig:
    """The CPU protocol's MixingConfig: held-out loss only (no generation benchmarks), batch 4, constant lr 5e-4
    (at 2e-3, the tiny preset's, every expert ended worse than the base on its own domain), balanced domains,
    one expert's compute per mixture."""
    base: dict[str, Any] = dict(benchmarks=[], batch_size=4, lr=5e-4, budget_steps=24, val_size=4,
                                heldout_per_domain=16, mixture_compute="expert", balance_domains=True,
                                device="cpu", max_seq_len=256)
    base.update(overrides)
    return MixingConfig(**base)


def mixture_subsets(domains: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """Subset keys (`a+b`) of >= 2 domains: all of them (n = 0 or n >= their number), else `n` drawn with `seed`."""
    subs = ["+".join(c) for r in range(2, len(domains) + 1) for c in itertools.combinations(sorted(domains), r)]
    if n == 0 or n >= len(subs):
        return subs
    return sorted(random.Random(seed).sample(subs, n), key=lambda k: (k.count("+"), k))


def overall(scores: dict[str, float]) -> float:
    """A model's score: the mean over domains of -token-mean NLL on the domain's held-out answers."""
    vals = [v for k, v in scores.items() if k.startswith(NLL_PREFIX)]
    return sum(vals) / len(vals)


@dataclass
class ProxyCheck:
    """What `run_proxy_check` measured: per mixture the soup's, the trained mixture's (and the reseeded
    training's) per-domain scores, the statistics, and wall time per phase."""

    config: dict[str, Any]
    domains: list[str]
    sizes: dict[str, int]
    heldout_sizes: dict[str, int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=float)


def _timer(seconds: dict[str, float]) -> Callable[[str], None]:
    t = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - t[0], 1)
        t[0] = now

    return lap


def run_proxy_check(cfg: ProxyCheckConfig, work: str | os.PathLike,
                    log: Callable[[str], None] = lambda m: None) -> ProxyCheck:
    """Run the protocol of the module docstring in `work` (created; reused files are not trusted: callers
    pass a fresh folder) and return the measurements."""
    import torch

    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, work, log)
    finally:
        torch.set_num_threads(before)


def _run(cfg: ProxyCheckConfig, work: str | os.PathLike, log: Callable[[str], None]) -> ProxyCheck:
    from core.demo import generate_demo
    from core.foundation.step import shards_of
    from core.io.ingest import IngestConfig, ingest
    from core.io.wds import iter_samples
    from core.mixing.domains import DomainConfig, assign_domains
    from core.mixing.merge import merge_checkpoints
    from core.mixing.pipeline import base_train_config, export_ids, heldout_scores, train_plan
    from core.mixing.plan import ExpertPlan
    from core.mixing.steps import export_mixtures, heldout_dirs, prepare_experts
    from core.steps.embed.model import tiny_local_dir
    from core.steps.perplexity.reference import train_reference_lm
    from core.train.loop import train

    mc = cfg.mixing
    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    lap = _timer(seconds)

    info = generate_demo(str(root / "data"), n_samples=cfg.n_samples, seed=cfg.data_seed)
    run = root / "run"
    ingest(IngestConfig(source=str(info.data_json), image_root=str(info.images_dir), run_dir=str(run)))
    shards = shards_of(run)
    dom_out = root / "domains"
    assign_domains(iter_samples(shards, load_images=False, verify_images=False), dom_out,
                   DomainConfig(include=list(cfg.domains)))
    ledgers = [str(run), str(dom_out)]
    prep = root / "prep"
    plan = prepare_experts(shards, ledgers, STEPS, str(dom_out), mc, str(prep))
    domains = plan["domains"]
    all_ids = sorted(i for ids in plan["train_ids"].values() for i in ids)
    dom_of = {i: d for d, ids in plan["train_ids"].items() for i in ids}
    export_ids(shards, ledgers, all_ids, str(prep / "all"), "all_domains", STEPS, dom_of)
    held = heldout_dirs(str(prep))
    lap("data")
    log(f"domains {plan['sizes']} (held out {plan['heldout_sizes']}); {plan['budget_steps']} steps x "
        f"{mc.batch_size} per expert")

    lm = train_reference_lm(shards, root / "lm", steps=cfg.lm_steps, seed=mc.seed)
    vit = tiny_local_dir(root / "vit", seed=mc.seed)
    from core.foundation.configs import override

    bcfg = override(base_train_config(mc, cfg.base_steps), output_dir=str(root / "base"),
                    vision_model=f"local-dir:{vit}", lm_path=lm, seed=mc.seed, val_every_n_steps=10 ** 6)
    base = train(str(prep / "all" / "shards"), bcfg).checkpoints[-1]
    lap("base")

    def score(ckpt: str) -> dict[str, float]:
        return heldout_scores(ckpt, held, mc.device, mc.max_seq_len)

    experts, expert_scores = {}, {}
    for p in plan["plans"]:
        ep = ExpertPlan(**p)
        experts[ep.name] = train_plan(str(prep / "train" / ep.name / "shards"), base, ep, mc,
                                      str(root / "experts" / ep.name))
        expert_scores[ep.name] = score(experts[ep.name])
        log(f"expert {ep.name}: overall {overall(expert_scores[ep.name]):.4f}")
    base_scores = score(base)
    lap("experts")

    subsets = mixture_subsets(domains, cfg.n_mixtures, mc.seed)
    mixes = export_mixtures(subsets, plan, mc, shards, ledgers, STEPS, str(root / "mix_data"))
    rows = []
    for key, data_dir, p in mixes:
        doms = key.split("+")
        t0 = time.perf_counter()
        ck = train_plan(os.path.join(data_dir, "shards"), base, ExpertPlan(**p), mc, str(root / "mixtures" / key))
        trained = score(ck)
        shutil.rmtree(root / "mixtures" / key, ignore_errors=True)  # one mixture's checkpoints on disk at a time
        row: dict[str, Any] = {"subset": key, "n_domains": len(doms), "steps": p["steps"], "trained": trained}
        if cfg.reseed:
            ck2 = train_plan(os.path.join(data_dir, "shards"), base, ExpertPlan(**p), replace(mc, seed=mc.seed + 1),
                             str(root / "mixtures_reseed" / key))
            row["reseeded"] = score(ck2)
            shutil.rmtree(root / "mixtures_reseed" / key, ignore_errors=True)
        lap("mixtures")
        soup = root / "soups" / key
        merge_checkpoints([experts[d] for d in doms], soup, "uniform")
        row["soup"] = score(str(soup))
        shutil.rmtree(soup, ignore_errors=True)
        lap("soups")
        row["experts_mean"] = {k: sum(expert_scores[d][k] for d in doms) / len(doms) for k in row["soup"]}
        rows.append(row)
        log(f"mixture {key}: trained {overall(trained):.4f} soup {overall(row['soup']):.4f} "
            f"({time.perf_counter() - t0:.0f} s)")

    # the regime check: an expert that does not beat the base on its own domain's held-out answers has not
    # learned its domain (too high a lr, too few samples), and then no ranking of mixtures means anything
    gains = {d: expert_scores[d][NLL_PREFIX + d] - base_scores[NLL_PREFIX + d] for d in domains}
    check = ProxyCheck(config={**asdict(cfg), "base_overall": overall(base_scores), "expert_self_gain": gains},
                       domains=domains,
                       sizes=plan["sizes"], heldout_sizes=plan["heldout_sizes"], rows=rows, seconds=seconds)
    check.stats = proxy_statistics(rows, domains, cfg.n_boot, mc.seed)
    lap("statistics")
    return check


def proxy_statistics(rows: Sequence[dict[str, Any]], domains: Sequence[str], n_boot: int = N_BOOT,
                     seed: int = 0) -> dict[str, dict[str, Any]]:
    """Spearman with bootstrap interval (over mixtures) of each proxy against the trained mixtures: the soup
    (`soup`, the claim), the mean of the experts' own scores (`experts_mean`, a proxy without merging) and,
    when measured, a second training (`reseeded`, the ceiling); on the overall score and per domain.

    With a second training, also each proxy against the mean of the two trainings' overall scores
    (`soup@seed_mean`, `experts_mean@seed_mean`): a reference with half the data-order noise variance, which
    shows how much of a proxy's shortfall is the single training's own noise rather than the proxy's. With
    `n_domains` in the rows, also the number of domains as a proxy (`n_domains`): a soup of more experts sits
    closer to the base, so a soup's ranking is only informative where it beats that count."""
    trained = [overall(r["trained"]) for r in rows]
    out: dict[str, dict[str, Any]] = {}
    for name in ("soup", "experts_mean", "reseeded"):
        if not rows or name not in rows[0]:
            continue
        out[name] = spearman_interval([overall(r[name]) for r in rows], trained, n_boot, seed=seed)
        for d in domains:
            k = NLL_PREFIX + d
            out[f"{name}:{k}"] = spearman_interval([r[name][k] for r in rows], [r["trained"][k] for r in rows],
                                                   n_boot, seed=seed)
    if rows and "n_domains" in rows[0]:  # the null proxy: rank a mixture by how many domains it has
        out["n_domains"] = spearman_interval([r["n_domains"] for r in rows], trained, n_boot, seed=seed)
    if rows and "reseeded" in rows[0]:
        seed_mean = [(overall(r["trained"]) + overall(r["reseeded"])) / 2 for r in rows]
        for name in ("soup", "experts_mean"):
            out[f"{name}@seed_mean"] = spearman_interval([overall(r[name]) for r in rows], seed_mean, n_boot,
                                                         seed=seed)
    return out
