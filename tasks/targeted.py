"""Targeted (MM-Gen-style) generation tasks: split the reference set into subgroups, retrieve pool images
per subgroup, generate Q&A per shard with a VLM (vllm image, one GPU), filter. Export is the export task.

Every task takes the same `preset` (`tiny` | `qwen2.5-vl`) and `overrides` (JSON object of
`core.targeted.config.TargetedConfig` fields), validated before any work.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List, NamedTuple, Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from tasks.cache import task_version
from tasks.images import CPU_IMAGE, VLLM_IMAGE
from tasks.paths import resume_key, source, step_workdir, workdir
from tasks.resources import TINY_REQUESTS, renamed

log = logging.getLogger(__name__)
CACHE = dict(cache=True, cache_version=task_version(__name__))


def targeted_config(preset: str, overrides: str, model: str = ""):
    """The validated TargetedConfig of a preset with JSON overrides (raises ValueError on bad input)."""
    from core.targeted.config import preset_config

    try:
        extra = json.loads(overrides or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"overrides must be a JSON object of TargetedConfig fields: {e}") from e
    if not isinstance(extra, dict):
        raise ValueError("overrides must be a JSON object of TargetedConfig fields")
    return preset_config(preset, model, extra)


def _shards(run: FlyteDirectory) -> List[str]:
    from core.io.wds import list_shards

    return list_shards(f"{source(run).rstrip('/')}/shards")


@task(container_image=CPU_IMAGE, enable_deck=True, requests=Resources(cpu="2", mem="8Gi"), **CACHE)
def split_reference(reference: FlyteDirectory, reference_ids: Optional[FlyteFile] = None, preset: str = "tiny",
                    overrides: str = "{}") -> FlyteDirectory:
    """Split the target task's reference set (its train/val split, never test items) into subgroups: by a
    field (`subgroup_field`, e.g. `source` or `metadata.task`) or by k-means on MiniLM question embeddings.

    :param reference: Ingest output of the reference set (any dialect the ingest step reads).
    :param reference_ids: Optional JSON id list (or object with a "clean" list) of trusted reference samples.
    :param preset: `tiny` (CPU demo) or `qwen2.5-vl` (production).
    :param overrides: JSON object of TargetedConfig fields (subgroup_field, n_clusters, include_subgroups, families...).
    :return: Directory with `targeted/subgroups.parquet` (one row per reference sample, used or excluded with a reason).
    """
    from core.steps.perplexity.reference import load_id_list
    from core.targeted.pipeline import reference_table
    from core.targeted.report import subgroups_html

    cfg = targeted_config(preset, overrides)
    ids = load_id_list(reference_ids.download()) if reference_ids is not None else None
    ref = reference_table(_shards(reference), cfg, ids)
    out = workdir("subgroups")
    (out / "targeted").mkdir(exist_ok=True)
    ref.to_parquet(out / "targeted" / "subgroups.parquet", index=False)
    Deck("subgroups", subgroups_html(ref, cfg.examples_per_subgroup))
    log.info("subgroups: %s -> %s", ref[ref.used].groupby("subgroup").size().to_dict(), out)
    return FlyteDirectory(str(out))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), **CACHE)
def build_tiny_vlm(reference: FlyteDirectory, subgroups: FlyteDirectory, model_dir: Optional[FlyteDirectory] = None,
                   preset: str = "tiny", overrides: str = "{}", steps: int = 300) -> FlyteDirectory:
    """The generator model: `model_dir` when given (passed through untouched); otherwise, for the `tiny` preset,
    the project's tiny HF LLaVA, taught the reply shape on the reference set for `steps` CPU steps.

    :param reference: Ingest output of the reference set (images for the tiny model's training).
    :param subgroups: split_reference output.
    :param model_dir: Local copy of the generator (e.g. Qwen2.5-VL-7B-Instruct); required unless preset is tiny.
    :param preset: `tiny` or `qwen2.5-vl`.
    :param overrides: JSON TargetedConfig fields.
    :param steps: Training steps of the tiny model (0: random weights).
    """
    if model_dir is not None:
        return model_dir
    if preset != "tiny":
        raise ValueError(f"preset {preset!r} needs model_dir (a local copy of the VLM; nothing is downloaded)")
    import pandas as pd

    from core.targeted.pipeline import reference_examples
    from core.targeted.tiny_vlm import build_tiny_llava, train_tiny_llava, training_examples

    out = str(workdir("tiny_vlm") / "model")
    cfg = targeted_config(preset, overrides, out)
    ref = pd.read_parquet(os.path.join(subgroups.download(), "targeted", "subgroups.parquet"))
    build_tiny_llava(out, [f"Question: {r.question}\nAnswer: {r.answer}" for r in ref.itertuples()], seed=cfg.seed)
    if steps:
        info = train_tiny_llava(out, training_examples(_shards(reference), ref, reference_examples(ref), cfg), steps=steps,
                                seed=cfg.seed)
        log.info("tiny VLM trained: %s", info)
    return FlyteDirectory(out)


class RetrieveOutputs(NamedTuple):
    out_dir: FlyteDirectory
    shards: List[str]


@task(container_image=CPU_IMAGE, enable_deck=True, requests=Resources(cpu="4", mem="16Gi"), **CACHE)
def retrieve_images(subgroups: FlyteDirectory, reference_embeddings: FlyteDirectory, pool_embeddings: FlyteDirectory,
                    pool: FlyteDirectory, pool_decontam: Optional[FlyteDirectory] = None, preset: str = "tiny",
                    overrides: str = "{}") -> RetrieveOutputs:
    """Per subgroup, the pool images nearest to its reference images (or centroid) in the embed step's space,
    within `budget_per_subgroup`, each image used once, only pool ids the decontamination kept.

    :param subgroups: split_reference output.
    :param reference_embeddings: Embed output of the reference set (same model as the pool's).
    :param pool_embeddings: Embed output of the pool.
    :param pool: Ingest output of the pool (images for the deck's gallery).
    :param pool_decontam: Decontamination output of the pool (`ledger/decontam/`); only its passing ids are searched.
    :param preset: `tiny` or `qwen2.5-vl`.
    :param overrides: JSON TargetedConfig fields (retrieval, budget_per_subgroup, oversample, shard_size, ...).
    :return: out_dir (`targeted/retrieved.parquet`, `ledger/tg_retrieve/`) and the generation shard names.
    """
    import pandas as pd

    from core.foundation.ledger import passing_ids, read_ledger, step_dir
    from core.steps.dedup.report import shard_fetcher
    from core.targeted.report import retrieval_html
    from core.targeted.retrieve import retrieve

    cfg = targeted_config(preset, overrides)
    ref = pd.read_parquet(os.path.join(subgroups.download(), "targeted", "subgroups.parquet"))
    allowed = None
    if pool_decontam is not None:
        allowed = passing_ids(read_ledger(step_dir(pool_decontam.download(), "decontam")))
    out = workdir("retrieve")
    got = retrieve(ref, reference_embeddings.download(), pool_embeddings.download(), out, cfg, allowed)
    fetch = shard_fetcher(f"{source(pool).rstrip('/')}/shards", dict(zip(got.pool_id, got.pool_shard)))
    Deck("retrieval", retrieval_html(got, fetch))
    shards = sorted(got["gen_shard"].unique().tolist())
    log.info("retrieved %d images in %d generation shards -> %s", len(got), len(shards), out)
    return RetrieveOutputs(out_dir=FlyteDirectory(str(out)), shards=shards)


_GEN_OPTS = dict(container_image=VLLM_IMAGE, retries=2, **CACHE)


# One vLLM engine per task on one GPU (vllm image). The CPU preset (transformers on CPU) runs the CPU twin
# `generate_targeted_shard_cpu` (chosen by generate_all from the preset's config); resources never depend on
# the machine that serializes the task. Cached: generation is seeded per request.
@task(requests=Resources(cpu="8", mem="48Gi", gpu="1"), limits=Resources(gpu="1"), **_GEN_OPTS)
def generate_targeted_shard(shard: str, retrieved: FlyteDirectory, subgroups: FlyteDirectory, pool: FlyteDirectory,
                            model: FlyteDirectory, preset: str = "tiny", overrides: str = "{}") -> FlyteDirectory:
    """Generate one question/answer per retrieved image of one generation shard with the VLM, parse it into a
    LLaVA conversation (or reject it with a reason) and publish the shard (resumable, seeded).

    :param shard: Generation shard name (`gen-NNNNNN`, from retrieve_images).
    :param retrieved: retrieve_images output.
    :param subgroups: split_reference output (in-context examples).
    :param pool: Ingest output of the pool (the images).
    :param model: Generator model directory (HF layout).
    :param preset: `tiny` (transformers, CPU) or `qwen2.5-vl` (vLLM, GPU).
    :param overrides: JSON TargetedConfig fields (k_shot, temperature, max_new_tokens, prompts, ...).
    :return: Directory with `shards/<shard>-000000.tar` (accepted), `targeted/generations/`, `ledger/tg_generate/`.
    """
    import pandas as pd

    from core.targeted.generate import generate_shards
    from core.targeted.pipeline import pool_shard_urls, reference_examples

    cfg = targeted_config(preset, overrides, model.download())
    got = pd.read_parquet(os.path.join(retrieved.download(), "targeted", "retrieved.parquet"))
    if shard not in set(got["gen_shard"]):
        raise ValueError(f"unknown generation shard {shard!r}")
    ref = pd.read_parquet(os.path.join(subgroups.download(), "targeted", "subgroups.parquet"))
    sf = step_workdir("tg_generate", resume_key("generate_targeted_shard", task_version(__name__), shard=shard,
                                                retrieved=retrieved, subgroups=subgroups, pool=pool, model=model,
                                                preset=preset, overrides=overrides))  # a re-run skips a done shard
    out = Path(sf.path)
    [st] = generate_shards(got, pool_shard_urls(source(pool)), out, cfg, reference_examples(ref), shards=[shard])
    log.info("%s: %d images, %d accepted, %.1fs generating of %.1fs; rejected %s -> %s", shard, st.n, st.n_accepted,
             st.seconds_generate, st.seconds_total, st.reasons, sf.url)
    return FlyteDirectory(sf.close())


generate_targeted_shard_cpu = task(requests=TINY_REQUESTS, **_GEN_OPTS)(
    renamed(generate_targeted_shard.task_function, "generate_targeted_shard_cpu"))


class FilterOutputs(NamedTuple):
    generated: FlyteDirectory
    filtered: FlyteDirectory
    kept_ids: FlyteFile


@task(container_image=CPU_IMAGE, enable_deck=True, requests=Resources(cpu="4", mem="16Gi"), **CACHE)
def filter_generated_samples(generations: List[FlyteDirectory], subgroups: FlyteDirectory, ppl_model: FlyteDirectory,
                             eval_cache: str = "", benchmarks: Optional[List[str]] = None, preset: str = "tiny",
                             overrides: str = "{}") -> FilterOutputs:
    """Filter the accepted generations: perplexity (direction and percentile from the config), near-duplicates of
    the reference items and of each other (mining + SemDeDup on MiniLM), decontamination against the eval sets'
    questions; every drop with its reason in the ledger.

    :param generations: generate_targeted_shard outputs.
    :param subgroups: split_reference output (the reference items for the near-duplicate check).
    :param ppl_model: Reference LM directory for the perplexity step (train_reference_lm output).
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`); empty: no text decontamination.
    :param benchmarks: Benchmarks whose test questions the generated questions must not copy.
    :param preset: `tiny` or `qwen2.5-vl`.
    :param overrides: JSON TargetedConfig fields (ppl_direction, ppl_percentile, dedup_eps, ...).
    :return: generated (merged generation dir: shards/ + ledger/tg_generate), filtered (ledgers of the filters),
        kept_ids (the named subset for the export task).
    """
    import pandas as pd

    from core.targeted.filters import eval_questions, filter_generated
    from core.targeted.pipeline import generation_summary, merge_generation
    from core.targeted.report import funnel_html, generation_html

    cfg = targeted_config(preset, overrides)
    if benchmarks and not eval_cache:
        raise ValueError("benchmarks given without eval_cache")
    gen = merge_generation([g.download() for g in generations], workdir("generated"))
    ref = pd.read_parquet(os.path.join(subgroups.download(), "targeted", "subgroups.parquet"))
    used = ref[ref["used"]]
    ref_texts = {r.ref_id: f"{r.question}\n{r.answer}" for r in used.itertuples()}
    evq = eval_questions(eval_cache, benchmarks) if eval_cache and benchmarks else {}
    out = workdir("filtered")
    counts = filter_generated(gen, out, cfg, ppl_model.download(), ref_texts, evq)
    summary = {"retrieved": None, "generation": generation_summary(gen), "filters": counts}
    summary["retrieved"] = summary["generation"]["n_retrieved"]
    gens = pd.read_parquet(gen / "targeted" / "generations")
    Deck("targeted", funnel_html(summary) + generation_html(gens))
    (out / "targeted" / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("targeted funnel: %s", json.dumps(summary))
    return FilterOutputs(generated=FlyteDirectory(str(gen)), filtered=FlyteDirectory(str(out)),
                         kept_ids=FlyteFile(str(out / "targeted" / "kept_ids.json")))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), **CACHE)
def mix_exports(exports: List[FlyteDirectory], name: str) -> FlyteDirectory:
    """One training directory from several exports (e.g. the baseline and a generated subset): their shards
    side by side (`shards/<i>-<name>.tar`) and a manifest listing the parts and the total count.

    :param exports: export_dataset outputs (shards/ + manifest.json).
    :param name: Name of the mixture (recorded in the manifest).
    """
    import shutil

    from core.io.wds import list_shards

    out = workdir("mix")
    (out / "shards").mkdir(exist_ok=True)
    parts = []
    for i, ex in enumerate(exports):
        root = ex.download()
        man = json.loads(open(os.path.join(root, "manifest.json")).read())
        for url in list_shards(os.path.join(root, "shards")):  # the manifest's shards: <kind>/<name>.tar
            kind = os.path.basename(os.path.dirname(url))
            shutil.copy2(url, out / "shards" / f"part{i}-{kind}-{os.path.basename(url)}")
        parts.append({"subset": man.get("subset", ""), "selection": man.get("selection", ""), "n_samples": man["n_samples"]})
    manifest = {"format": 1, "mixture": name, "parts": parts, "n_samples": sum(p["n_samples"] for p in parts)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log.info("mixture %s: %s", name, manifest)
    return FlyteDirectory(str(out))
