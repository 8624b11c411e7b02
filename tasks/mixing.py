"""Mixing-by-soups tasks: domains, expert data and plans, expert/mixture training, soup evaluation inside
the eval worker, analysis + search replays, domain perplexity, the proof of the proxy and the export.
Logic lives in core/mixing; these are thin wrappers."""

from __future__ import annotations

import json
import logging
import os
from typing import List, NamedTuple, Optional

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory

from core.mixing.pipeline import MixingConfig
from core.train.config import TrainConfig
from tasks.cache import task_version
from tasks.images import CPU_IMAGE, TRAIN_IMAGE, VLLM_IMAGE
from tasks.paths import source
from tasks.resources import TINY_REQUESTS, renamed

log = logging.getLogger(__name__)
MIXING_CODE = task_version(__name__)
STEPS = ["ingest", "domains"]


def _work(name: str) -> str:
    p = os.path.join(current_context().working_directory, name)
    os.makedirs(p, exist_ok=True)
    return p


def _shards(run: FlyteDirectory) -> list[str]:
    from core.io.wds import list_shards

    return list_shards(f"{source(run).rstrip('/')}/shards")


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), enable_deck=True, cache=True,
      cache_version=MIXING_CODE)
def assign_domains(run: FlyteDirectory, mode: str = "field", k: int = 4, embeddings: Optional[FlyteDirectory] = None,
                   embed_kind: str = "image", include: Optional[List[str]] = None, min_samples: int = 1,
                   seed: int = 0) -> FlyteDirectory:
    """Give every ingested sample a domain: a field of the source (`domain`, `metadata.domain`/`dataset`,
    `source`) or k-means on existing embeddings; writes the `domains` ledger.

    :param run: Ingest output (`shards/`, `ledger/ingest/`).
    :param mode: `field` or `kmeans`.
    :param k: Clusters for `kmeans`.
    :param embeddings: embed_shards output (required for `kmeans`).
    :param embed_kind: `image` or `text` embeddings for `kmeans`.
    :param include: Keep only these domains (others quarantined `domain_excluded:<d>`); empty: all.
    :param min_samples: Smaller domains are quarantined `domain_too_small:<d>`.
    :param seed: k-means seed.
    :return: `ledger/domains/` and `domains/domains.json` ({domain: [ids]}), `domains/summary.json`.
    """
    from core.foundation.report import page, table_html
    from core.io.wds import iter_samples
    from core.mixing.domains import DomainConfig
    from core.mixing.domains import assign_domains as run_assign

    cfg = DomainConfig(mode=mode, k=k, embed_kind=embed_kind, seed=seed, min_samples=min_samples,
                       include=tuple(include or ()))
    if mode == "kmeans" and embeddings is None:
        raise ValueError("mode=kmeans needs embeddings (an embed_shards output)")
    emb = None
    if embeddings is not None and mode == "kmeans":
        from core.steps.embed.store import load_embeddings

        emb = load_embeddings(embeddings.download(), embed_kind)
    out = _work("domains_out")
    summary = run_assign(iter_samples(_shards(run), load_images=False, verify_images=False), out, cfg, emb)
    log.info("domains: %s", summary)
    Deck("domains", page(table_html([{"domain": d, "n": n} for d, n in summary["domains"].items()], "Domains"),
                         table_html([{"reason": r, "n": n} for r, n in summary["reasons"].items()], "Quarantined")))
    print(f"domains written to {out}")
    return FlyteDirectory(out)


class ExpertPrep(NamedTuple):
    prep: FlyteDirectory
    all_data: FlyteDirectory
    domains: List[str]
    data: List[FlyteDirectory]
    plans: List[str]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), cache=True, cache_version=MIXING_CODE)
def prepare_experts(run: FlyteDirectory, domains: FlyteDirectory, config: MixingConfig) -> ExpertPrep:
    """Hold out samples per domain, export each domain's training data (and all domains together, for a base),
    plan equal compute per expert (steps x batch; default the largest domain's budget).

    :param run: Ingest output.
    :param domains: assign_domains output.
    :param config: MixingConfig (batch_size, budget_steps, heldout_per_domain, ...).
    :return: prep dir (plan.json, train/<d>, heldout/<d>, all/), the all-domains export, domain names,
        per-domain exports and per-domain plans (JSON) in the same order.
    """
    from core.mixing.pipeline import export_ids
    from core.mixing.steps import prepare_experts as run_prep

    out = _work("mixing_prep")
    dirs = [source(run), domains.download()]
    plan = run_prep(_shards(run), dirs, STEPS, dirs[1], config, out)
    all_ids = sorted(i for ids in plan["train_ids"].values() for i in ids)
    dom_of = {i: d for d, ids in plan["train_ids"].items() for i in ids}
    export_ids(_shards(run), dirs, all_ids, os.path.join(out, "all"), "all_domains", STEPS, dom_of)
    log.info("experts: %d domains, %d steps x %d each; sizes %s", len(plan["domains"]), plan["budget_steps"],
             plan["batch_size"], plan["sizes"])
    print(f"expert data and plan written to {out}")
    return ExpertPrep(FlyteDirectory(out), FlyteDirectory(os.path.join(out, "all")), plan["domains"],
                      [FlyteDirectory(os.path.join(out, "train", d)) for d in plan["domains"]],
                      [json.dumps(p) for p in plan["plans"]])


