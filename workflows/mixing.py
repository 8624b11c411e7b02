"""Data mixing by model soups: domains -> one expert per domain (equal compute, capped map) -> every subset's
soup merged inside capped eval workers -> analysis and search replays -> mixtures trained for the proof of the
proxy -> Spearman per benchmark -> the recommended mixture exported; domain perplexity alongside.

`mixing_search` starts from a dataset (ingest, domains, a tiny base trained on all domains); `soup_mixing`
is the part that starts from a run, its domains and a base checkpoint. Both are `@workflow`s (what launch plans
target); their GPU nodes live in `@dynamic` bodies (`soup_mixing_steps`, `train_base`) that give each node the
resource profile of the run (tasks/resources.py `overrides`, core/runs/steps.py `uses_gpu`): the MixingConfig's
`device` decides (`cpu`, the tiny preset: two CPUs and no GPU anywhere; `cuda` or `auto`: one GPU per expert
training, eval worker and base training, the production profile). The caps are map_task concurrencies
compiled into the dynamic spec (EXPERT_CONCURRENCY, and EVAL_CONCURRENCY from workflows/evaluate.py for the
soups: at most that many soups exist at once).
"""

from functools import partial
from typing import NamedTuple

from flytekit import LaunchPlan, Resources, dynamic, map_task, workflow
from flytekit.types.directory import FlyteDirectory

from core.io.ingest import IngestOptions, default_ingest_options
from core.mixing.domains import DomainConfig, field_domain_config
from core.mixing.pipeline import MixingConfig, tiny_mixing_config
from tasks.ablation import build_tiny_vision_tower
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.mixing import (
    analyze_soups,
    assign_domains,
    base_train_config,
    checkpoint_uris,
    evaluate_soup,
    last_checkpoint,
    plan_soups,
    prepare_experts,
    prove_proxy,
    score_domain_perplexity,
    train_expert,
)
from tasks.perplexity import train_reference_lm
from tasks.resources import overrides
from tasks.train import train_mini_llava
from workflows.evaluate import EVAL_CONCURRENCY, EVAL_MIN_SUCCESS_RATIO

EXPERT_CONCURRENCY = 4  # expert trainings at once (one GPU worker each on a cluster)
# A mixing run has no embed config: it is a GPU run unless its MixingConfig says device=cpu (the tiny preset).
MIXING_RUN_GPU = True
_DYNAMIC = dict(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="2Gi"))


class MixingResult(NamedTuple):
    report: FlyteDirectory
    recommended: FlyteDirectory
    soups: FlyteDirectory
    domain_perplexity: FlyteDirectory


@dynamic(**_DYNAMIC)
def soup_mixing_steps(run: FlyteDirectory, domains: FlyteDirectory, base: FlyteDirectory, config: MixingConfig,
                      eval_cache: str, external_command: str, output_dir: str) -> MixingResult:
    """The body of `soup_mixing`, with the expert trainings and eval workers on the config's profile."""
    expert_profile = overrides("expert", config, MIXING_RUN_GPU)
    soup_profile = overrides("soup", config, MIXING_RUN_GPU)
    prep = prepare_experts(run=run, domains=domains, config=config)
    trainer = partial(train_expert, base=base, config=config, external_command=external_command)
    experts = map_task(trainer, concurrency=EXPERT_CONCURRENCY)(data=prep.data, plan=prep.plans).with_overrides(
        **expert_profile)
    expert_uris = checkpoint_uris(checkpoints=experts)
    base_uri = checkpoint_uris(checkpoints=[base])
    soups = plan_soups(domains=prep.domains, max_k=config.exhaustive_max_k)
    worker = partial(evaluate_soup, domains=prep.domains, experts=expert_uris, base=base_uri[0], prep=prep.prep,
                     config=config, cache_dir=eval_cache)
    results = map_task(worker, concurrency=EVAL_CONCURRENCY, min_success_ratio=EVAL_MIN_SUCCESS_RATIO)(
        uri=soups).with_overrides(**soup_profile)
    ana = analyze_soups(results=results, uris=soups, run=run, domains=domains, prep=prep.prep, config=config)
    mixes = map_task(trainer, concurrency=EXPERT_CONCURRENCY)(data=ana.mix_data, plan=ana.mix_plans).with_overrides(
        **expert_profile)
    mix_uris = checkpoint_uris(checkpoints=mixes)
    mix_results = map_task(worker, concurrency=EVAL_CONCURRENCY, min_success_ratio=EVAL_MIN_SUCCESS_RATIO)(
        uri=mix_uris).with_overrides(**soup_profile)
    final = prove_proxy(soups=ana.report, mix_results=mix_results, mix_uris=mix_uris, proxy_subsets=ana.proxy_subsets,
                        run=run, domains=domains, prep=prep.prep, config=config, output_dir=output_dir)
    ppl = score_domain_perplexity(prep=prep.prep, domains=prep.domains, experts=experts, base=base, config=config)
    return MixingResult(report=final.report, recommended=final.recommended, soups=ana.report, domain_perplexity=ppl)


