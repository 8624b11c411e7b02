"""Eval tasks: list checkpoints, plan (checkpoint, benchmark-group) jobs, evaluate one job per worker,
collect the results table and deck. Logic lives in core/evals; these are thin wrappers."""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional

from flytekit import Deck, Resources, current_context, task
from flytekit.types.directory import FlyteDirectory

from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE, VLLM_IMAGE
from tasks.steplog import step_finished, step_started

log = logging.getLogger(__name__)

EvalJobs = NamedTuple("EvalJobs", [("checkpoints", list[str]), ("groups", list[str])])


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def find_checkpoints(prefix: str, pattern: str = "*") -> list[str]:
    """List the checkpoint directories directly under a prefix, sorted by epoch.

    :param prefix: Local path or fsspec URL (s3://...) holding one directory per checkpoint.
    :param pattern: Glob on the directory names (e.g. "epoch_*").
    :return: Checkpoint URIs, epoch order.
    """
    from core.evals.checkpoints import list_checkpoints

    ckpts = list_checkpoints(prefix, pattern)
    log.info("found %d checkpoints under %s", len(ckpts), prefix)
    return ckpts


@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def plan_eval_jobs(checkpoints: list[str], benchmarks: list[str], group_size: int = 0) -> EvalJobs:
    """Expand checkpoints x benchmark groups into parallel job lists (one worker per job).

    :param checkpoints: Checkpoint URIs.
    :param benchmarks: Benchmark names (countbench, docvqa, chartqa, realworldqa, pixmo_points).
    :param group_size: Benchmarks per worker; 0 puts all benchmarks in one group, so each checkpoint is
        downloaded exactly once.
    :return: checkpoints[i] and groups[i] (comma-joined benchmark names) describe job i.
    """
    from core.evals.registry import benchmark_names

    unknown = sorted(set(benchmarks) - set(benchmark_names()))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {benchmark_names()}")
    size = group_size if group_size > 0 else max(len(benchmarks), 1)
    groups = [",".join(benchmarks[i : i + size]) for i in range(0, len(benchmarks), size)]
    jobs = [(c, g) for c in checkpoints for g in groups]
    return EvalJobs([c for c, _ in jobs], [g for _, g in jobs])


_EVAL_OPTS = dict(container_image=VLLM_IMAGE, retries=1, enable_deck=True, deck_fields=DECK_FIELDS)


# The decorator states the production profile (core/runs/steps.py GPU_PROFILES["evaluate"]); workflows.evaluate
# overrides each worker node with the run's profile (tiny checkpoints: two CPUs, no GPU).
@task(requests=Resources(cpu="8", mem="64Gi", gpu="1"), **_EVAL_OPTS)
def evaluate_checkpoint_benchmarks(
    checkpoint: str,
    benchmarks: str,
    cache_dir: str,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    max_samples: int = 0,
    scoring: str = "exact",
) -> FlyteDirectory:
    """Download one checkpoint, evaluate it on a group of benchmarks, delete it.

    A bad sample or a failed benchmark is recorded, never fatal; a checkpoint that cannot be downloaded or
    loaded yields summary rows marked failed with the error.

    :param checkpoint: Checkpoint URI (directory; local path or fsspec URL).
    :param benchmarks: Comma-separated benchmark names.
    :param cache_dir: Root of the benchmark caches, `<cache_dir>/<benchmark>/...` in the published layouts.
    :param backend: auto | mini_llava | transformers | vllm.
    :param device: cpu | cuda | auto.
    :param batch_size: Requests per generate call.
    :param max_samples: Per-benchmark sample cap (0 = all).
    :param scoring: exact (lmms-eval / Molmo reference scoring) | lenient (adds the lenient parsers' score beside it).
    :return: Directory with records.parquet (per sample), summary.parquet (per benchmark) and lmms_eval/
        (results.json, samples_<benchmark>.jsonl).
    """
    t0 = step_started("eval", checkpoint=checkpoint, benchmarks=benchmarks)
    from core.evals.checkpoints import CheckpointStore
    from core.evals.config import EvalConfig
    from core.evals.runner import evaluate_checkpoint

    work = current_context().working_directory
    cfg = EvalConfig(cache_dir=cache_dir, benchmarks=[b for b in benchmarks.split(",") if b], backend=backend,
                     device=device, batch_size=batch_size, max_samples=max_samples, concurrency=1,
                     scoring=scoring)  # fmt: skip
    out = os.path.join(work, "eval_out")
    wdir = evaluate_checkpoint(checkpoint, cfg, out, CheckpointStore(local_dir=work))
    _worker_deck(wdir)
    step_finished("eval", t0, checkpoint=checkpoint)
    return FlyteDirectory(wdir)


def _worker_deck(wdir: str) -> None:
    import pandas as pd

    from core.foundation.report import page, table_html

    summary = pd.read_parquet(os.path.join(wdir, "summary.parquet"))
    records = pd.read_parquet(os.path.join(wdir, "records.parquet"))
    bad = records[(~records["parsing_success"].astype(bool)) | (records["error"] != "")]
    cols = ["benchmark", "sample_id", "raw_output", "parsed_output", "error"]
    Deck("eval worker", page(table_html(summary, "Per benchmark"),
                             table_html(bad[cols].head(50), "Unparsable or failed samples (first 50)")))  # fmt: skip


@task(container_image=CPU_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, requests=Resources(cpu="2", mem="4Gi"))
def collect_eval_results(
    results: list[Optional[FlyteDirectory]], checkpoints: list[str], groups: list[str]
) -> FlyteDirectory:
    """Reduce: merge worker outputs into the results table and the deck (score vs step, one line per variant).

    :param results: Worker output directories (None where a worker was lost: marked failed, worker_lost).
    :param checkpoints: The job list's checkpoints (same order as results).
    :param groups: The job list's benchmark groups (same order as results).
    :return: Directory with records.parquet, summary.parquet, results.csv, report.html, results.json and
        lmms_eval/<worker>/ (lmms-eval-shaped results.json and samples_<benchmark>.jsonl).
    """
    if not len(results) == len(checkpoints) == len(groups):
        raise ValueError(f"results, checkpoints and groups must align: {len(results)}, {len(checkpoints)}, "
                         f"{len(groups)}")
    t0 = step_started("evaluation", workers=len(results))
    from core.evals.results import collect_worker_outputs, write_eval_report

    work = current_context().working_directory
    out = os.path.join(work, "eval_results")
    # a None result is a worker that crashed (OOM, node loss) after its retries: failed rows, `worker_lost`
    res = collect_worker_outputs([r.download() if r is not None else None for r in results], checkpoints, groups,
                                 out, os.path.join(work, "lost"))
    Deck("evaluation", write_eval_report(res, out))
    save_decks(out, "evaluation")
    step_finished("evaluation", t0, checkpoints=res.table.shape[0], failed=len(res.failed_checkpoints))
    log.info("evaluated %d checkpoints, %d with failures", res.table.shape[0], len(res.failed_checkpoints))
    print(f"evaluation results: {out}/results.csv; report: {out}/report.html", flush=True)
    return FlyteDirectory(out)
