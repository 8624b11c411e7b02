"""The ablation grid: each curation algorithm in isolation on one base dataset -> export -> train -> capped
eval -> one comparison table. Shared steps (ingest, embed, SemDeDup's M, perplexity scores) run once;
every variant is a cheap selection over their ledgers.
"""

from typing import List, NamedTuple, Optional

from flytekit import LaunchPlan, dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.configs import override, preset
from core.runs.ablation import parse_variant
from core.runs.ablation_compare import seed_run_name
from core.runs.config import AblateConfig
from core.runs.steps import BY_NAME, CURATE_STEPS
from core.steps.rephrase.config import tiny_rephrase_config
from tasks.ablation import build_tiny_vision_tower, checkpoint_uris, compare_variants, select_variant
from tasks.export import export_dataset
from tasks.images import CPU_IMAGE
from tasks.rephrase import rephrase_samples
from tasks.resources import overrides
from tasks.train import train_mini_llava
from tasks.validate import validate_ablate_inputs
from workflows.evaluate import ALL_BENCHMARKS, evaluation
from workflows.steps import LAUNCHERS, RunNodes, launch, reference_lm

STANDARD_VARIANTS = ["baseline", "semdedup@0.1", "semdedup@0.3", "ppl@0-90", "ppl_decile@1", "ppl_decile@10"]


class AblationOutputs(NamedTuple):
    comparison: FlyteDirectory
    evaluation: FlyteDirectory


