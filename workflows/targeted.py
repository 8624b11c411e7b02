"""Targeted (MM-Gen-style) generation: reference -> subgroups -> retrieval -> generation (capped map over
shards) -> filters -> export as a named subset; and the ablation "baseline + generated for task X".

One `@workflow` each (what the launch plans target); the nodes whose resources depend on the run live in
`@dynamic` bodies that give each node its profile (tasks/resources.py `overrides`, the one rule of
core/runs/steps.py): the run is a GPU run when its embed config puts the embedders on GPUs (`run_uses_gpu`), and
a step config that names its device decides for its own nodes (`uses_gpu`): the TargetedConfig's `device` for
the generation workers, the TrainConfig's for the trainings. The tiny presets (tiny embed config, `tiny`
TargetedConfig with device=cpu) request no GPU anywhere; `targeted_qwen_vl` (SigLIP2, Qwen2.5-VL on vLLM) one
GPU per embedding actor and per generation shard.
"""

from functools import partial
from types import SimpleNamespace
from typing import List, NamedTuple, Optional

from flytekit import LaunchPlan, Resources, dynamic, map_task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.configs import override
from core.io.ingest import IngestOptions, default_ingest_options
from core.runs.steps import run_uses_gpu
from core.steps.dedup.config import DecontamConfig, tiny_decontam_config
from core.steps.embed.config import EmbedConfig, siglip2_embed_config, tiny_embed_config
from core.targeted.config import TargetedConfig, qwen_vl_targeted_config, tiny_targeted_config
from core.train.config import TrainConfig, default_train_config
from tasks.ablation import build_tiny_vision_tower, checkpoint_uris, compare_variants
from tasks.embed import embed_overrides, embed_shards
from tasks.export import export_dataset
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.perplexity import train_reference_lm
from tasks.resources import overrides
from tasks.targeted import (
    build_tiny_vlm,
    filter_generated_samples,
    generate_targeted_shard,
    mix_exports,
    retrieve_images,
    split_reference,
)
from tasks.train import train_mini_llava
from tasks.types import StepOut
from workflows.dedup import decontam
from workflows.evaluate import ALL_BENCHMARKS, evaluation

_DYNAMIC = dict(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="2Gi"))


class TargetedOutputs(NamedTuple):
    export: StepOut
    filtered: FlyteDirectory
    retrieved: FlyteDirectory


@dynamic(**_DYNAMIC)
def targeted_steps(
    ref: StepOut,
    pool: StepOut,
    reference_ids: Optional[FlyteFile],
    eval_cache: str,
    benchmarks: List[str],
    embed_config: EmbedConfig,
    decontam_config: DecontamConfig,
    config: TargetedConfig,
    model_dir: Optional[FlyteDirectory],
    tiny_vlm_steps: int,
    lm_steps: int,
) -> TargetedOutputs:
    """The body of `targeted_generation` after ingest, each node on the run's profile; generation is a map over
    the retrieval's shards capped at `config.max_parallel_shards`."""
    run_gpu = run_uses_gpu(embed_config)
    ref_emb = embed_shards(shards=ref.dir, prev=ref, config=embed_config).with_overrides(**embed_overrides(embed_config))
    pool_emb = embed_shards(shards=pool.dir, prev=pool, config=embed_config).with_overrides(
        **embed_overrides(embed_config))
    dc = decontam(embeddings=pool_emb, eval_cache=eval_cache, benchmarks=benchmarks, embed_config=embed_config,
                  config=decontam_config, prev=pool_emb, run=pool)
    sub = split_reference(reference=ref, reference_ids=reference_ids, config=config)
    vlm = build_tiny_vlm(reference=ref, subgroups=sub, model_dir=model_dir, config=config, steps=tiny_vlm_steps)
    ret = retrieve_images(subgroups=sub, reference_embeddings=ref_emb, pool_embeddings=pool_emb, pool=pool,
                          pool_decontam=dc, config=config)
    gen = partial(generate_targeted_shard, retrieved=ret.out_dir, subgroups=sub, pool=pool, model=vlm, config=config)
    gens = map_task(gen, concurrency=config.max_parallel_shards)(shard=ret.shards).with_overrides(
        **overrides("generate", config, run_gpu))
    lm = train_reference_lm(run=ref, reference_ids=reference_ids, steps=lm_steps)
    f = filter_generated_samples(generations=gens, subgroups=sub, ppl_model=lm, eval_cache=eval_cache,
                                 benchmarks=benchmarks, config=config).with_overrides(
        **overrides("tg_filter", SimpleNamespace(fanout=config.filter_fanout), run_gpu))  # its pod
    ex = export_dataset(run=f.generated, steps=f.filters, subset_ids=f.kept_ids, subset_name=config.subset_name)
    return TargetedOutputs(export=ex, filtered=f.filters[0].dir, retrieved=ret.out_dir)


def _ingest(source: str, image_root: str, ingest_config: IngestOptions):
    return ingest_dataset(source=source, image_root=image_root, config=ingest_config,
                          source_fingerprint=fingerprint_source(source=source, image_root=image_root))