_EXPERT_OPTS = dict(container_image=TRAIN_IMAGE, retries=1, cache=True, cache_version=MIXING_CODE)


# Production: one GPU per expert (or mixture) training, like train_mini_llava; the tiny preset runs the CPU twin
# `train_expert_cpu` (chosen by the workflow: soup_mixing_cpu / mixing_search_cpu).
@task(requests=Resources(cpu="8", mem="64Gi", gpu="1"), limits=Resources(gpu="1"), **_EXPERT_OPTS)
def train_expert(data: FlyteDirectory, plan: str, base: FlyteDirectory, config: MixingConfig,
                 external_command: str = "") -> FlyteDirectory:
    """Train one expert (or one mixture) from the shared base for exactly the planned steps.

    :param data: Export of the expert's (mixture's) training data.
    :param plan: ExpertPlan as JSON (name, domains, steps, epochs, batch_size).
    :param base: The shared start checkpoint.
    :param config: MixingConfig (lr, lr_schedule, max_seq_len, device, seed).
    :param external_command: The team's trainer as a command template (core.train.external placeholders:
        data_dir, ckpt_dir, epochs, lr, plus max_steps, batch_size, init_from); empty: the built-in trainer.
    :return: The final checkpoint.
    """
    from core.mixing.pipeline import train_plan
    from core.mixing.plan import ExpertPlan

    p = ExpertPlan(**json.loads(plan))
    data_dir = os.path.join(data.download(), "shards")
    out = _work("expert_" + p.name)
    if external_command:
        from core.train.external import ExternalTrainer, ExternalTrainerConfig

        ext = ExternalTrainerConfig(image="", command=external_command,
                                    extra={"max_steps": str(p.steps), "batch_size": str(p.batch_size),
                                           "init_from": base.download()})
        cks = ExternalTrainer(ext, train={"epochs": p.epochs, "lr": config.lr}).fit(data_dir, out)
        if not cks:
            raise RuntimeError(f"{p.name}: the external trainer wrote no checkpoint directory under {out}")
        ck = cks[-1]
    else:
        ck = train_plan(data_dir, base.download(), p, config, out)
    log.info("%s: %d steps x %d on %d samples (%d epochs) -> %s", p.name, p.steps, p.batch_size, p.n_samples,
             p.epochs, ck)
    print(f"checkpoint: {ck}")
    return FlyteDirectory(ck)


train_expert_cpu = task(requests=TINY_REQUESTS, **_EXPERT_OPTS)(renamed(train_expert.task_function,
                                                                       "train_expert_cpu"))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def base_train_config(config: MixingConfig, steps: int) -> TrainConfig:
    """The shared base's TrainConfig: `steps` steps with the mixing config's batch size, lr, sequence length,
    held-out size and device (core.mixing.pipeline.base_train_config).

    :param config: The mixing search's config.
    :param steps: Training steps of the base (0 = no cap).
    """
    from core.mixing.pipeline import base_train_config as build

    return build(config, steps)


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def checkpoint_uris(checkpoints: List[FlyteDirectory]) -> List[str]:
    """Checkpoint directories -> URIs (the remote location on a cluster, the local path in local runs).

    :param checkpoints: Checkpoint directories.
    """
    return [source(c) for c in checkpoints]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def last_checkpoint(checkpoints: List[FlyteDirectory]) -> FlyteDirectory:
    """The last checkpoint of a training (the base every expert starts from).

    :param checkpoints: A training's checkpoints in order.
    """
    if not checkpoints:
        raise ValueError("the training wrote no checkpoint")
    return checkpoints[-1]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def plan_soups(domains: List[str], max_k: int = 8) -> List[str]:
    """Soup URIs of every non-empty subset of the domains (2^k - 1; k <= max_k).

    :param domains: Domain names (one expert each).
    :param max_k: Refuse larger k (2^k soups); use the search strategies on a table instead.
    """
    from core.mixing.steps import soup_uris

    if len(domains) > max_k:
        raise ValueError(f"{len(domains)} domains: 2^{len(domains)} soups exceeds the exhaustive limit (k <= {max_k})")
    uris = soup_uris(domains)
    log.info("%d soups over %d domains", len(uris), len(domains))
    return uris


