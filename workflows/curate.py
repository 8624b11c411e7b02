"""The `curate` workflow: ingest -> embed -> decontam -> semdedup -> perplexity -> rephrase -> export -> summary.

Every step but ingest/embed/export is switchable; each deterministic task is cached with a version tied
to its code, so a re-run with one changed knob recomputes only that step and what follows it.
"""

from typing import List, NamedTuple, Optional

from flytekit import LaunchPlan, dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.configs import EmbedPreset, PplMode, RephrasePreset, value_of
from core.dedup.config import (
    DecontamConfig,
    SemDedupConfig,
    default_decontam_config,
    target_dedup_config,
    tiny_decontam_config,
    tiny_dedup_config,
)
from tasks.embed import embed_shards, embed_shards_cpu
from tasks.export import export_dataset
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.perplexity import score_perplexity, score_perplexity_cpu, slice_by_perplexity, train_reference_lm
from tasks.rephrase import rephrase_samples, rephrase_samples_cpu
from tasks.resources import is_tiny
from tasks.run_report import summarize_run
from tasks.validate import validate_curate_inputs
from workflows.dedup import decontamination_cpu_wf, decontamination_wf, semdedup_cpu_wf, semdedup_wf
from workflows.evaluate import ALL_BENCHMARKS


class CurateOutputs(NamedTuple):
    export: FlyteDirectory
    summary: FlyteDirectory