@workflow
def targeted_generation(
    reference_source: str,
    reference_image_root: str,
    pool_source: str,
    pool_image_root: str,
    reference_ids: Optional[FlyteFile] = None,
    eval_cache: str = "",
    benchmarks: List[str] = ALL_BENCHMARKS,
    embed_config: EmbedConfig = tiny_embed_config(),
    decontam_config: DecontamConfig = tiny_decontam_config(),
    config: TargetedConfig = tiny_targeted_config(),
    model_dir: Optional[FlyteDirectory] = None,
    tiny_vlm_steps: int = 300,
    lm_steps: int = 300,
    ingest_config: IngestOptions = default_ingest_options(),
) -> TargetedOutputs:
    """Generate task-shaped Q&A for a weak eval task: subgroups of its reference set, similar pool images per
    subgroup, a VLM writing new pairs with in-context examples, filters, export as a named subset.

    :param reference_source: The target task's reference set (its train/val split, never test items): JSON/JSONL.
    :param reference_image_root: Image folder of the reference set.
    :param pool_source: The large unlabeled or weakly labeled pool (JSON/JSONL).
    :param pool_image_root: Image folder of the pool.
    :param reference_ids: Optional id list of trusted reference samples (a JSON list, an object with a "clean" list
        such as the demo's ground_truth.json, Parquet `sample_id`, or one id per line).
    :param eval_cache: Root of the benchmark caches; the pool is decontaminated against their test items (images)
        and the generated questions against their questions.
    :param benchmarks: Benchmarks to decontaminate against.
    :param embed_config: EmbedConfig of reference and pool (CLI: JSON onto the tiny preset, `{"preset": "siglip2"}`);
        it also makes the run a GPU run (embedders on GPUs) or a CPU run.
    :param decontam_config: Image decontamination of the pool (threshold, k, kind).
    :param config: TargetedConfig (subgroups, budgets, prompts, filters, backend, device, subset_name); CLI: a
        partial JSON onto the `tiny` preset (tiny LLaVA, transformers, CPU), or `{"preset": "qwen2.5-vl"}` (vLLM,
        one GPU per shard). Its `model` is filled in from `model_dir` (or the tiny model built here).
    :param model_dir: Generator model directory (required for the vllm backend; transformers builds the tiny one).
    :param tiny_vlm_steps: Training steps of the tiny VLM (when no model_dir is given).
    :param lm_steps: Training steps of the reference LM used for perplexity.
    :param ingest_config: IngestOptions of the reference and the pool (samples per shard, bounds; JSON on the CLI).
    """
    ref = _ingest(reference_source, reference_image_root, ingest_config)
    pool = _ingest(pool_source, pool_image_root, ingest_config)
    return targeted_steps(ref=ref, pool=pool, reference_ids=reference_ids, eval_cache=eval_cache,
                          benchmarks=benchmarks, embed_config=embed_config, decontam_config=decontam_config,
                          config=config, model_dir=model_dir, tiny_vlm_steps=tiny_vlm_steps, lm_steps=lm_steps)


class TargetedAblationOutputs(NamedTuple):
    comparison: FlyteDirectory
    generated: StepOut


@dynamic(**_DYNAMIC)
def targeted_ablation_steps(
    reference_source: str,
    reference_image_root: str,
    pool_source: str,
    pool_image_root: str,
    eval_cache: str,
    reference_ids: Optional[FlyteFile],
    benchmarks: List[str],
    embed_config: EmbedConfig,
    decontam_config: DecontamConfig,
    config: TargetedConfig,
    model_dir: Optional[FlyteDirectory],
    variant_name: str,
    train_config: TrainConfig,
    eval_max_samples: int,
    output_dir: str,
) -> TargetedAblationOutputs:
    """The body of `targeted_ablation`: the two trainings and the eval workers on the run's profile."""
    run_gpu = run_uses_gpu(embed_config)
    tg = targeted_generation(reference_source=reference_source, reference_image_root=reference_image_root,
                             pool_source=pool_source, pool_image_root=pool_image_root, reference_ids=reference_ids,
                             eval_cache=eval_cache, benchmarks=benchmarks, embed_config=embed_config,
                             decontam_config=decontam_config, config=override(config, subset_name=variant_name),
                             model_dir=model_dir)
    pool = _ingest(pool_source, pool_image_root, default_ingest_options())
    ref = _ingest(reference_source, reference_image_root, default_ingest_options())
    base = export_dataset(run=pool, subset_name="baseline")
    mixed = mix_exports(exports=[base, tg.export], name=variant_name)
    lm = train_reference_lm(run=ref, reference_ids=reference_ids)
    vision = build_tiny_vision_tower()
    train = partial(train_mini_llava, vision_model="mmcurate-tiny-vit", lm=lm, vision_dir=vision, config=train_config)
    profile = overrides("train", train_config, run_gpu)
    tr_base = train(data=base.dir).with_overrides(**profile)
    tr_mix = train(data=mixed.dir).with_overrides(**profile)
    uris = checkpoint_uris(per_variant=[tr_base.checkpoints, tr_mix.checkpoints])
    ev = evaluation(checkpoints=uris.flat, benchmarks=benchmarks, cache_dir=eval_cache, max_samples=eval_max_samples,
                    gpu=run_gpu)
    table = compare_variants(variants=["baseline", variant_name], checkpoints=uris.per_variant,
                             exports=[base, mixed], evaluation=ev, tokenizer=lm, output_dir=output_dir)
    return TargetedAblationOutputs(comparison=table, generated=tg.export)