@workflow
def soup_mixing(run: FlyteDirectory, domains: FlyteDirectory, base: FlyteDirectory, config: MixingConfig,
                eval_cache: str, external_command: str = "", output_dir: str = "") -> MixingResult:
    """Experts, soups, search, proof of the proxy and export, from a run with domains and a base checkpoint.

    :param run: Ingest output.
    :param domains: assign_domains output.
    :param base: The shared start checkpoint of every expert and mixture.
    :param config: MixingConfig; its `device` is also the run's resource profile (`cpu`: two CPUs per training
        and eval worker, no GPU; `cuda` / `auto`: one GPU each). CLI: a partial JSON onto the tiny preset.
    :param eval_cache: Root of the benchmark caches.
    :param external_command: The team's trainer command template (empty: built-in trainer).
    :param output_dir: Optional path/URL for the final report.
    """
    return soup_mixing_steps(run=run, domains=domains, base=base, config=config, eval_cache=eval_cache,
                             external_command=external_command, output_dir=output_dir)


@dynamic(**_DYNAMIC)
def train_base(data: FlyteDirectory, lm: FlyteDirectory, vision: FlyteDirectory, config: MixingConfig,
               steps: int) -> FlyteDirectory:
    """The shared base: `steps` steps of the built-in trainer on all domains, on the config's profile; its last
    checkpoint."""
    tr = train_mini_llava(data=data, vision_model="mmcurate-tiny-vit", lm=lm, vision_dir=vision,
                          config=base_train_config(config=config, steps=steps)).with_overrides(
        **overrides("train", config, MIXING_RUN_GPU))
    return last_checkpoint(checkpoints=tr.checkpoints)


@workflow
def mixing_search(
    source: str,
    image_root: str,
    eval_cache: str,
    config: MixingConfig = tiny_mixing_config(),
    domain_config: DomainConfig = field_domain_config(),
    base_steps: int = 20,
    lm_steps: int = 300,
    ingest_config: IngestOptions = default_ingest_options(),
    external_command: str = "",
    output_dir: str = "",
) -> MixingResult:
    """Data mixing by model soups on a dataset: ingest, domains, a base trained on all domains for `base_steps`,
    then `soup_mixing`.

    :param source: Dataset JSON/JSONL (path or URL).
    :param image_root: Its image folder.
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`).
    :param config: MixingConfig (the default is the tiny CPU preset); its `device` is the run's resource profile.
    :param domain_config: DomainConfig (default: domains from the source's domain/source field); `include` keeps
        only these domains. `kmeans` needs the embeddings of an embed run: use assign_domains + soup_mixing.
        CLI: a partial JSON, e.g. `'{"include": ["chart", "document"]}'`.
    :param base_steps: Steps of the shared base (built-in trainer, on all domains' training data).
    :param lm_steps: Steps of the embedded tiny LM the base starts from.
    :param ingest_config: IngestOptions (samples per ingested shard, bounds at the door; JSON on the CLI).
    :param external_command: The team's trainer command template (empty: built-in trainer).
    :param output_dir: Optional path/URL for the final report.
    """
    run = ingest_dataset(source=source, image_root=image_root, config=ingest_config,
                         source_fingerprint=fingerprint_source(source=source, image_root=image_root))
    doms = assign_domains(run=run.dir, config=domain_config)
    prep = prepare_experts(run=run.dir, domains=doms, config=config)
    lm = train_reference_lm(run=run, steps=lm_steps)
    base = train_base(data=prep.all_data, lm=lm, vision=build_tiny_vision_tower(), config=config, steps=base_steps)
    return soup_mixing(run=run.dir, domains=doms, base=base, config=config, eval_cache=eval_cache,
                       external_command=external_command, output_dir=output_dir)


# The demo preset: 4 image domains of the demo data (charts, documents, counting, photos), tiny CPU models.
mixing_demo = LaunchPlan.get_or_create(
    mixing_search,
    name="mixing_demo",
    default_inputs={"config": tiny_mixing_config(),
                    "domain_config": field_domain_config(include=["chart", "counting", "document", "photo"])},
)