@dynamic(container_image=CPU_IMAGE)
def curate_steps(
    source: str,
    image_root: str,
    shard_max_samples: int = 1000,
    embed_preset: EmbedPreset = EmbedPreset.tiny,
    semdedup: bool = True,
    dedup_config: SemDedupConfig = tiny_dedup_config(),
    decontaminate: bool = False,
    eval_cache: str = "",
    decontam_benchmarks: List[str] = ALL_BENCHMARKS,
    decontam_config: DecontamConfig = tiny_decontam_config(),
    perplexity: bool = True,
    ppl_mode: PplMode = PplMode.assistant_only,
    ppl_low_pct: float = 0.0,
    ppl_high_pct: float = 90.0,
    lm_steps: int = 300,
    reference_source: str = "",
    reference_image_root: str = "",
    reference_ids: Optional[FlyteFile] = None,
    rephrase: bool = False,
    rephrase_preset: RephrasePreset = RephrasePreset.tiny,
    export_max_samples: int = 1000,
    output_dir: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> CurateOutputs:
    """The steps of `curate` (see its docstring for the inputs), wired at run time from the switches.

    The tiny embed preset runs every step on its CPU twin (tasks/resources.py); the others on GPU tasks.
    """
    tiny = is_tiny(embed_preset)
    embed = embed_shards_cpu if tiny else embed_shards
    # the fingerprint (sizes, mtimes) joins the cache key: a re-run after the files changed re-ingests
    run = ingest_dataset(source=source, image_root=image_root, shard_max_samples=shard_max_samples,
                         source_fingerprint=fingerprint_source(source=source, image_root=image_root), format=format)
    emb = embed(shards=run, prev=run, prev_step="ingest", preset=value_of(embed_preset))
    dirs, steps = [run, emb], ["ingest", "embed"]
    prev, prev_step = emb, "embed"
    if decontaminate:
        decontam = decontamination_cpu_wf if tiny else decontamination_wf
        dc = decontam(embeddings=emb, eval_cache=eval_cache, benchmarks=decontam_benchmarks,
                                embed_preset=value_of(embed_preset), config=decontam_config, prev=prev, prev_step=prev_step,
                                run=run)
        dirs, steps = dirs + [dc], steps + ["decontam"]
        prev, prev_step = dc, "decontam"
    if semdedup:
        dd = (semdedup_cpu_wf if tiny else semdedup_wf)(embeddings=emb, config=dedup_config, prev=prev, prev_step=prev_step, run=run)
        dirs, steps = dirs + [dd], steps + ["semdedup"]
        prev, prev_step = dd, "semdedup"
    if perplexity:
        ref = run
        if reference_source:
            ref = ingest_dataset(source=reference_source, image_root=reference_image_root,
                                 shard_max_samples=shard_max_samples,
                                 source_fingerprint=fingerprint_source(source=reference_source,
                                                                       image_root=reference_image_root))
        lm = train_reference_lm(run=ref, reference_ids=reference_ids, steps=lm_steps)
        score = score_perplexity_cpu if tiny else score_perplexity
        scores = score(run=run, model=lm, prev=prev, prev_step=prev_step, mode=value_of(ppl_mode))
        cut = slice_by_perplexity(scores=scores, mode="range", low_pct=ppl_low_pct, high_pct=ppl_high_pct)
        dirs, steps = dirs + [scores, cut], steps + ["perplexity", "ppl_filter"]
        prev, prev_step = cut, "ppl_filter"
    rephrased = None
    if rephrase:
        rephrase_task = rephrase_samples_cpu if is_tiny(rephrase_preset) else rephrase_samples
        rephrased = rephrase_task(run_dir=run, preset=value_of(rephrase_preset), prev=prev,
                                  prev_step=prev_step).out_dir
        dirs, steps = dirs + [rephrased], steps + ["rephrase"]
    out = export_dataset(run_dir=run, step_dirs=dirs[1:], steps=steps, rephrased=rephrased,
                         max_samples=export_max_samples)
    summary = summarize_run(step_dirs=dirs + [out], steps=steps + ["export"], export=out, output_dir=output_dir,
                            known_bad_ids=known_bad_ids)
    return CurateOutputs(export=out, summary=summary)


@workflow
def curate(
    source: str,
    image_root: str,
    shard_max_samples: int = 1000,
    embed_preset: EmbedPreset = EmbedPreset.tiny,
    semdedup: bool = True,
    dedup_config: SemDedupConfig = tiny_dedup_config(),
    decontaminate: bool = False,
    eval_cache: str = "",
    decontam_benchmarks: List[str] = ALL_BENCHMARKS,
    decontam_config: DecontamConfig = tiny_decontam_config(),
    perplexity: bool = True,
    ppl_mode: PplMode = PplMode.assistant_only,
    ppl_low_pct: float = 0.0,
    ppl_high_pct: float = 90.0,
    lm_steps: int = 300,
    reference_source: str = "",
    reference_image_root: str = "",
    reference_ids: Optional[FlyteFile] = None,
    rephrase: bool = False,
    rephrase_preset: RephrasePreset = RephrasePreset.tiny,
    export_max_samples: int = 1000,
    output_dir: str = "",
    format: str = "auto",
    known_bad_ids: Optional[FlyteFile] = None,
) -> CurateOutputs:
    """Curate a LLaVA-style dataset into training-ready WebDataset shards.

    :param source: Dataset: JSON array (.json, streamed), JSONL, WebDataset shards or Parquet; file, folder or
        glob, path or fsspec URL.
    :param image_root: Folder the records' image names are relative to; path or URL.
    :param shard_max_samples: Samples per ingested shard (the unit of streaming and resume).
    :param embed_preset: Embedding preset: `tiny` (embedded CPU model) or `siglip2` (production).
    :param semdedup: Run SemDeDup on the image embeddings.
    :param dedup_config: SemDeDup config (target_removal or eps, n_clusters, keep policy, embedding kind).
    :param decontaminate: Drop training samples that are near-copies of eval items (embedded with the same
        model), reason `eval_contamination:<benchmark>`; also writes the k nearest training samples per eval item.
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`), needed by decontaminate.
    :param decontam_benchmarks: Benchmarks to decontaminate against.
    :param decontam_config: Similarity threshold, mined neighbours per eval item, embedding kind.
    :param perplexity: Score conversations with a reference LM and drop by perplexity percentile.
    :param ppl_mode: `assistant_only` (answers given the question, image tokens masked) or `text`.
    :param ppl_low_pct: Drop samples below this perplexity percentile (0 keeps all low ones).
    :param ppl_high_pct: Drop samples above this perplexity percentile.
    :param lm_steps: Training steps of the embedded reference LM.
    :param reference_source: Trusted reference dataset (JSON/JSONL) the reference LM trains on, DFN-style;
        empty: train on the dataset being curated (weaker: the LM also learns its defects).
    :param reference_image_root: Image folder of the reference dataset.
    :param reference_ids: Optional JSON id list (or object with a "clean" list) selecting the trusted samples
        of the reference dataset (default: all of them).
    :param rephrase: Rephrase question/answer turns with an LLM (validated; rejected ones keep the original).
    :param rephrase_preset: `tiny` (embedded CPU model) or `qwen` (vLLM).
    :param export_max_samples: Samples per exported shard.
    :param output_dir: Where to publish the curated set and the run summary (path or URL; empty: none).
    :param format: Input format: auto, or a container json|jsonl|wds|parquet and/or dialect llava|messages
        (`jsonl:messages`); see docs/ingest.md.
    :param known_bad_ids: Optional id list (JSON list or one id per line) of samples known to be low quality: the
        run summary reports, per step, how many of them it removed, kept or quarantined.

    Every input is checked first (validate_curate_inputs, seconds); the steps then run in `curate_steps`.
    The tiny embed preset runs every step on its CPU twin; production presets request GPUs.
    """
    checked = validate_curate_inputs(source=source, image_root=image_root, shard_max_samples=shard_max_samples, dedup_config=dedup_config, decontaminate=decontaminate, eval_cache=eval_cache, decontam_benchmarks=decontam_benchmarks, decontam_config=decontam_config, perplexity=perplexity, ppl_low_pct=ppl_low_pct, ppl_high_pct=ppl_high_pct, lm_steps=lm_steps, reference_source=reference_source, reference_image_root=reference_image_root, export_max_samples=export_max_samples, format=format, known_bad_ids=known_bad_ids)
    out = curate_steps(source=source, image_root=image_root, shard_max_samples=shard_max_samples, embed_preset=embed_preset, semdedup=semdedup, dedup_config=dedup_config, decontaminate=decontaminate, eval_cache=eval_cache, decontam_benchmarks=decontam_benchmarks, decontam_config=decontam_config, perplexity=perplexity, ppl_mode=ppl_mode, ppl_low_pct=ppl_low_pct, ppl_high_pct=ppl_high_pct, lm_steps=lm_steps, reference_source=reference_source, reference_image_root=reference_image_root, reference_ids=reference_ids, rephrase=rephrase, rephrase_preset=rephrase_preset, export_max_samples=export_max_samples, output_dir=output_dir, format=format, known_bad_ids=known_bad_ids)
    checked >> out.export
    return out.export, out.summary


# Named presets as launch plans: the embedded CPU demo, and the production MAmmoTH-VL curation.
curate_demo = LaunchPlan.get_or_create(curate, name="curate_demo", default_inputs={"embed_preset": EmbedPreset.tiny})
mammoth_v1_curation = LaunchPlan.get_or_create(
    curate,
    name="mammoth_v1_curation",
    default_inputs={
        "embed_preset": EmbedPreset.siglip2,
        "dedup_config": target_dedup_config(0.10, n_clusters=1200),
        "decontam_config": default_decontam_config(),
        "ppl_high_pct": 90.0,
        "shard_max_samples": 5000,
        "export_max_samples": 5000,
    },
)