@workflow
def targeted_ablation(
    reference_source: str,
    reference_image_root: str,
    pool_source: str,
    pool_image_root: str,
    eval_cache: str,
    reference_ids: Optional[FlyteFile] = None,
    benchmarks: List[str] = ALL_BENCHMARKS,
    embed_config: EmbedConfig = tiny_embed_config(),
    decontam_config: DecontamConfig = tiny_decontam_config(),
    config: TargetedConfig = tiny_targeted_config(),
    model_dir: Optional[FlyteDirectory] = None,
    variant_name: str = "baseline+targeted",
    train_config: TrainConfig = default_train_config(),
    eval_max_samples: int = 0,
    output_dir: str = "",
) -> TargetedAblationOutputs:
    """The ablation "baseline + generated for task X": train on the pool alone and on the pool plus the
    targeted subset (same recipe), evaluate both (capped), one comparison table with deltas vs baseline.

    :param reference_source: The target task's reference set (JSON/JSONL).
    :param reference_image_root: Its image folder.
    :param pool_source: The pool = the baseline training set (JSON/JSONL).
    :param pool_image_root: Its image folder.
    :param eval_cache: Root of the benchmark caches (evaluation and decontamination).
    :param reference_ids: Optional trusted reference ids.
    :param benchmarks: Benchmarks to evaluate on and decontaminate against.
    :param embed_config: EmbedConfig of the generation; also the run's profile (tiny: no GPU anywhere; SigLIP2
        on GPUs: one GPU per training and eval worker unless their configs name a device).
    :param decontam_config: Image decontamination of the pool.
    :param config: TargetedConfig (see `targeted_generation`); the generated subset is named `variant_name`.
    :param model_dir: Generator model directory (vllm backend).
    :param variant_name: Name of the mixed variant in the table (e.g. "baseline+targeted:countbench").
    :param train_config: The training recipe of both variants (TrainConfig: epochs, max_steps, batch_size, lr, ...;
        preset `default`); on the CLI a partial JSON, e.g. `--train_config '{"max_steps": 30}'`.
    :param eval_max_samples: Per-benchmark sample cap (0 = all).
    :param output_dir: Where to publish the comparison (path or URL; empty: none).
    """
    return targeted_ablation_steps(
        reference_source=reference_source, reference_image_root=reference_image_root, pool_source=pool_source,
        pool_image_root=pool_image_root, eval_cache=eval_cache, reference_ids=reference_ids, benchmarks=benchmarks,
        embed_config=embed_config, decontam_config=decontam_config, config=config, model_dir=model_dir,
        variant_name=variant_name, train_config=train_config, eval_max_samples=eval_max_samples,
        output_dir=output_dir)


# The CPU preset on the demo layout (`scripts/demo.sh` / `make demo` write demo_out/): the demo's chart, count and
# document scenes are the subgroups (the `tiny` preset's include_subgroups); the tiny LLaVA writes mostly rejected
# text (reasons in the ledger).
DEMO_PATHS = {"reference_source": "demo_out/reference/data.json", "reference_image_root": "demo_out/reference/images",
              "pool_source": "demo_out/data/data.json", "pool_image_root": "demo_out/data/images",
              "eval_cache": "demo_out/eval_cache"}
targeted_demo = LaunchPlan.get_or_create(
    targeted_generation, name="targeted_demo",
    default_inputs={**DEMO_PATHS, "config": tiny_targeted_config(), "embed_config": tiny_embed_config()},
)
# Production: Qwen2.5-VL-7B-Instruct on vLLM (pass model_dir = its local snapshot), SigLIP2 embeddings.
targeted_qwen_vl = LaunchPlan.get_or_create(
    targeted_generation, name="targeted_qwen_vl",
    default_inputs={"config": qwen_vl_targeted_config(), "embed_config": siglip2_embed_config(),
                    "ingest_config": IngestOptions(shard_max_samples=5000)},
)
targeted_ablation_demo = LaunchPlan.get_or_create(
    targeted_ablation, name="targeted_ablation_demo",
    default_inputs={**DEMO_PATHS, "config": tiny_targeted_config(), "embed_config": tiny_embed_config(),
                    "train_config": override(default_train_config(), max_steps=30),
                    "eval_max_samples": 8, "variant_name": "baseline+targeted_demo"},
)
