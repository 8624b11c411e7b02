"""Semantic dedup workflow: k-means task -> capped map task over cluster groups -> decision + deck."""

import functools
from typing import Optional

from flytekit import LaunchPlan, dynamic, map_task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.dedup.config import SemDedupConfig, target_dedup_config, tiny_dedup_config
from tasks.dedup import cluster_embeddings, decide_semdedup, prune_cluster_group
from tasks.images import CPU_IMAGE


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


semdedup_tiny_lp = LaunchPlan.get_or_create(semdedup_wf, name="semdedup_tiny", default_inputs={"config": tiny_dedup_config()})
semdedup_target10_lp = LaunchPlan.get_or_create(
    semdedup_wf, name="semdedup_target10", default_inputs={"config": target_dedup_config(0.10)}
)