@dynamic(container_image=CPU_IMAGE)
def ablate_steps(
    source: str,
    image_root: str,
    variants: List[str],
    eval_cache: str,
    config: AblateConfig,
    benchmarks: List[str] = ALL_BENCHMARKS,
    reference_source: str = "",
    reference_image_root: str = "",
    reference_ids: Optional[FlyteFile] = None,
    output_dir: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> AblationOutputs:
    """The grid of `ablate` (see its docstring for the inputs), wired at run time from the variants.

    The shared steps are the step table's (core/runs/steps.py) launchers, each run in isolation on the embedded
    baseline; every node gets its profile from its config and the run (the tiny embed preset: a CPU run).
    """
    parsed = [parse_variant(v) for v in variants]  # fail before any compute on a bad spec
    c = config
    run = RunNodes(config=c, source=source, image_root=image_root, format=format, eval_cache=eval_cache,
                   benchmarks=benchmarks, reference_source=reference_source,
                   reference_image_root=reference_image_root, reference_ids=reference_ids)
    emb = launch(run, [BY_NAME["ingest"], BY_NAME["embed"]])
    ingested, gpu = run.outs["ingest"], run.run_gpu
    lm = reference_lm(run)
    shared = [ingested, emb]
    needs = {p.needs for p in parsed}
    for step in CURATE_STEPS:  # in isolation: each sees the whole embedded baseline
        if step.name in needs:
            shared.append(LAUNCHERS[step.name](run, emb))
    rephrased = None
    if any(p.kind == "rephrased" for p in parsed):
        rcfg = tiny_rephrase_config()
        rephrased = rephrase_samples(run=ingested, config=rcfg, model_dir=lm, prev=emb).with_overrides(
            **overrides("rephrase", rcfg, gpu)).out
    train_profile = overrides("train", c.train_config, gpu)
    vision = build_tiny_vision_tower()
    exports, ckpts, metrics, base_export = [], [], [], None
    for p in parsed:
        ids = select_variant(steps=shared, variant=p.spec)
        ex = export_dataset(run=ingested, steps=[emb], subset_ids=ids, subset_name=p.name,
                            rephrased=rephrased if p.kind == "rephrased" else None)
        tr = train_mini_llava(data=ex.dir, vision_model="mmcurate-tiny-vit", lm=lm, vision_dir=vision,
                              config=c.train_config, run_name=p.spec).with_overrides(**train_profile)
        exports.append(ex)
        ckpts.append(tr.checkpoints)
        metrics.append(tr.metrics)
        base_export = ex if p.kind == "baseline" else base_export
    seed_ckpts, seed_metrics = [], []
    if base_export is not None:  # the noise floor: the same baseline data, other seeds (init, order, held-out set)
        for k in range(1, c.baseline_seeds):
            tr = train_mini_llava(data=base_export.dir, vision_model="mmcurate-tiny-vit", lm=lm, vision_dir=vision,
                                  config=override(c.train_config, seed=c.train_config.seed + k),
                                  run_name=seed_run_name(k)).with_overrides(**train_profile)
            seed_ckpts.append(tr.checkpoints)
            seed_metrics.append(tr.metrics)
    uris = checkpoint_uris(per_variant=ckpts, seeds=seed_ckpts)
    ev = evaluation(checkpoints=uris.flat, benchmarks=benchmarks, cache_dir=eval_cache, max_samples=c.eval_max_samples,
                    gpu=gpu)
    table = compare_variants(variants=variants, checkpoints=uris.per_variant, exports=exports, evaluation=ev,
                             tokenizer=lm, output_dir=output_dir, steps=shared, known_bad_ids=known_bad_ids,
                             seed_checkpoints=uris.per_seed, train_metrics=metrics, seed_train_metrics=seed_metrics)
    return AblationOutputs(comparison=table, evaluation=ev)


@workflow
def ablate(
    source: str,
    image_root: str,
    variants: List[str],
    eval_cache: str,
    config: AblateConfig = preset(AblateConfig, "tiny"),
    benchmarks: List[str] = ALL_BENCHMARKS,
    reference_source: str = "",
    reference_image_root: str = "",
    reference_ids: Optional[FlyteFile] = None,
    output_dir: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> AblationOutputs:
    """Train and evaluate one model per dataset variant and compare them with the baseline.

    :param source: Base dataset JSON/JSONL (path or URL).
    :param image_root: Its image folder.
    :param variants: Variant specs: baseline, semdedup@F, semdedup_eps@E, ppl@LO-HI, ppl_decile@K, rephrased,
        decontam (minus near-copies of the eval items of `benchmarks`), mined (only the eval items' nearest
        training neighbours).
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`).
    :param config: AblateConfig (core/runs/config.py): shard size, embed/dedup/decontam configs, reference-LM steps,
        training recipe per variant (`train_config`, a TrainConfig), eval cap, `baseline_seeds` (the baseline is
        trained that many times with different seeds: the noise floor of the comparison; 2 in the tiny preset). On the CLI a partial JSON merged onto
        the tiny preset: `{"train_config": {"max_steps": 30}, "eval_max_samples": 8}`, `{"embed_config": "siglip2"}`.
    :param benchmarks: Benchmarks to evaluate every checkpoint on.
    :param reference_source: Trusted dataset the perplexity reference LM (and the trained model's LM) learns from;
        empty: the base dataset.
    :param reference_image_root: Image folder of the reference dataset.
    :param reference_ids: Optional JSON ids (or an object with a "clean" list) of its trusted samples.
    :param output_dir: Where to publish comparison.{parquet,csv} and the evaluation results (path or URL).
    :param format: Input format of `source` (auto, json|jsonl|wds|parquet, llava|messages; docs/ingest.md).
    :param known_bad_ids: Optional id list of known low-quality samples: the comparison table says how many of
        them each variant removed and kept.

    Every input is checked first (validate_ablate_inputs, seconds); the grid then runs in `ablate_steps`.
    The tiny embed preset makes a CPU run (every node on two CPUs); production presets request GPUs.
    """
    inputs = dict(source=source, image_root=image_root, variants=variants, eval_cache=eval_cache, config=config,
                  benchmarks=benchmarks, reference_source=reference_source, reference_image_root=reference_image_root,
                  format=format, known_bad_ids=known_bad_ids)
    checked = validate_ablate_inputs(**inputs)
    out = ablate_steps(reference_ids=reference_ids, output_dir=output_dir, **inputs)
    checked >> out.comparison
    return out.comparison, out.evaluation


# A standard ablation with fixed inputs (the demo dataset layout of `make demo`); override paths on a cluster.
standard_ablation = LaunchPlan.get_or_create(
    ablate,
    name="standard_ablation",
    default_inputs={"variants": STANDARD_VARIANTS, "config": preset(AblateConfig, "tiny", train_config={"epochs": 2})},
)
