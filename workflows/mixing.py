"""Data mixing by model soups: domains -> one expert per domain (equal compute, capped map) -> every subset's
soup merged inside capped eval workers -> analysis and search replays -> mixtures trained for the proof of the
proxy -> Spearman per benchmark -> the recommended mixture exported; domain perplexity alongside.

`mixing_search` starts from a dataset (ingest, domains, a tiny base trained on all domains); `soup_mixing`
is the part that starts from a run, its domains and a base checkpoint. Both are static workflows; the caps are
map_task concurrencies compiled into the spec (EXPERT_CONCURRENCY, and EVAL_CONCURRENCY from
workflows/evaluate.py for the soups: at most that many soups exist at once).
"""

from functools import partial
from typing import List, NamedTuple, Optional

from flytekit import LaunchPlan, map_task, workflow
from flytekit.types.directory import FlyteDirectory

from core.mixing.pipeline import MixingConfig, tiny_mixing_config
from tasks.ablation import build_tiny_vision_tower
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.mixing import (
    analyze_soups,
    assign_domains,
    base_train_config,
    checkpoint_uris,
    evaluate_soup,
    evaluate_soup_cpu,
    last_checkpoint,
    plan_soups,
    prepare_experts,
    prove_proxy,
    score_domain_perplexity,
    train_expert,
    train_expert_cpu,
)
from tasks.perplexity import train_reference_lm
from tasks.train import train_mini_llava, train_mini_llava_cpu
from workflows.evaluate import EVAL_CONCURRENCY, EVAL_MIN_SUCCESS_RATIO

EXPERT_CONCURRENCY = 4  # expert trainings at once (one GPU worker each on a cluster)


class MixingResult(NamedTuple):
    report: FlyteDirectory
    recommended: FlyteDirectory
    soups: FlyteDirectory
    domain_perplexity: FlyteDirectory


def _soup_mixing_wf(name: str, trainer_task, eval_task):
    """`soup_mixing` (GPU experts and eval workers) or its CPU twin, over the given expert/eval tasks."""

    def soup_mixing(run: FlyteDirectory, domains: FlyteDirectory, base: FlyteDirectory, config: MixingConfig,
                    eval_cache: str, external_command: str = "", output_dir: str = "") -> MixingResult:
        """Experts, soups, search, proof of the proxy and export, from a run with domains and a base checkpoint.

        :param run: Ingest output.
        :param domains: assign_domains output.
        :param base: The shared start checkpoint of every expert and mixture.
        :param config: MixingConfig.
        :param eval_cache: Root of the benchmark caches.
        :param external_command: The team's trainer command template (empty: built-in trainer).
        :param output_dir: Optional path/URL for the final report.
        """
        prep = prepare_experts(run=run, domains=domains, config=config)
        trainer = partial(trainer_task, base=base, config=config, external_command=external_command)
        experts = map_task(trainer, concurrency=EXPERT_CONCURRENCY)(data=prep.data, plan=prep.plans)
        expert_uris = checkpoint_uris(checkpoints=experts)
        base_uri = checkpoint_uris(checkpoints=[base])
        soups = plan_soups(domains=prep.domains, max_k=config.exhaustive_max_k)
        worker = partial(eval_task, domains=prep.domains, experts=expert_uris, base=base_uri[0], prep=prep.prep,
                         config=config, cache_dir=eval_cache)
        results = map_task(worker, concurrency=EVAL_CONCURRENCY, min_success_ratio=EVAL_MIN_SUCCESS_RATIO)(uri=soups)
        ana = analyze_soups(results=results, uris=soups, run=run, domains=domains, prep=prep.prep, config=config)
        mixes = map_task(trainer, concurrency=EXPERT_CONCURRENCY)(data=ana.mix_data, plan=ana.mix_plans)
        mix_uris = checkpoint_uris(checkpoints=mixes)
        mix_results = map_task(worker, concurrency=EVAL_CONCURRENCY,
                               min_success_ratio=EVAL_MIN_SUCCESS_RATIO)(uri=mix_uris)
        final = prove_proxy(soups=ana.report, mix_results=mix_results, mix_uris=mix_uris,
                            proxy_subsets=ana.proxy_subsets, run=run, domains=domains, prep=prep.prep, config=config, output_dir=output_dir)
        ppl = score_domain_perplexity(prep=prep.prep, domains=prep.domains, experts=experts, base=base, config=config)
        return MixingResult(report=final.report, recommended=final.recommended, soups=ana.report,
                            domain_perplexity=ppl)

    soup_mixing.__name__ = soup_mixing.__qualname__ = name
    return workflow(soup_mixing)


