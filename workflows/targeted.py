"""Targeted (MM-Gen-style) generation: reference -> subgroups -> retrieval -> generation (capped map over
shards) -> filters -> export as a named subset; and the ablation "baseline + generated for task X"."""

import functools
from typing import List, NamedTuple, Optional

from flytekit import LaunchPlan, dynamic, map_task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.configs import override
from core.steps.dedup.config import DecontamConfig, tiny_decontam_config
from core.steps.embed.config import EmbedConfig, siglip2_embed_config, tiny_embed_config
from core.targeted.filters import FILTER_STEPS
from core.train.config import TrainConfig, default_train_config
from tasks.ablation import build_tiny_vision_tower, checkpoint_uris, compare_variants
from tasks.embed import embed_shards, embed_shards_cpu
from tasks.export import export_dataset
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.perplexity import train_reference_lm
from tasks.targeted import (
    build_tiny_vlm,
    filter_generated_samples,
    generate_targeted_shard,
    generate_targeted_shard_cpu,
    mix_exports,
    retrieve_images,
    split_reference,
    targeted_config,
)
from tasks.train import train_mini_llava, train_mini_llava_cpu
from workflows.dedup import decontamination_cpu_wf, decontamination_wf
from workflows.evaluate import ALL_BENCHMARKS, evaluation, evaluation_cpu


@dynamic(container_image=CPU_IMAGE)
def generate_all(shards: List[str], retrieved: FlyteDirectory, subgroups: FlyteDirectory, pool: FlyteDirectory,
                 model: FlyteDirectory, preset: str, overrides: str) -> List[FlyteDirectory]:
    """Generation over every shard, at most `max_parallel_shards` at a time (one GPU each).

    :param shards: Generation shard names from retrieve_images.
    :param retrieved: retrieve_images output.
    :param subgroups: split_reference output.
    :param pool: Ingest output of the pool.
    :param model: Generator model directory.
    :param preset: `tiny` or `qwen2.5-vl`.
    :param overrides: JSON TargetedConfig fields.
    """
    cfg = targeted_config(preset, overrides)
    on_cpu = cfg.backend == "transformers" and cfg.device == "cpu"  # the CPU preset runs the CPU twin: no GPU node
    gen = functools.partial(generate_targeted_shard_cpu if on_cpu else generate_targeted_shard, retrieved=retrieved, subgroups=subgroups, pool=pool, model=model,
                            preset=preset, overrides=overrides)
    return map_task(gen, concurrency=cfg.max_parallel_shards)(shard=shards)


class TargetedOutputs(NamedTuple):
    export: FlyteDirectory
    filtered: FlyteDirectory
    retrieved: FlyteDirectory