_SOUP_OPTS = dict(container_image=VLLM_IMAGE, retries=1)


# Production: one GPU per eval worker (merging a soup and running the benchmarks), like
# evaluate_checkpoint_benchmarks; the tiny preset runs the CPU twin `evaluate_soup_cpu`.
@task(requests=Resources(cpu="8", mem="64Gi", gpu="1"), limits=Resources(gpu="1"), **_SOUP_OPTS)
def evaluate_soup(uri: str, domains: List[str], experts: List[str], base: str, prep: FlyteDirectory,
                  config: MixingConfig, cache_dir: str) -> FlyteDirectory:
    """One eval worker: merge the soup from its downloaded experts (one at a time), score held-out loss per
    domain, evaluate the benchmarks with the existing runner, delete the soup. Plain checkpoint URIs
    (trained mixtures) are evaluated the same way.

    :param uri: `soup/<a+b>` or a checkpoint URI.
    :param domains: Domain names, aligned with `experts`.
    :param experts: Expert checkpoint URIs.
    :param base: Base checkpoint URI (task arithmetic).
    :param prep: prepare_experts output (held-out shards per domain).
    :param config: MixingConfig (benchmarks, method, eval_max_samples, device).
    :param cache_dir: Root of the benchmark caches.
    :return: records.parquet, summary.parquet (benchmarks + nll_<domain> rows), holds.json.
    """
    from core.mixing.steps import evaluate_soup as run_eval

    work = current_context().working_directory
    wdir = run_eval(uri, dict(zip(domains, experts, strict=True)), base or None, prep.download(), config, cache_dir,
                    os.path.join(work, "soup_eval"), work)
    return FlyteDirectory(wdir)


evaluate_soup_cpu = task(requests=TINY_REQUESTS, **_SOUP_OPTS)(renamed(evaluate_soup.task_function,
                                                                     "evaluate_soup_cpu"))


class SoupAnalysis(NamedTuple):
    report: FlyteDirectory
    proxy_subsets: List[str]
    mix_data: List[FlyteDirectory]
    mix_plans: List[str]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), enable_deck=True)
def analyze_soups(results: List[Optional[FlyteDirectory]], uris: List[str], run: FlyteDirectory,
                  domains: FlyteDirectory, prep: FlyteDirectory, config: MixingConfig) -> SoupAnalysis:
    """Reduce the soup evaluations: score table, best subsets, Pareto front, marginal contributions, replays
    of greedy/beam/surrogate on the measured table, peak soups held; choose and export the proxy mixtures.

    :param results: evaluate_soup outputs (None where a worker was lost).
    :param uris: The soup URIs, aligned with results.
    :param run: Ingest output (for the mixture exports).
    :param domains: assign_domains output.
    :param prep: prepare_experts output (plan.json).
    :param config: MixingConfig.
    """
    from core.evals.results import collect_results
    from core.mixing.analysis import analyze, mixing_report_html
    from core.mixing.pipeline import score_table
    from core.mixing.steps import choose_proxy_subsets, export_mixtures, holds_peak, key_of

    out = _work("soups")
    dirs = [r.download() for r in results if r is not None]
    res = collect_results(dirs, out)
    table = score_table(res.summary, {u: key_of(u) for u in uris})
    plan = json.loads(open(os.path.join(prep.download(), "plan.json")).read())
    result = analyze(table, plan["domains"], config.beam_width, config.seed)
    peaks = holds_peak(dirs)
    result.update(peaks, n_workers_lost=sum(r is None for r in results), n_soups_planned=len(uris))
    table.to_csv(os.path.join(out, "soup_scores.csv"))
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    html = mixing_report_html(table, plan["domains"], result, extra={"soups evaluated": len(table), **peaks})
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(html)
    Deck("soups", html)
    subsets = choose_proxy_subsets(table, config)
    mixes = export_mixtures(subsets, plan, config, _shards(run), [source(run), domains.download()], STEPS,
                            _work("mixtures"))
    log.info("%d soups scored; peaks %s; proxy subsets %s", len(table), peaks, subsets)
    print(f"soup analysis written to {out}")
    return SoupAnalysis(FlyteDirectory(out), subsets, [FlyteDirectory(d) for _, d, _ in mixes],
                        [json.dumps(p) for _, _, p in mixes])


@task(container_image=TRAIN_IMAGE, requests=Resources(cpu="2", mem="8Gi"), enable_deck=True, cache=True,
      cache_version=MIXING_CODE)
