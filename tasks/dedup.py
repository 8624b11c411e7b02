"""SemDeDup and eval decontamination tasks: local paths in, one core call, typed outputs out.

Scale-out (workflows/dedup.py): `cluster_embeddings` (GPU k-means) -> `prune_cluster_group` as a
map task over balanced cluster groups (capped concurrency) -> `decide_semdedup` (threshold, ledger, deck).
`dedup_embeddings` runs all three in one task for small data.

Each task returns a step output directory: `semdedup/` artifacts + `ledger/semdedup/part-*.parquet`.
"""

from __future__ import annotations

import logging
import shutil
from typing import List, NamedTuple, Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.steps.dedup.config import DecontamConfig, SemDedupConfig
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE, GPU_IMAGE
from tasks.paths import resume_key, source, step_workdir, workdir
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut, passing

log = logging.getLogger(__name__)


def _fetcher(run: Optional[StepOut], out_dir: str):
    """Sample fetcher for the deck gallery, reading only the needed shards of the ingest output."""
    if run is None:
        return None
    from core.foundation.ledger import read_ledger, step_dir
    from core.steps.dedup.report import shard_fetcher

    led = read_ledger(step_dir(out_dir, "semdedup"))
    return shard_fetcher(f"{source(run.dir).rstrip('/')}/shards", dict(zip(led.sample_id, led.shard)))


def _deck(summary: dict, run: Optional[StepOut], out_dir: str) -> None:
    from core.steps.dedup.report import semdedup_report_html

    Deck("semdedup", semdedup_report_html(summary, _fetcher(run, out_dir)))


# Deterministic given their inputs (seeded k-means, fixed keep order): cached, versioned by the code they run,
# so a re-run of `curate` with a changed later knob (e.g. perplexity) reuses them and passes the same output
# directories downstream, which keeps the later steps' caches valid too.
CACHE = dict(cache=True, cache_version=task_version(__name__))


class ClusterOutputs(NamedTuple):
    work: FlyteDirectory
    groups: list[FlyteFile]


@task(container_image=GPU_IMAGE, requests=Resources(cpu="8", mem="64Gi", gpu="1"), retries=1, **CACHE)
def cluster_embeddings(
    embeddings: StepOut,
    config: SemDedupConfig,
    prev: Optional[StepOut] = None,
) -> ClusterOutputs:
    """Spherical k-means (faiss, GPU when present) of the embeddings, split into balanced cluster groups.

    :param embeddings: The embed step's output (Parquet files of sample_id, image_emb, text_emb).
    :param config: SemDedupConfig (n_clusters, eps or target_removal, keep policy, kind, device, ...).
    :param prev: The previous step's output (its ledger selects the input ids); None: every embedded sample.
    :return: work (plan.json, side.parquet, sweep.parquet) and one file per cluster group.
    """
    from core.steps.dedup.pipeline import cluster_embeddings as run

    out = workdir("semdedup_out")
    groups = workdir("semdedup_groups")
    plan = run(embeddings.dir.download(), out, config, passing(prev), groups)
    log.info("clustered %d samples into %d clusters, %d groups", plan.n_deduped, plan.n_clusters, len(plan.group_files))
    return ClusterOutputs(FlyteDirectory(str(out)), [FlyteFile(g) for g in plan.group_files])




@task(container_image=GPU_IMAGE, requests=Resources(cpu="4", mem="32Gi", gpu="1"), retries=2, **CACHE)
def prune_cluster_group(group: FlyteFile, config: SemDedupConfig) -> FlyteFile:
    """M (max similarity to an earlier cluster member) and its neighbour for one cluster group.

    :param group: A group file written by cluster_embeddings (normalized rows of whole clusters).
    :param config: The same SemDedupConfig (keep policy, chunk_size, device).
    :return: Parquet of sample_id, shard, cluster, rank, sim_to_centroid, m, neighbour_id.
    """
    from core.steps.dedup.pipeline import prune_cluster_group as run

    return FlyteFile(run(group.download(), config, workdir("scores")))




@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="16Gi"), enable_deck=True, deck_fields=DECK_FIELDS, **CACHE)
def decide_semdedup(
    work: FlyteDirectory,
    scores: list[FlyteFile],
    config: SemDedupConfig,
    run: Optional[StepOut] = None,
) -> StepOut:
    """One global eps / exact-target threshold over all groups' M; writes the ledger and the report deck.

    :param work: cluster_embeddings' work directory.
    :param scores: prune_cluster_group outputs, one per group.
    :param config: The same SemDedupConfig (eps or target_removal decide here).
    :param run: Ingest output (shards) for the removed-pair gallery; optional.
    :return: StepOut "semdedup": semdedup/{summary.json, removed_pairs.parquet, ...}, ledger/semdedup/.
    """
    t0 = step_started("semdedup", groups=len(scores))
    from core.steps.dedup.pipeline import decide_semdedup as run_decide

    out = workdir("semdedup_run")
    shutil.copytree(work.download(), out, dirs_exist_ok=True)
    summary = run_decide(out, config, [f.download() for f in scores])
    _deck(summary, run, str(out))
    save_decks(str(out), "semdedup")
    step_finished("semdedup", t0, str(out))
    return StepOut("semdedup", FlyteDirectory(str(out)))