soup_mixing = _soup_mixing_wf("soup_mixing", train_expert, evaluate_soup)
# The tiny preset (CPU experts and eval workers: the embedded models), same caps.
soup_mixing_cpu = _soup_mixing_wf("soup_mixing_cpu", train_expert_cpu, evaluate_soup_cpu)


def _mixing_search_wf(name: str, train_task, soup_wf):
    """`mixing_search` (GPU base training and soups) or its CPU twin."""

    def mixing_search(
        source: str,
        image_root: str,
        eval_cache: str,
        config: MixingConfig = tiny_mixing_config(),
        domain_mode: str = "field",
        k: int = 4,
        include_domains: Optional[List[str]] = None,
        base_steps: int = 20,
        lm_steps: int = 300,
        shard_max_samples: int = 1000,
        external_command: str = "",
        output_dir: str = "",
    ) -> MixingResult:
        """Data mixing by model soups on a dataset: ingest, domains, a base trained on all domains for `base_steps`,
        then `soup_mixing`.

        :param source: Dataset JSON/JSONL (path or URL).
        :param image_root: Its image folder.
        :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`).
        :param config: MixingConfig (the default is the tiny CPU preset).
        :param domain_mode: `field` (the source's domain/source field); `kmeans` needs the embeddings of an
            embed run (use assign_domains + soup_mixing directly).
        :param k: Clusters for kmeans.
        :param include_domains: Keep only these domains (empty: all).
        :param base_steps: Steps of the shared base (built-in trainer, on all domains' training data).
        :param lm_steps: Steps of the embedded tiny LM the base starts from.
        :param shard_max_samples: Samples per ingested shard.
        :param external_command: The team's trainer command template (empty: built-in trainer).
        :param output_dir: Optional path/URL for the final report.
        """
        run = ingest_dataset(source=source, image_root=image_root, shard_max_samples=shard_max_samples,
                             source_fingerprint=fingerprint_source(source=source, image_root=image_root))
        doms = assign_domains(run=run, mode=domain_mode, k=k, include=include_domains)
        prep = prepare_experts(run=run, domains=doms, config=config)
        lm = train_reference_lm(run=run, steps=lm_steps)
        vision = build_tiny_vision_tower()
        base = train_task(data=prep.all_data, vision_model="mmcurate-tiny-vit", lm=lm, vision_dir=vision,
                          config=base_train_config(config=config, steps=base_steps))
        return soup_wf(run=run, domains=doms, base=last_checkpoint(checkpoints=base.checkpoints),
                       config=config, eval_cache=eval_cache, external_command=external_command,
                       output_dir=output_dir)

    mixing_search.__name__ = mixing_search.__qualname__ = name
    return workflow(mixing_search)


mixing_search = _mixing_search_wf("mixing_search", train_mini_llava, soup_mixing)
# The tiny preset: every training and eval worker on its CPU twin (what mixing_demo launches).
mixing_search_cpu = _mixing_search_wf("mixing_search_cpu", train_mini_llava_cpu, soup_mixing_cpu)


# The demo preset: 4 image domains of the demo data (charts, documents, counting, photos), tiny CPU models.
mixing_demo = LaunchPlan.get_or_create(
    mixing_search_cpu,
    name="mixing_demo",
    default_inputs={"config": tiny_mixing_config(),
                    "include_domains": ["chart", "counting", "document", "photo"]},
)
