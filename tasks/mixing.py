"""Mixing-by-soups tasks: domains, expert data and plans, expert/mixture training, soup evaluation inside
the eval worker, the soup analysis, domain perplexity, the proof of the proxy and the export.

Thin wrappers: each task turns its FlyteDirectory inputs into paths, calls one function of core/mixing
(`core.mixing.domains`, `core.mixing.steps`, `core.mixing.results`), writes its deck and wraps the outputs.
Configs cross as dataclasses (`DomainConfig`, `MixingConfig`; on the CLI a partial JSON onto their preset).
The GPU tasks' decorators state the production profile; workflows/mixing.py gives each node the run's profile.
"""

from __future__ import annotations

import json
import logging
import os
from typing import List, NamedTuple, Optional

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory

from core.mixing.domains import DomainConfig, field_domain_config
from core.mixing.pipeline import MixingConfig
from core.train.config import TrainConfig
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS
from tasks.images import CPU_IMAGE, TRAIN_IMAGE, VLLM_IMAGE
from tasks.paths import source, workdir

log = logging.getLogger(__name__)
MIXING_CODE = task_version(__name__)


def _shards(run: FlyteDirectory) -> list[str]:
    from core.foundation.step import shards_of

    return shards_of(source(run))


def _ledgers(run: FlyteDirectory, domains: FlyteDirectory) -> list[str]:
    """The ledger folders a mixing export reads, in `core.mixing.results.STEPS` order (ingest, domains)."""
    return [source(run), domains.download()]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), enable_deck=True, deck_fields=DECK_FIELDS, cache=True,
      cache_version=MIXING_CODE)
def assign_domains(run: FlyteDirectory, config: DomainConfig = field_domain_config(),
                   embeddings: Optional[FlyteDirectory] = None) -> FlyteDirectory:
    """Give every ingested sample a domain: a field of the source (`domain`, `metadata.domain`/`dataset`,
    `source`) or k-means on existing embeddings; writes the `domains` ledger.

    :param run: Ingest output (`shards/`, `ledger/ingest/`).
    :param config: DomainConfig: mode (`field` | `kmeans`), k, embed_kind (`image` | `text`), include (keep only
        these domains, others quarantined `domain_excluded:<d>`; empty: all), min_samples (smaller domains are
        quarantined `domain_too_small:<d>`), seed. CLI: a partial JSON, e.g. `'{"mode": "kmeans", "k": 6}'`.
    :param embeddings: embed_shards output (required for `kmeans`).
    :return: `ledger/domains/` and `domains/domains.json` ({domain: [ids]}), `domains/summary.json`.
    """
    from core.foundation.report import page, table_html
    from core.io.wds import iter_samples
    from core.mixing.domains import assign_domains as run_assign

    if config.mode == "kmeans" and embeddings is None:
        raise ValueError("mode=kmeans needs embeddings (an embed_shards output)")
    emb = None
    if config.mode == "kmeans":
        from core.steps.embed.store import load_embeddings

        emb = load_embeddings(embeddings.download(), config.embed_kind)
    out = str(workdir("domains_out"))
    summary = run_assign(iter_samples(_shards(run), load_images=False, verify_images=False), out, config, emb)
    log.info("domains: %s", summary)
    Deck("domains", page(table_html([{"domain": d, "n": n} for d, n in summary["domains"].items()], "Domains"),
                         table_html([{"reason": r, "n": n} for r, n in summary["reasons"].items()], "Quarantined")))
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
    from core.mixing.results import prepare_expert_data

    out, dirs = str(workdir("mixing_prep")), _ledgers(run, domains)
    plan = prepare_expert_data(_shards(run), dirs, dirs[1], config, out)
    log.info("experts: %d domains, %d steps x %d each; sizes %s", len(plan["domains"]), plan["budget_steps"],
             plan["batch_size"], plan["sizes"])
    return ExpertPrep(FlyteDirectory(out), FlyteDirectory(os.path.join(out, "all")), plan["domains"],
                      [FlyteDirectory(os.path.join(out, "train", d)) for d in plan["domains"]],
                      [json.dumps(p) for p in plan["plans"]])


_EXPERT_OPTS = dict(container_image=TRAIN_IMAGE, retries=1, cache=True, cache_version=MIXING_CODE)


# The decorator states the production profile (core/runs/steps.py GPU_PROFILES["expert"]: one GPU per training);
# workflows/mixing.py overrides the node with the run's profile (the tiny preset, device=cpu: two CPUs, no GPU).
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
    from core.mixing.plan import ExpertPlan
    from core.mixing.steps import train_expert as run_train

    p = ExpertPlan(**json.loads(plan))
    ck = run_train(os.path.join(data.download(), "shards"), base.download(), p, config,
                   str(workdir("expert_" + p.name)), external_command)
    log.info("%s: %d steps x %d on %d samples (%d epochs) -> %s", p.name, p.steps, p.batch_size, p.n_samples,
             p.epochs, ck)
    return FlyteDirectory(ck)


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


# The decorator states the production profile (GPU_PROFILES["soup"]: one GPU per eval worker merging a soup and
# running the benchmarks); workflows/mixing.py overrides the node with the run's profile.
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


class SoupAnalysis(NamedTuple):
    report: FlyteDirectory
    proxy_subsets: List[str]
    mix_data: List[FlyteDirectory]
    mix_plans: List[str]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), enable_deck=True, deck_fields=DECK_FIELDS)
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
    from core.mixing.results import analyze_soup_results, load_plan

    out = str(workdir("soups"))
    got = analyze_soup_results([r.download() for r in results if r is not None], sum(r is None for r in results),
                               uris, load_plan(prep.download()), config, _shards(run), _ledgers(run, domains), out,
                               str(workdir("mixtures")))
    Deck("soups", got["html"])
    log.info("%d soups scored; peaks %s; proxy subsets %s", len(got["table"]), got["peaks"], got["subsets"])
    return SoupAnalysis(FlyteDirectory(out), got["subsets"], [FlyteDirectory(d) for _, d, _ in got["mixtures"]],
                        [json.dumps(p) for _, _, p in got["mixtures"]])


@task(container_image=TRAIN_IMAGE, requests=Resources(cpu="2", mem="8Gi"), enable_deck=True, deck_fields=DECK_FIELDS, cache=True,
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
    out = str(workdir("domain_ppl"))
    step = DomainPerplexityStep(out, experts_of, base.download(), data, config.device, config.max_seq_len)
    step.run(list(domains))
    summary = step.summary()
    Deck("domain perplexity", page(table_html([{"domain": d, **v} for d, v in summary.items()],
                                              "Expert / base perplexity ratio on the expert's own domain")))
    return FlyteDirectory(out)


class MixingOutputs(NamedTuple):
    report: FlyteDirectory
    recommended: FlyteDirectory


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), enable_deck=True, deck_fields=DECK_FIELDS)
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
    from core.mixing.results import load_plan
    from core.mixing.results import prove_proxy as run_proof

    out, rec = str(workdir("mixing_report")), str(workdir("recommended"))
    got = run_proof(soups.download(), [r.download() for r in mix_results if r is not None], mix_uris, proxy_subsets,
                    load_plan(prep.download()), config, _shards(run), _ledgers(run, domains), out, rec)
    Deck("mixing", got["html"])
    if output_dir:
        from core.io.publish import publish

        publish(out, output_dir)
    log.info("proxy: %s; recommended mixture %s: %s", got["proxy"].to_dict("records"), got["best"], rec)
    return MixingOutputs(FlyteDirectory(out), FlyteDirectory(rec))
