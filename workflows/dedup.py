"""Semantic dedup workflow: k-means task -> capped map task over cluster groups -> decision + deck; and the
eval decontamination workflow: eval sets -> shards -> the same embedder -> decontam step.

Each comes twice from one wiring (a factory): the production workflow runs the GPU tasks, the `*_cpu_wf` one
their CPU twins (tasks/resources.py) for the tiny presets."""

import functools
from typing import List, Optional

from flytekit import LaunchPlan, dynamic, map_task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.steps.dedup.config import DecontamConfig, SemDedupConfig, target_dedup_config, tiny_dedup_config
from core.steps.embed.config import EmbedConfig
from tasks.dedup import (
    cluster_embeddings,
    cluster_embeddings_cpu,
    decide_semdedup,
    decontaminate_evals,
    ingest_eval_sets,
    prune_cluster_group,
    prune_cluster_group_cpu,
)
from tasks.embed import embed_shards, embed_shards_cpu
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source
from workflows import named_workflow


@dynamic(container_image=CPU_IMAGE)
def prune_groups(groups: list[FlyteFile], config: SemDedupConfig, on_cpu: bool = False) -> list[FlyteFile]:
    """Pairwise pass over every cluster group, at most config.max_parallel_groups at a time.

    :param groups: Group files from cluster_embeddings.
    :param config: SemDedupConfig (max_parallel_groups caps the map task's concurrency).
    :param on_cpu: Run the CPU twin of the pairwise task (tiny presets) instead of the GPU one.
    """
    worker = prune_cluster_group_cpu if on_cpu else prune_cluster_group
    mapped = map_task(functools.partial(worker, config=config), concurrency=config.max_parallel_groups)
    return mapped(group=groups)


def _semdedup_wf(name: str, on_cpu: bool):
    """`semdedup_wf` (GPU tasks) or `semdedup_cpu_wf` (their CPU twins, the tiny presets): one wiring."""

    def semdedup(
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
        cluster = cluster_embeddings_cpu if on_cpu else cluster_embeddings
        c = cluster(embeddings=embeddings, config=config, prev=prev, prev_step=prev_step)
        scores = prune_groups(groups=c.groups, config=config, on_cpu=on_cpu)
        return decide_semdedup(work=c.work, scores=scores, config=config, run=run)

    return named_workflow(semdedup, name)


semdedup_wf = _semdedup_wf("semdedup_wf", on_cpu=False)
semdedup_cpu_wf = _semdedup_wf("semdedup_cpu_wf", on_cpu=True)


def _decontamination_wf(name: str, on_cpu: bool):
    """`decontamination_wf` (GPU embedder) or `decontamination_cpu_wf` (its CPU twin): one wiring."""

    def decontamination(
        embeddings: FlyteDirectory,
        eval_cache: str,
        benchmarks: List[str],
        embed_config: EmbedConfig,
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
        :param embed_config: The EmbedConfig the training data was embedded with (the eval sets get the same).
        :param config: DecontamConfig (threshold, k, kind).
        :param prev: Output directory of the previous step; its ledger selects the input ids.
        :param prev_step: Name of the previous step ("" = every embedded sample).
        :param run: Ingest output of the training data (images for the deck's gallery).
        """
        ev_run = ingest_eval_sets(cache_dir=eval_cache, benchmarks=benchmarks,
                                  source_fingerprint=fingerprint_source(source=eval_cache))
        embed = embed_shards_cpu if on_cpu else embed_shards
        ev_emb = embed(shards=ev_run, prev=ev_run, prev_step="ingest", config=embed_config)
        return decontaminate_evals(embeddings=embeddings, evals=ev_emb, config=config, prev=prev,
                                   prev_step=prev_step, run=run, eval_run=ev_run)

    return named_workflow(decontamination, name)


decontamination_wf = _decontamination_wf("decontamination_wf", on_cpu=False)
decontamination_cpu_wf = _decontamination_wf("decontamination_cpu_wf", on_cpu=True)


semdedup_tiny_lp = LaunchPlan.get_or_create(semdedup_cpu_wf, name="semdedup_tiny",
                                            default_inputs={"config": tiny_dedup_config()})
semdedup_target10_lp = LaunchPlan.get_or_create(
    semdedup_wf, name="semdedup_target10", default_inputs={"config": target_dedup_config(0.10)}
)
