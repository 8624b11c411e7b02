"""Evaluation workflows: checkpoints x benchmarks fan-out with a hard concurrency cap, then a reduce.

`evaluation` takes explicit checkpoint URIs; `prefix_evaluation` lists the checkpoints under a prefix
first; `nightly_eval` runs `prefix_evaluation` on a cron schedule. The cap is the ArrayNode `parallelism`
(map_task `concurrency`): at most EVAL_CONCURRENCY workers run at once, each holding one checkpoint.
"""

import os
from functools import partial

from flytekit import CronSchedule, LaunchPlan, map_task, workflow
from flytekit.types.directory import FlyteDirectory

from tasks.evals import (
    collect_eval_results,
    evaluate_checkpoint_benchmarks,
    evaluate_checkpoint_benchmarks_cpu,
    find_checkpoints,
    plan_eval_jobs,
)
from workflows import named_workflow

# Hard cap on concurrently running eval workers (= checkpoints held at once). It is compiled into the
# workflow spec as the array node's parallelism, so it cannot be a run-time input.
EVAL_CONCURRENCY = 2
# A worker that still crashes after its retry (OOM, lost node) becomes a "worker_lost" row instead of
# failing the run, as long as one worker succeeded.
EVAL_MIN_SUCCESS_RATIO = 0.01
ALL_BENCHMARKS = ["countbench", "docvqa", "chartqa", "realworldqa", "pixmo_points"]
# The nightly plan's paths come from the environment of `make register` / `make activate`. Unset, they are
# placeholders under PLACEHOLDER_URL, and `make activate` refuses to switch the schedule on.
PLACEHOLDER_URL = "s3://mmcurate-placeholder/"
NIGHTLY_PREFIX = os.environ.get("MMCURATE_NIGHTLY_PREFIX", PLACEHOLDER_URL + "checkpoints/latest/")
NIGHTLY_CACHE = os.environ.get("MMCURATE_NIGHTLY_CACHE", PLACEHOLDER_URL + "eval-cache/")


def _evaluation_wf(name: str, worker_task, default_device: str):
    """`evaluation` (GPU workers) or `evaluation_cpu` (their CPU twin, the tiny checkpoints): one wiring."""

    def evaluation(
        checkpoints: list[str],
        benchmarks: list[str],
        cache_dir: str,
        backend: str = "auto",
        device: str = default_device,
        batch_size: int = 8,
        max_samples: int = 0,
        group_size: int = 0,
        scoring: str = "exact",
    ) -> FlyteDirectory:
        """Evaluate checkpoints on benchmarks, at most EVAL_CONCURRENCY checkpoints at a time.

        :param checkpoints: Checkpoint URIs (directories).
        :param benchmarks: Benchmark names (countbench, docvqa, chartqa, realworldqa, pixmo_points).
        :param cache_dir: Root of the benchmark caches (`<cache_dir>/<benchmark>/...`).
        :param backend: auto | mini_llava | transformers | vllm.
        :param device: cpu | cuda | auto.
        :param batch_size: Requests per generate call.
        :param max_samples: Per-benchmark sample cap (0 = all).
        :param group_size: Benchmarks per worker (0 = all in one, one download per checkpoint).
        :param scoring: exact (lmms-eval / Molmo reference) | lenient (adds the lenient score beside it).
        :return: records.parquet, summary.parquet, results.csv, report.html, results.json, lmms_eval/.
        """
        jobs = plan_eval_jobs(checkpoints=checkpoints, benchmarks=benchmarks, group_size=group_size)
        worker = partial(worker_task, cache_dir=cache_dir, backend=backend, device=device, batch_size=batch_size,
                         max_samples=max_samples, scoring=scoring)  # fmt: skip
        results = map_task(worker, concurrency=EVAL_CONCURRENCY, min_success_ratio=EVAL_MIN_SUCCESS_RATIO)(
            checkpoint=jobs.checkpoints, benchmarks=jobs.groups
        )
        return collect_eval_results(results=results, checkpoints=jobs.checkpoints, groups=jobs.groups)

    return named_workflow(evaluation, name)


evaluation = _evaluation_wf("evaluation", evaluate_checkpoint_benchmarks, "auto")
# CPU workers (tiny checkpoints of the demo and the tiny ablation), same cap.
evaluation_cpu = _evaluation_wf("evaluation_cpu", evaluate_checkpoint_benchmarks_cpu, "cpu")


@workflow
def prefix_evaluation(
    prefix: str,
    benchmarks: list[str],
    cache_dir: str,
    pattern: str = "*",
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    max_samples: int = 0,
    scoring: str = "exact",
) -> FlyteDirectory:
    """Evaluate every checkpoint directory under a prefix.

    :param prefix: Path or URL holding one directory per checkpoint.
    :param benchmarks: Benchmark names.
    :param cache_dir: Root of the benchmark caches.
    :param pattern: Glob on checkpoint directory names.
    :param backend: auto | mini_llava | transformers | vllm.
    :param device: cpu | cuda | auto.
    :param batch_size: Requests per generate call.
    :param max_samples: Per-benchmark sample cap (0 = all).
    :param scoring: exact | lenient (see `evaluation`).
    """
    ckpts = find_checkpoints(prefix=prefix, pattern=pattern)
    return evaluation(checkpoints=ckpts, benchmarks=benchmarks, cache_dir=cache_dir, backend=backend, device=device,
                      batch_size=batch_size, max_samples=max_samples, scoring=scoring)  # fmt: skip


nightly_eval = LaunchPlan.get_or_create(
    workflow=prefix_evaluation,
    name="nightly_eval",
    default_inputs={"prefix": NIGHTLY_PREFIX, "benchmarks": ALL_BENCHMARKS, "cache_dir": NIGHTLY_CACHE,
                    "backend": "vllm", "device": "cuda", "batch_size": 64},  # fmt: skip
    schedule=CronSchedule(schedule="0 3 * * *"),
)