@task(container_image=GPU_IMAGE, requests=Resources(cpu="8", mem="64Gi", gpu="1"), enable_deck=True, deck_fields=DECK_FIELDS, retries=1, **CACHE)
def dedup_embeddings(
    embeddings: StepOut,
    config: SemDedupConfig,
    prev: Optional[StepOut] = None,
    run: Optional[StepOut] = None,
) -> StepOut:
    """SemDeDup in one task (cluster, prune every group, decide): for data that fits one worker.

    :param embeddings: The embed step's output (Parquet files of sample_id, image_emb, text_emb).
    :param config: SemDedupConfig.
    :param prev: The previous step's output (its ledger selects the input ids); None: every embedded sample.
    :param run: Ingest output (shards) for the removed-pair gallery; optional.
    :return: StepOut "semdedup": semdedup/ artifacts and ledger/semdedup/.
    """
    t0 = step_started("semdedup", prev_step=prev.step if prev else "")
    from core.steps.dedup.pipeline import run_semdedup

    out = workdir("semdedup_run")
    summary = run_semdedup(embeddings.dir.download(), out, config, passing(prev))
    _deck(summary, run, str(out))
    save_decks(str(out), "semdedup")
    step_finished("semdedup", t0, str(out))
    return StepOut("semdedup", FlyteDirectory(str(out)))


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="8Gi"), **CACHE)
def ingest_eval_sets(cache_dir: str, benchmarks: List[str], max_items: int = 0,
                     source_fingerprint: str = "") -> StepOut:
    """Write eval benchmarks' items as WDS shards (one `<benchmark>-NNNNNN.tar` series each) to embed them.

    :param cache_dir: Root of the benchmark caches (`<cache_dir>/<benchmark>/...`, path or URL).
    :param benchmarks: Benchmark names (countbench, docvqa, chartqa, realworldqa, pixmo_points).
    :param max_items: Items per benchmark (0 = all).
    :param source_fingerprint: `fingerprint_source(cache_dir)`: part of the cache key only (changed caches re-run).
    :return: StepOut "ingest" of the eval sets: `shards/` and `ledger/ingest/` (rows the loader could not read are
        quarantined).
    """
    from core.evals.eval_shards import write_eval_shards

    out = workdir("eval_sets")
    counts = write_eval_shards(cache_dir, benchmarks, str(out), max_items=max_items)
    log.info("eval sets as shards: %s", counts)
    return StepOut("ingest", FlyteDirectory(str(out)))


@task(container_image=GPU_IMAGE, requests=Resources(cpu="8", mem="32Gi"), enable_deck=True, deck_fields=DECK_FIELDS, retries=1, **CACHE)
def decontam(
    embeddings: StepOut,
    evals: StepOut,
    config: DecontamConfig,
    prev: Optional[StepOut] = None,
    run: Optional[StepOut] = None,
    eval_run: Optional[StepOut] = None,
) -> StepOut:
    """Mine the nearest training samples of each eval item and drop training near-copies of eval items.

    :param embeddings: Training embeddings (the embed step's output).
    :param evals: Embeddings of the eval sets: the embed step's output for `ingest_eval_sets` shards, whose
        files `embed/<benchmark>-NNNNNN.parquet` name the benchmark.
    :param config: DecontamConfig (threshold, k, kind; fanout: the files over Ray workers).
    :param prev: The previous step's output (its ledger selects the input ids); None: every embedded sample.
    :param run: Ingest output of the training data (its shards show the deck's gallery images).
    :param eval_run: `ingest_eval_sets` output (the eval items' images in the gallery).
    :return: StepOut "decontam": mining/<benchmark>.parquet (merged from mining_parts/, one per file),
        ledger/decontam/ (reason eval_contamination:<benchmark>).
    """
    t0 = step_started("decontam", prev_step=prev.step if prev else "")
    from core.evals.eval_shards import eval_embedding_sets
    from core.foundation.ledger import read_ledger, step_dir
    from core.runs.fanout import StepSpec, run_fanout
    from core.steps.dedup.embeddings import embedding_files
    from core.steps.dedup.mining import DecontamStep, decontam_counts
    from core.steps.dedup.report import decontam_report_html, shard_fetcher

    sf = step_workdir("decontam", resume_key("decontam", task_version(__name__), embeddings=embeddings,
                                             evals=evals, config=config, prev=prev, run=run,
                                             eval_run=eval_run))  # a retry skips the decided files
    out = sf.path
    eval_sets = eval_embedding_sets(evals.dir.download())
    files = [str(f) for f in embedding_files(embeddings.dir.download())]
    # one faiss searcher per Ray actor when config.fanout.workers > 1 (each publishes its files' ledger and mining
    # parts; the driver merges the mining parts); else the step's own run, in this process
    summary = run_fanout(StepSpec(DecontamStep, (str(out), eval_sets, config), {"prev": passing(prev)}), files,
                         config.fanout)
    counts = decontam_counts(summary, list(eval_sets))
    log.info("decontam: %s", counts)
    fetch_train = fetch_eval = None
    if run is not None:
        led = read_ledger(step_dir(out, "decontam"))
        fetch_train = shard_fetcher(f"{source(run.dir).rstrip('/')}/shards", dict(zip(led.sample_id, led.shard)))
    if eval_run is not None:
        eled = read_ledger(step_dir(eval_run.dir.download(), eval_run.step))
        fetch_eval = shard_fetcher(f"{source(eval_run.dir).rstrip('/')}/shards", dict(zip(eled.sample_id, eled.shard)))
    Deck("decontam", decontam_report_html(str(out), counts, config, fetch_train, fetch_eval))
    save_decks(str(out), "decontam")
    step_finished("decontam", t0, sf.url)
    return StepOut("decontam", FlyteDirectory(sf.close()))