def score_domain_perplexity(prep: FlyteDirectory, domains: List[str], experts: List[FlyteDirectory],
                            base: FlyteDirectory, config: MixingConfig) -> FlyteDirectory:
    """Each expert scores its own domain's samples; the expert/base perplexity ratio is written as a
    `perplexity` ledger, so `slice_by_perplexity(scores=<this output>)` ranks and slices by domain perplexity.

    :param prep: prepare_experts output (train/<d> exports).
    :param domains: Domain names, aligned with experts.
    :param experts: Expert checkpoints.
    :param base: The shared base checkpoint.
    :param config: MixingConfig (device, max_seq_len).
    :return: `ledger/perplexity/` (extra.nll = log ratio) and `domain_perplexity/summary.json`.
    """
    from core.foundation.report import page, table_html
    from core.mixing.pipeline import DomainPerplexityStep

    root = prep.download()
    experts_of = {d: ex.download() for d, ex in zip(domains, experts, strict=True)}
    data = {d: os.path.join(root, "train", d, "shards") for d in domains}
    out = _work("domain_ppl")
    step = DomainPerplexityStep(out, experts_of, base.download(), data, config.device, config.max_seq_len)
    step.run(list(domains))
    summary = step.summary()
    Deck("domain perplexity", page(table_html([{"domain": d, **v} for d, v in summary.items()],
                                              "Expert / base perplexity ratio on the expert's own domain")))
    print(f"domain perplexity ledger written to {out}")
    return FlyteDirectory(out)


class MixingOutputs(NamedTuple):
    report: FlyteDirectory
    recommended: FlyteDirectory


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), enable_deck=True)
def prove_proxy(soups: FlyteDirectory, mix_results: List[Optional[FlyteDirectory]], mix_uris: List[str],
                proxy_subsets: List[str], run: FlyteDirectory, domains: FlyteDirectory, prep: FlyteDirectory,
                config: MixingConfig, output_dir: str = "") -> MixingOutputs:
    """Spearman correlation of soup score vs trained-mixture score per benchmark with its 95% bootstrap interval
    over mixtures and the number of pairs (`core.mixing.stats.spearman_interval`, the statistic of
    benchmarks/mixing_proxy.py), then export the recommended mixture (best overall soup) through the existing export.

    :param soups: analyze_soups report dir (soup_scores.csv, analysis.json).
    :param mix_results: evaluate_soup outputs of the trained mixtures.
    :param mix_uris: Their checkpoint URIs (aligned).
    :param proxy_subsets: The subsets the mixtures were trained on (aligned).
    :param run: Ingest output.
    :param domains: assign_domains output.
    :param prep: prepare_experts output.
    :param config: MixingConfig.
    :param output_dir: Optional path/URL to copy the report to.
    """
    import pandas as pd

    from core.evals.results import collect_results
    from core.mixing.analysis import mixing_report_html
    from core.mixing.pipeline import export_ids, score_table, spearman_by_benchmark
    from core.mixing.steps import mixture_ids

    sdir = soups.download()
    out = _work("mixing_report")
    soup_table = pd.read_csv(os.path.join(sdir, "soup_scores.csv"), index_col=0)
    result = json.load(open(os.path.join(sdir, "analysis.json")))
    dirs = [r.download() for r in mix_results if r is not None]
    res = collect_results(dirs, os.path.join(out, "mixtures"))
    trained = score_table(res.summary, dict(zip(mix_uris, proxy_subsets, strict=True)))
    proxy = spearman_by_benchmark(soup_table, trained, seed=config.seed)
    pairs = soup_table.loc[[i for i in trained.index if i in soup_table.index]].add_prefix("soup_").join(
        trained.add_prefix("trained_"))
    proxy.to_csv(os.path.join(out, "proxy_spearman.csv"), index=False)
    pairs.to_csv(os.path.join(out, "proxy_pairs.csv"))
    soup_table.to_csv(os.path.join(out, "soup_scores.csv"))
    plan = json.load(open(os.path.join(prep.download(), "plan.json")))
    best = result["best"]["overall"]["subset"]
    dom_of = {i: d for d, ids in plan["train_ids"].items() for i in ids}
    rec = os.path.join(current_context().working_directory, "recommended")
    manifest = export_ids(_shards(run), [source(run), domains.download()], mixture_ids(best, plan), rec,
                          "mix_" + best, STEPS, dom_of)
    result.update(recommended=best, recommended_counts=manifest["domain_counts"],
                  proxy=proxy.to_dict("records"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    html = mixing_report_html(soup_table, plan["domains"], result, proxy,
                              extra={"recommended": best, "counts": manifest["domain_counts"],
                                     "peak_soups_held": result.get("peak_soups_held")})
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(html)
    Deck("mixing", html)
    if output_dir:
        from core.io.publish import publish

        publish(out, output_dir)
    log.info("proxy: %s", proxy.to_dict("records"))
    print(f"mixing report: {out}; recommended mixture {best}: {rec}")
    return MixingOutputs(FlyteDirectory(out), FlyteDirectory(rec))