def _targeted_generation_wf(name: str, embed_task, decontam_wf):
    """`targeted_generation` (GPU embedding/decontamination workers) or its CPU twin for the tiny presets."""

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
        preset: str = "tiny",
        model_dir: Optional[FlyteDirectory] = None,
        overrides: str = "{}",
        subset_name: str = "targeted",
        tiny_vlm_steps: int = 300,
        lm_steps: int = 300,
        shard_max_samples: int = 1000,
    ) -> TargetedOutputs:
        """Generate task-shaped Q&A for a weak eval task: subgroups of its reference set, similar pool images per
        subgroup, a VLM writing new pairs with in-context examples, filters, export as a named subset.

        :param reference_source: The target task's reference set (its train/val split, never test items): JSON/JSONL.
        :param reference_image_root: Image folder of the reference set.
        :param pool_source: The large unlabeled or weakly labeled pool (JSON/JSONL).
        :param pool_image_root: Image folder of the pool.
        :param reference_ids: Optional JSON id list (or object with a "clean" list) of trusted reference samples.
        :param eval_cache: Root of the benchmark caches; the pool is decontaminated against their test items (images)
            and the generated questions against their questions.
        :param benchmarks: Benchmarks to decontaminate against.
        :param embed_config: EmbedConfig of reference and pool (CLI: JSON onto the tiny preset, `{"preset": "siglip2"}`).
        :param decontam_config: Image decontamination of the pool (threshold, k, kind).
        :param preset: `tiny` (tiny LLaVA, transformers, CPU) or `qwen2.5-vl` (vLLM, one GPU per shard).
        :param model_dir: Generator model directory (required for qwen2.5-vl; tiny builds its own).
        :param overrides: JSON object of TargetedConfig fields (subgroups, budgets, prompts, filters).
        :param subset_name: Name of the exported subset (manifest).
        :param tiny_vlm_steps: Training steps of the tiny VLM (tiny preset only).
        :param lm_steps: Training steps of the reference LM used for perplexity.
        :param shard_max_samples: Samples per ingested shard.
        """
        ref = ingest_dataset(source=reference_source, image_root=reference_image_root, shard_max_samples=shard_max_samples,
                             source_fingerprint=fingerprint_source(source=reference_source, image_root=reference_image_root))
        pool = ingest_dataset(source=pool_source, image_root=pool_image_root, shard_max_samples=shard_max_samples,
                              source_fingerprint=fingerprint_source(source=pool_source, image_root=pool_image_root))
        ref_emb = embed_task(shards=ref, prev=ref, prev_step="ingest", config=embed_config)
        pool_emb = embed_task(shards=pool, prev=pool, prev_step="ingest", config=embed_config)
        dc = decontam_wf(embeddings=pool_emb, eval_cache=eval_cache, benchmarks=benchmarks, embed_config=embed_config,
                         config=decontam_config, prev=pool_emb, prev_step="embed", run=pool)
        sub = split_reference(reference=ref, reference_ids=reference_ids, preset=preset, overrides=overrides)
        vlm = build_tiny_vlm(reference=ref, subgroups=sub, model_dir=model_dir, preset=preset, overrides=overrides,
                             steps=tiny_vlm_steps)
        ret = retrieve_images(subgroups=sub, reference_embeddings=ref_emb, pool_embeddings=pool_emb, pool=pool,
                              pool_decontam=dc, preset=preset, overrides=overrides)
        gens = generate_all(shards=ret.shards, retrieved=ret.out_dir, subgroups=sub, pool=pool, model=vlm, preset=preset,
                            overrides=overrides)
        lm = train_reference_lm(run=ref, reference_ids=reference_ids, steps=lm_steps)
        f = filter_generated_samples(generations=gens, subgroups=sub, ppl_model=lm, eval_cache=eval_cache,
                                     benchmarks=benchmarks, preset=preset, overrides=overrides)
        ex = export_dataset(run_dir=f.generated, step_dirs=[f.filtered], steps=FILTER_STEPS, subset_ids=f.kept_ids,
                            subset_name=subset_name)
        return TargetedOutputs(export=ex, filtered=f.filtered, retrieved=ret.out_dir)

    targeted_generation.__name__ = targeted_generation.__qualname__ = name
    return workflow(targeted_generation)


targeted_generation = _targeted_generation_wf("targeted_generation", embed_shards, decontamination_wf)
# The tiny preset (embedded models): the CPU twins; generation picks its CPU twin from the preset.
targeted_generation_cpu = _targeted_generation_wf("targeted_generation_cpu", embed_shards_cpu, decontamination_cpu_wf)



class TargetedAblationOutputs(NamedTuple):
    comparison: FlyteDirectory
    generated: FlyteDirectory


