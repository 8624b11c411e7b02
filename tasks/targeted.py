"""Targeted (MM-Gen-style) generation tasks: split the reference set into subgroups, retrieve pool images
per subgroup, generate Q&A per shard with a VLM (vllm image, one GPU), filter, mix exports.

Thin wrappers over core/targeted: every task takes the one `TargetedConfig` (a dataclass; on the command line a
partial JSON onto the `tiny` preset, or `{"preset": "qwen2.5-vl", ...}`), validated when it is built, and the
step outputs of ingest, embed and decontamination as `StepOut`s (tasks/types.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, NamedTuple, Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.configs import override
from core.targeted.config import TargetedConfig, tiny_targeted_config
from core.targeted.filters import FILTER_STEPS
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS
from tasks.images import CPU_IMAGE, VLLM_IMAGE
from tasks.paths import resume_key, source, step_workdir, workdir
from tasks.types import StepOut, local, passing

log = logging.getLogger(__name__)
CACHE = dict(cache=True, cache_version=task_version(__name__))
TINY = tiny_targeted_config()
# The ledger the generation writes (the export's `run` step); the filters' ledgers follow it in FILTER_STEPS.
GENERATE_STEP = FILTER_STEPS[0]


@task(container_image=CPU_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, requests=Resources(cpu="2", mem="8Gi"), **CACHE)
def split_reference(reference: StepOut, reference_ids: Optional[FlyteFile] = None,
                    config: TargetedConfig = TINY) -> FlyteDirectory:
    """Split the target task's reference set (its train/val split, never test items) into subgroups: by a
    field (`subgroup_field`, e.g. `source` or `metadata.task`) or by k-means on MiniLM question embeddings.

    :param reference: Ingest output of the reference set (any dialect the ingest step reads).
    :param reference_ids: Optional id list of trusted reference samples (core/foundation/ids.py: a JSON list, an
        object with a "clean" (or "ids") list such as the demo's ground_truth.json, Parquet, or one id per line).
    :param config: TargetedConfig (subgroup_field, n_clusters, include_subgroups, families...).
    :return: Directory with `targeted/subgroups.parquet` (one row per reference sample, used or excluded with a reason).
    """
    from core.foundation.ids import load_id_list
    from core.targeted.pipeline import write_reference_table
    from core.targeted.report import subgroups_html

    ids = load_id_list(reference_ids.download(), key="clean") if reference_ids is not None else None
    out = workdir("subgroups")
    ref = write_reference_table(source(reference.dir), config, ids, out)
    Deck("subgroups", subgroups_html(ref, config.examples_per_subgroup))
    log.info("subgroups: %s -> %s", ref[ref.used].groupby("subgroup").size().to_dict(), out)
    return FlyteDirectory(str(out))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), **CACHE)
def build_tiny_vlm(reference: StepOut, subgroups: FlyteDirectory, model_dir: Optional[FlyteDirectory] = None,
                   config: TargetedConfig = TINY, steps: int = 300) -> FlyteDirectory:
    """The generator model: `model_dir` when given (passed through untouched); otherwise, for the transformers
    backend, the project's tiny HF LLaVA, taught the reply shape on the reference set for `steps` CPU steps.

    :param reference: Ingest output of the reference set (images for the tiny model's training).
    :param subgroups: split_reference output.
    :param model_dir: Local copy of the generator (e.g. Qwen2.5-VL-7B-Instruct); required for the vllm backend.
    :param config: TargetedConfig (seed, and what the reply shape is taught on).
    :param steps: Training steps of the tiny model (0: random weights).
    """
    if config.model:  # never silently replaced: the generator comes in as model_dir
        raise ValueError(f"config.model={config.model!r}: leave it empty and pass the generator as model_dir")
    if model_dir is not None:
        return model_dir
    if config.backend != "transformers":
        raise ValueError(f"backend {config.backend!r} needs model_dir (a local copy of the VLM; nothing is "
                         "downloaded); only the transformers backend builds the tiny model")
    from core.targeted.pipeline import build_generator, read_reference_table

    out = str(workdir("tiny_vlm") / "model")
    info = build_generator(out, source(reference.dir), read_reference_table(subgroups.download()),
                           override(config, model=out), steps)
    log.info("tiny VLM built at %s; trained: %s", out, info)
    return FlyteDirectory(out)


class RetrieveOutputs(NamedTuple):
    out_dir: FlyteDirectory
    shards: List[str]


@task(container_image=CPU_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, requests=Resources(cpu="4", mem="16Gi"), **CACHE)
def retrieve_images(subgroups: FlyteDirectory, reference_embeddings: StepOut, pool_embeddings: StepOut,
                    pool: StepOut, pool_decontam: Optional[StepOut] = None,
                    config: TargetedConfig = TINY) -> RetrieveOutputs:
    """Per subgroup, the pool images nearest to its reference images (or centroid) in the embed step's space,
    within `budget_per_subgroup`, each image used once, only pool ids the decontamination kept.

    :param subgroups: split_reference output.
    :param reference_embeddings: Embed output of the reference set (same model as the pool's).
    :param pool_embeddings: Embed output of the pool.
    :param pool: Ingest output of the pool (images for the deck's gallery).
    :param pool_decontam: Decontamination output of the pool; only its passing ids are searched.
    :param config: TargetedConfig (retrieval, budget_per_subgroup, oversample, shard_size, ...).
    :return: out_dir (`targeted/retrieved.parquet`, `ledger/tg_retrieve/`) and the generation shard names.
    """
    from core.steps.dedup.report import shard_fetcher
    from core.targeted.pipeline import read_reference_table
    from core.targeted.report import retrieval_html
    from core.targeted.retrieve import retrieve

    allowed = passing(pool_decontam)
    out = workdir("retrieve")
    got = retrieve(read_reference_table(subgroups.download()), local(reference_embeddings), local(pool_embeddings),
                   out, config, allowed.ids if allowed is not None else None)
    fetch = shard_fetcher(f"{source(pool.dir).rstrip('/')}/shards", dict(zip(got.pool_id, got.pool_shard)))
    Deck("retrieval", retrieval_html(got, fetch))
    shards = sorted(got["gen_shard"].unique().tolist())
    log.info("retrieved %d images in %d generation shards -> %s", len(got), len(shards), out)
    return RetrieveOutputs(out_dir=FlyteDirectory(str(out)), shards=shards)


# The decorator states the production profile (core/runs/steps.py GPU_PROFILES["generate"]: one vLLM engine on
# one GPU, vllm image); workflows/targeted.py gives the node the run's profile from the config (`uses_gpu`: the
# tiny preset, device=cpu, two CPUs and no GPU). Cached: generation is seeded per request.
@task(container_image=VLLM_IMAGE, requests=Resources(cpu="8", mem="48Gi", gpu="1"), limits=Resources(gpu="1"),
      retries=2, **CACHE)
def generate_targeted_shard(shard: str, retrieved: FlyteDirectory, subgroups: FlyteDirectory, pool: StepOut,
                            model: FlyteDirectory, config: TargetedConfig = TINY) -> FlyteDirectory:
    """Generate one question/answer per retrieved image of one generation shard with the VLM, parse it into a
    LLaVA conversation (or reject it with a reason) and publish the shard (resumable, seeded).

    :param shard: Generation shard name (`gen-NNNNNN`, from retrieve_images).
    :param retrieved: retrieve_images output.
    :param subgroups: split_reference output (in-context examples).
    :param pool: Ingest output of the pool (the images).
    :param model: Generator model directory (HF layout).
    :param config: TargetedConfig (backend, k_shot, temperature, max_new_tokens, prompts, ...).
    :return: Directory with `shards/<shard>-000000.tar` (accepted), `targeted/generations/`, `ledger/tg_generate/`.
    """
    import pandas as pd

    from core.targeted.generate import generate_shards
    from core.targeted.pipeline import pool_shard_urls, read_reference_table, reference_examples

    got = pd.read_parquet(f"{retrieved.download()}/targeted/retrieved.parquet")
    if shard not in set(got["gen_shard"]):
        raise ValueError(f"unknown generation shard {shard!r}")
    sf = step_workdir(GENERATE_STEP, resume_key("generate_targeted_shard", task_version(__name__), shard=shard,
                                                retrieved=retrieved, subgroups=subgroups, pool=pool, model=model,
                                                config=config))  # a re-run skips a done shard
    [st] = generate_shards(got, pool_shard_urls(source(pool.dir)), Path(sf.path), override(config, model=model.download()),
                           reference_examples(read_reference_table(subgroups.download())), shards=[shard])
    log.info("%s: %d images, %d accepted, %.1fs generating of %.1fs; rejected %s -> %s", shard, st.n, st.n_accepted,
             st.seconds_generate, st.seconds_total, st.reasons, sf.url)
    return FlyteDirectory(sf.close())


class FilterOutputs(NamedTuple):
    generated: StepOut
    filters: List[StepOut]
    kept_ids: FlyteFile


@task(container_image=CPU_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, requests=Resources(cpu="4", mem="16Gi"), **CACHE)
def filter_generated_samples(generations: List[FlyteDirectory], subgroups: FlyteDirectory, ppl_model: FlyteDirectory,
                             eval_cache: str = "", benchmarks: Optional[List[str]] = None,
                             config: TargetedConfig = TINY) -> FilterOutputs:
    """Filter the accepted generations: perplexity (direction and percentile from the config), near-duplicates of
    the reference items and of each other (mining + SemDeDup on MiniLM), decontamination against the eval sets'
    questions; every drop with its reason in the ledger.

    :param generations: generate_targeted_shard outputs.
    :param subgroups: split_reference output (the reference items for the near-duplicate check).
    :param ppl_model: Reference LM directory for the perplexity step (train_reference_lm output).
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`); empty: no text decontamination.
    :param benchmarks: Benchmarks whose test questions the generated questions must not copy.
    :param config: TargetedConfig (ppl_direction, ppl_percentile, dedup_eps, ...).
    :return: generated (the merged generation: shards/ + ledger/tg_generate, step `tg_generate`), filters (one
        StepOut per filter ledger, in FILTER_STEPS order: what the export reads), kept_ids (the named subset).
    """
    import pandas as pd

    from core.targeted.pipeline import filter_generations, read_reference_table
    from core.targeted.report import funnel_html, generation_html

    gen, out = workdir("generated"), workdir("filtered")
    summary = filter_generations([g.download() for g in generations], gen, out, config, ppl_model.download(),
                                 read_reference_table(subgroups.download()), eval_cache, benchmarks or [])
    Deck("targeted", funnel_html(summary) + generation_html(pd.read_parquet(gen / "targeted" / "generations")))
    log.info("targeted funnel: %s", summary)
    filtered = FlyteDirectory(str(out))
    return FilterOutputs(generated=StepOut(GENERATE_STEP, FlyteDirectory(str(gen))),
                         filters=[StepOut(s, filtered) for s in FILTER_STEPS[1:]],
                         kept_ids=FlyteFile(str(out / "targeted" / "kept_ids.json")))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), **CACHE)
def mix_exports(exports: List[StepOut], name: str) -> StepOut:
    """One training directory from several exports (e.g. the baseline and a generated subset): their shards
    side by side (`shards/part<i>-<kind>-<shard>.tar`) and a manifest listing the parts and the total count.

    :param exports: export_dataset outputs (shards/ + manifest.json).
    :param name: Name of the mixture (recorded in the manifest).
    :return: StepOut "export": what training and the comparison read of an export (shards/, manifest.json); it
        has no ledger of its own (its parts' exports do).
    """
    from core.targeted.pipeline import mix_exports as mix

    out = workdir("mix")
    manifest = mix([local(ex) for ex in exports], out, name)
    log.info("mixture %s: %s", name, manifest)
    return StepOut("export", FlyteDirectory(str(out)))
