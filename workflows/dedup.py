"""Semantic dedup workflow: k-means task -> capped map task over cluster groups -> decision + deck; and the
eval decontamination workflow: eval sets -> shards -> the same embedder -> decontam step."""

import functools
from typing import List, Optional

from flytekit import LaunchPlan, dynamic, map_task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.dedup.config import DecontamConfig, SemDedupConfig, target_dedup_config, tiny_dedup_config
from tasks.dedup import cluster_embeddings, decide_semdedup, decontaminate_evals, ingest_eval_sets, prune_cluster_group
from tasks.embed import embed_shards
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source


@dynamic(container_image=CPU_IMAGE)
def prune_groups(groups: list[FlyteFile], config: SemDedupConfig) -> list[FlyteFile]:
    """Pairwise pass over every cluster group, at most config.max_parallel_groups at a time.

    :param groups: Group files from cluster_embeddings.
    :param config: SemDedupConfig (max_parallel_groups caps the map task's concurrency).
    """
    mapped = map_task(functools.partial(prune_cluster_group, config=config), concurrency=config.max_parallel_groups)
    return mapped(group=groups)


@workflow
def semdedup_wf(
    embeddings: FlyteDirectory,
    config: SemDedupConfig,
    prev: Optional[FlyteDirectory] = None,
    prev_step: str = "",
    run: Optional[FlyteDirectory] = None,
) -> FlyteDirectory:
    """SemDeDup at scale: returns the step output directory (semdedup/ artifacts, ledger/semdedup/).

    :param embeddings: The embed step's Parquet files (sample_id, image_emb, text_emb).
    :param config: SemDedupConfig (eps or target_removal, n_clusters, keep, kind, device, ...).
    :param prev: Output directory of the previous step; its ledger selects the input ids.
    :param prev_step: Name of the previous step ("" = every embedded sample).
    :param run: Ingest output (shards) for the removed-pair gallery in the deck.
    """
    c = cluster_embeddings(embeddings=embeddings, config=config, prev=prev, prev_step=prev_step)
    scores = prune_groups(groups=c.groups, config=config)
    return decide_semdedup(work=c.work, scores=scores, config=config, run=run)


@workflow
def decontamination_wf(
    embeddings: FlyteDirectory,
    eval_cache: str,
    benchmarks: List[str],
    embed_preset: str,
    config: DecontamConfig,
    prev: Optional[FlyteDirectory] = None,
    prev_step: str = "",
    run: Optional[FlyteDirectory] = None,
) -> FlyteDirectory:
    """Decontaminate training data against eval sets embedded with the same model: returns the step output
    directory (mining/<benchmark>.parquet, ledger/decontam/).

    :param embeddings: The training data's embed output.
    :param eval_cache: Root of the benchmark caches (`<eval_cache>/<benchmark>/...`).
    :param benchmarks: Benchmarks to decontaminate against.
    :param embed_preset: The embed preset the training data was embedded with (the eval sets get the same).
    :param config: DecontamConfig (threshold, k, kind).
    :param prev: Output directory of the previous step; its ledger selects the input ids.
    :param prev_step: Name of the previous step ("" = every embedded sample).
    :param run: Ingest output of the training data (images for the deck's gallery).
    """
    ev_run = ingest_eval_sets(cache_dir=eval_cache, benchmarks=benchmarks,
                              source_fingerprint=fingerprint_source(source=eval_cache))
    ev_emb = embed_shards(shards=ev_run, upstream=ev_run, upstream_step="ingest", preset=embed_preset)
    return decontaminate_evals(embeddings=embeddings, evals=ev_emb, config=config, prev=prev, prev_step=prev_step,
                               run=run, eval_run=ev_run)


semdedup_tiny_lp = LaunchPlan.get_or_create(semdedup_wf, name="semdedup_tiny", default_inputs={"config": tiny_dedup_config()})
semdedup_target10_lp = LaunchPlan.get_or_create(
    semdedup_wf, name="semdedup_target10", default_inputs={"config": target_dedup_config(0.10)}
)