def _targeted_ablation_wf(name: str, generation_wf, train_task, eval_wf):
    """`targeted_ablation` (GPU training and eval workers) or its CPU twin for the tiny presets."""

    def targeted_ablation(
        reference_source: str,
        reference_image_root: str,
        pool_source: str,
        pool_image_root: str,
        eval_cache: str,
        reference_ids: Optional[FlyteFile] = None,
        benchmarks: List[str] = ALL_BENCHMARKS,
        preset: str = "tiny",
        model_dir: Optional[FlyteDirectory] = None,
        overrides: str = "{}",
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
        :param preset: `tiny` or `qwen2.5-vl`.
        :param model_dir: Generator model directory (qwen2.5-vl).
        :param overrides: JSON TargetedConfig fields.
        :param variant_name: Name of the mixed variant in the table (e.g. "baseline+targeted:countbench").
        :param train_config: The training recipe of both variants (TrainConfig: epochs, max_steps, batch_size, lr, ...;
            preset `default`); on the CLI a partial JSON, e.g. `--train_config '{"max_steps": 30}'`.
        :param eval_max_samples: Per-benchmark sample cap (0 = all).
        :param output_dir: Where to publish the comparison (path or URL; empty: none).
        """
        tg = generation_wf(reference_source=reference_source, reference_image_root=reference_image_root,
                           pool_source=pool_source, pool_image_root=pool_image_root, reference_ids=reference_ids,
                           eval_cache=eval_cache, benchmarks=benchmarks, preset=preset, model_dir=model_dir,
                           overrides=overrides, subset_name=variant_name)
        pool = ingest_dataset(source=pool_source, image_root=pool_image_root, shard_max_samples=1000,
                              source_fingerprint=fingerprint_source(source=pool_source, image_root=pool_image_root))
        ref = ingest_dataset(source=reference_source, image_root=reference_image_root, shard_max_samples=1000,
                             source_fingerprint=fingerprint_source(source=reference_source, image_root=reference_image_root))
        base = export_dataset(run_dir=pool, steps=["ingest"], subset_name="baseline")
        mixed = mix_exports(exports=[base, tg.export], name=variant_name)
        lm = train_reference_lm(run=ref, reference_ids=reference_ids)
        vision = build_tiny_vision_tower()
        tr_base = train_task(data=base, vision_model="mmcurate-tiny-vit", lm=lm, vision_dir=vision,
                             config=train_config)
        tr_mix = train_task(data=mixed, vision_model="mmcurate-tiny-vit", lm=lm, vision_dir=vision,
                            config=train_config)
        uris = checkpoint_uris(per_variant=[tr_base.checkpoints, tr_mix.checkpoints])
        ev = eval_wf(checkpoints=uris.flat, benchmarks=benchmarks, cache_dir=eval_cache, max_samples=eval_max_samples)
        table = compare_variants(variants=["baseline", variant_name], checkpoints=uris.per_variant, exports=[base, mixed],
                                 evaluation=ev, tokenizer=lm, output_dir=output_dir)
        return TargetedAblationOutputs(comparison=table, generated=tg.export)

    targeted_ablation.__name__ = targeted_ablation.__qualname__ = name
    return workflow(targeted_ablation)


targeted_ablation = _targeted_ablation_wf("targeted_ablation", targeted_generation, train_mini_llava, evaluation)
# The tiny preset: CPU training and eval workers (what targeted_ablation_demo launches).
targeted_ablation_cpu = _targeted_ablation_wf("targeted_ablation_cpu", targeted_generation_cpu, train_mini_llava_cpu,
                                              evaluation_cpu)



# The CPU preset on the demo layout (`scripts/demo.sh` / `make demo` write demo_out/): the demo's chart, count and
# document scenes are the subgroups; the tiny LLaVA writes mostly rejected text (reasons in the ledger).
TINY_OVERRIDES = '{"include_subgroups": ["chartqa_like", "count_like", "doc_like"]}'
targeted_demo = LaunchPlan.get_or_create(
    targeted_generation_cpu,
    name="targeted_demo",
    default_inputs={"reference_source": "demo_out/reference/data.json", "reference_image_root": "demo_out/reference/images",
                    "pool_source": "demo_out/data/data.json", "pool_image_root": "demo_out/data/images",
                    "eval_cache": "demo_out/eval_cache", "preset": "tiny", "subset_name": "targeted_demo",
                    "overrides": TINY_OVERRIDES},
)
# Production: Qwen2.5-VL-7B-Instruct on vLLM (pass model_dir = its local snapshot), SigLIP2 embeddings.
targeted_qwen_vl = LaunchPlan.get_or_create(
    targeted_generation, name="targeted_qwen_vl",
    default_inputs={"preset": "qwen2.5-vl", "embed_config": siglip2_embed_config(), "shard_max_samples": 5000},
)
targeted_ablation_demo = LaunchPlan.get_or_create(
    targeted_ablation_cpu, name="targeted_ablation_demo",
    default_inputs={"reference_source": "demo_out/reference/data.json", "reference_image_root": "demo_out/reference/images",
                    "pool_source": "demo_out/data/data.json", "pool_image_root": "demo_out/data/images",
                    "eval_cache": "demo_out/eval_cache", "overrides": TINY_OVERRIDES,
                    "train_config": override(default_train_config(), max_steps=30),
                    "eval_max_samples": 8, "variant_name": "baseline+targeted_demo"},
)
