"""Evaluation workflows: checkpoints x benchmarks fan-out with a hard concurrency cap, then a reduce.

`evaluation` takes explicit checkpoint URIs; `prefix_evaluation` lists the checkpoints under a prefix
first; `nightly_eval` runs `prefix_evaluation` on a cron schedule. The cap is the ArrayNode `parallelism`
(map_task `concurrency`): at most EVAL_CONCURRENCY workers run at once, each holding one checkpoint.

One workflow for GPU and CPU workers: the fan-out is the `@dynamic` `evaluate_jobs`, which gives the worker node
the run's resource profile (core/runs/steps.py `uses_gpu`: the `device` input when it names one, else the
caller's `gpu` input), so the tiny checkpoints never reach a GPU request and production workers get one GPU.
"""

import os
from functools import partial
from typing import NamedTuple, Optional

from flytekit import CronSchedule, LaunchPlan, Resources, dynamic, map_task, workflow
from flytekit.types.directory import FlyteDirectory

from tasks.evals import collect_eval_results, evaluate_checkpoint_benchmarks, find_checkpoints, plan_eval_jobs
from tasks.images import CPU_IMAGE
from tasks.resources import overrides

# Hard cap on concurrently running eval workers (= checkpoints held at once). It is compiled into the spec
# evaluate_jobs returns, as the array node's parallelism: a constant of the code, never a run-time input.
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


class Device(NamedTuple):
    """What the resource rule reads of an eval run (core/runs/steps.py `uses_gpu`): the workers' device."""

    device: str


@dynamic(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def evaluate_jobs(
    checkpoints: list[str],
    groups: list[str],
    cache_dir: str,
    backend: str,
    device: str,
    batch_size: int,
    max_samples: int,
    scoring: str,
    gpu: bool,
) -> list[Optional[FlyteDirectory]]:
    """The capped fan-out of eval workers (job i = checkpoints[i] x groups[i]) on the run's resource profile:
    `overrides("evaluate", device, gpu)` (tasks/resources.py): `device` cuda -> one GPU per worker, cpu -> two
    CPUs and no GPU, auto -> the caller's run (`gpu`)."""
    worker = partial(evaluate_checkpoint_benchmarks, cache_dir=cache_dir, backend=backend, device=device,
                     batch_size=batch_size, max_samples=max_samples, scoring=scoring)  # fmt: skip
    fan = map_task(worker, concurrency=EVAL_CONCURRENCY, min_success_ratio=EVAL_MIN_SUCCESS_RATIO)
    return fan(checkpoint=checkpoints, benchmarks=groups).with_overrides(**overrides("evaluate", Device(device), gpu))


@workflow
def evaluation(
    checkpoints: list[str],
    benchmarks: list[str],
    cache_dir: str,
    backend: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    max_samples: int = 0,
    group_size: int = 0,
    scoring: str = "exact",
    gpu: bool = True,
) -> FlyteDirectory:
    """Evaluate checkpoints on benchmarks, at most EVAL_CONCURRENCY checkpoints at a time.

    :param checkpoints: Checkpoint URIs (directories).
    :param benchmarks: Benchmark names (countbench, docvqa, chartqa, realworldqa, pixmo_points).
    :param cache_dir: Root of the benchmark caches (`<cache_dir>/<benchmark>/...`).
    :param backend: auto | mini_llava | transformers | vllm.
    :param device: cpu | cuda | auto. Also the workers' resource profile: cuda -> one GPU each, cpu -> two CPUs.
    :param batch_size: Requests per generate call.
    :param max_samples: Per-benchmark sample cap (0 = all).
    :param group_size: Benchmarks per worker (0 = all in one, one download per checkpoint).
    :param scoring: exact (lmms-eval / Molmo reference) | lenient (adds the lenient score beside it).
    :param gpu: The caller's run profile, used when `device` is auto: True (default) one GPU per worker, False
        two CPUs (the tiny checkpoints of the demo and of tiny ablations; `ablate` passes its run's).
    :return: records.parquet, summary.parquet, results.csv, report.html, results.json, lmms_eval/.
    """
    jobs = plan_eval_jobs(checkpoints=checkpoints, benchmarks=benchmarks, group_size=group_size)
    results = evaluate_jobs(checkpoints=jobs.checkpoints, groups=jobs.groups, cache_dir=cache_dir, backend=backend,
                            device=device, batch_size=batch_size, max_samples=max_samples, scoring=scoring, gpu=gpu)
    return collect_eval_results(results=results, checkpoints=jobs.checkpoints, groups=jobs.groups)


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
    gpu: bool = True,
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
    :param gpu: One GPU per worker when `device` is auto (see `evaluation`).
    """
    ckpts = find_checkpoints(prefix=prefix, pattern=pattern)
    return evaluation(checkpoints=ckpts, benchmarks=benchmarks, cache_dir=cache_dir, backend=backend, device=device,
                      batch_size=batch_size, max_samples=max_samples, scoring=scoring, gpu=gpu)  # fmt: skip


nightly_eval = LaunchPlan.get_or_create(
    workflow=prefix_evaluation,
    name="nightly_eval",
    default_inputs={"prefix": NIGHTLY_PREFIX, "benchmarks": ALL_BENCHMARKS, "cache_dir": NIGHTLY_CACHE,
                    "backend": "vllm", "device": "cuda", "batch_size": 64},  # fmt: skip
    schedule=CronSchedule(schedule="0 3 * * *"),
)
