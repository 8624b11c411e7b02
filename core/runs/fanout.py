"""One fan-out for every per-shard step: groups of units over a Ray actor pool, the reduce on the driver.

A per-shard step (`core.foundation.step.ShardStep`: embed, perplexity, rephrase, decontam scoring, export per
shard, targeted generation...) runs through `run_sharded`:

- `workers == 1`: in this process, exactly the step's own `run` (no Ray, no start-up cost: the demo path).
- `workers > 1`: the units are split, in order, into groups of `group_size`; a pool of
  `workers` actors (each reserving `cpus_per_worker` CPUs and `gpus_per_worker` GPUs) builds the step once
  per actor (the model is loaded once per actor, by the step's `setup`, before its first unfinished unit)
  and processes its groups with `ShardStep.process_units`, two queued on each actor as soon as it has started,
  so one still starting (a GPU node that is joining) holds nobody back (an actor starts the next group as it
  ends one, without waiting for the driver; the driver hands out the rest as groups end, so a slow actor gets
  fewer; an actor lost for good gets none, and the groups it held go once more to another actor, which skips
  their published units): every unit publishes its artifacts, then its
  ledger part, itself (unit-atomic, as in `run`). The driver holds the folder's writer lock and checked
  the stamp before any actor starts; after the pool it visits every finished unit (`visit_finished`, for
  steps that aggregate over all units) and runs the reduce (`finish`: missing ids, the empty part) once.

Ray runs it all: a local `ray.init(num_cpus=workers * cpus_per_worker)` when no cluster is known, the
cluster of a flytekitplugins-ray task (or `RAY_ADDRESS`) otherwise. A crashed actor (process or node lost)
is restarted by Ray (`max_restarts`) and its group retried (`max_task_retries`); the retried group skips the
units it already published, so each unit ends in the ledger exactly once. A unit that raises is not
retried (the error is deterministic: bad storage or a bug); the run goes on with the other groups and
then raises `FanOutIncomplete` naming the unfinished units, without the reduce (their ids are not
missing: a re-run decides them; finished units are skipped).

The step is given as data, never code: a `StepSpec` (the step class, imported by reference, and its
constructor arguments: configs, paths, `Passing`). It travels to the actors through Ray's object store
once, whatever the number of actors.

    spec = StepSpec(PerplexityStep, (out,), {"config": cfg, "prev": prev})
    summary = run_sharded(spec, shards_of(run), workers=2, group_size=4)        # or run_fanout(spec, urls, fan)
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.foundation.configs import ConfigJSON, check_ranges, register_preset
from core.foundation.step import ShardStep, StepSummary

log = logging.getLogger(__name__)

__all__ = ["FanOut", "FanOutIncomplete", "StepSpec", "groups_of", "run_fanout", "run_sharded"]


@dataclass
class FanOut(ConfigJSON):
    """How a per-shard step spreads over workers (where and how fast it runs, never what it makes: a stamp
    leaves it out, so a step folder resumes with another fan-out).

    :param workers: actors (1: in-process, no Ray). One model each.
    :param group_size: units (shards) per group, the unit of scheduling and of retry: small groups balance
        the load, larger ones cost fewer Ray calls (the model is loaded per actor, not per group).
    :param cpus_per_worker: CPUs each actor reserves; also its torch/OpenMP threads (at least 1).
    :param gpus_per_worker: GPUs each actor reserves (0 for CPU steps; fractions share a GPU).
    :param max_restarts: times Ray restarts a crashed actor (then its group is retried on it).
    :param max_task_retries: times Ray retries a group whose actor crashed under it.
    :param start_timeout_s: how long to wait for the actors to start (GPU workers may still be joining).
    :param pod_workers: actors per Ray worker pod on a cluster. 0: every actor runs in the task's own pod (one
        node; the pod is sized for all of them). k > 0: the task is the head of a KubeRay cluster with
        `pods = ceil(workers / k)` worker pods of k actors each (many nodes); the step folder must then be one
        every pod can write (`MMCURATE_RESUME_ROOT` on a filesystem shared by the pods). Locally the same
        config runs its `workers` actors on the local Ray.
    """

    workers: int = 1
    group_size: int = 4
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_restarts: int = 2
    max_task_retries: int = 2
    start_timeout_s: float = 600.0
    pod_workers: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, {"workers": (1, None), "group_size": (1, None), "cpus_per_worker": (0, None),
                            "gpus_per_worker": (0, None), "max_restarts": (0, None), "max_task_retries": (0, None),
                            "start_timeout_s": (0, None), "pod_workers": (0, None)})

    @property
    def pods(self) -> int:
        """Ray worker pods on a cluster (0: the actors run in the task's own pod)."""
        return math.ceil(self.workers / self.pod_workers) if self.pod_workers else 0

    @property
    def threads(self) -> int:
        """Torch/OpenMP threads per actor: its CPUs, at least 1."""
        return max(1, int(self.cpus_per_worker))


@register_preset(FanOut, "tiny", default=True)
def tiny_fanout() -> FanOut:
    """Demo and tests: in-process, no Ray start-up (~4 s) for a few hundred samples."""
    return FanOut(workers=1, group_size=4)


@register_preset(FanOut, "local")
def local_fanout() -> FanOut:
    """`pyflyte run` on a workstation: one actor per core of a 2-core machine (raise `workers` with the cores)."""
    return FanOut(workers=2, group_size=2, cpus_per_worker=1.0)


@register_preset(FanOut, "gpu_node")
def gpu_node_fanout() -> FanOut:
    """A GPU step on one 8-GPU node (p5 / HyperPod): one actor per GPU, 8 CPUs each for decode and tokenizing;
    raise `workers` to 8 x nodes on a bigger Ray cluster. Groups of 4 shards (4,000 samples at ingest's 1,000
    per shard) keep a 12M run at ~3,000 groups: balanced, and a lost actor redoes at most one group."""
    return FanOut(workers=8, group_size=4, cpus_per_worker=8.0, gpus_per_worker=1.0)


@register_preset(FanOut, "cpu_node")
def cpu_node_fanout() -> FanOut:
    """A CPU step (ingest, export) on one 32-core node: 32 one-core actors."""
    return FanOut(workers=32, group_size=4, cpus_per_worker=1.0)


@register_preset(FanOut, "gpu_cluster")
def gpu_cluster_fanout() -> FanOut:
    """A GPU step over the whole 32-node x 8-GPU cluster: 256 one-GPU actors, 8 per worker pod (one node each,
    8 CPUs per actor). Groups of 2 shards: 2,400 shards of a 12M run make 1,200 groups, ~5 per actor, so the
    last groups to finish are short; a lost node redoes at most its 8 groups in flight."""
    return FanOut(workers=256, group_size=2, cpus_per_worker=8.0, gpus_per_worker=1.0, pod_workers=8)


@register_preset(FanOut, "cpu_cluster")
def cpu_cluster_fanout() -> FanOut:
    """A CPU step (partitioned ingest, export) over 32 CPU pods of 30 one-core actors each (960 actors)."""
    return FanOut(workers=960, group_size=1, cpus_per_worker=1.0, pod_workers=30)


@dataclass(frozen=True)
class StepSpec:
    """A step as picklable data: its `ShardStep` subclass (pickled by reference: the actors import it) and the
    arguments of its constructor. `on_mismatch` (None: the step's own) is set on every copy of the step."""

    cls: type
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    on_mismatch: str | None = None

    def build(self) -> ShardStep:
        if not (isinstance(self.cls, type) and issubclass(self.cls, ShardStep)):
            raise TypeError(f"StepSpec.cls must be a ShardStep subclass, got {self.cls!r}")
        step = self.cls(*self.args, **dict(self.kwargs))
        if self.on_mismatch is not None:
            step.on_mismatch = self.on_mismatch
        return step


class FanOutIncomplete(RuntimeError):
    """Some units were not finished (their group raised, or its actor died more often than Ray retries); the
    finished ones are published, so a re-run resumes with the rest."""

    def __init__(self, step: str, unfinished: list[str], errors: list[str], summary: StepSummary):
        super().__init__(f"{step}: {len(unfinished)} unit(s) not finished, re-run to resume: {unfinished[:20]}; "
                         f"errors: {errors[:3]}")
        self.unfinished, self.errors, self.summary = unfinished, errors, summary


def groups_of(items: Sequence[str], size: int) -> list[list[str]]:
    """`items` in order, cut into lists of `size` (the last may be shorter)."""
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def run_fanout(spec: StepSpec, urls: Sequence[str], fan: FanOut) -> StepSummary:
    """`run_sharded` with the fields of a `FanOut` config."""
    return run_sharded(spec, urls, **asdict(fan))


def run_sharded(
    spec: StepSpec,
    urls: Sequence[str],
    workers: int = 1,
    group_size: int = 4,
    *,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    max_restarts: int = 2,
    max_task_retries: int = 2,
    start_timeout_s: float = 600.0,
    pod_workers: int = 0,
) -> StepSummary:
    """Run the step of `spec` over the units `urls` (see the module doc): in this process with `workers == 1`,
    else on a pool of `workers` Ray actors, `group_size` units per task. Returns the merged `StepSummary`
    (`results` per unit as `process` returned them; `missing` from the driver's reduce).

    Raises `FolderBusy` when another writer holds the step folder, `StepMismatch` when it was made with another
    config or code, `FanOutIncomplete` when units failed (the finished ones stay published)."""
    fan = FanOut(workers, group_size, cpus_per_worker, gpus_per_worker, max_restarts, max_task_retries,
                 start_timeout_s, pod_workers)  # pod_workers shaped the cluster the task runs on; Ray places the actors
    step = spec.build()
    if fan.workers == 1:
        return step.run(urls)
    with step.writing():
        return _run_pool(step, spec, list(urls), fan)


def _run_pool(step: ShardStep, spec: StepSpec, urls: list[str], fan: FanOut) -> StepSummary:
    t0 = time.perf_counter()
    todo, finished = step.pending(urls)  # checks the stamp; refuses two URLs with one unit name
    summary = StepSummary(step.name, n_units=len(urls), skipped=[u.name for u in finished])
    errors: list[str] = []
    if todo:
        groups = groups_of([u.url for u in todo], fan.group_size)
        log.info("%s: %d units (%d done already) in %d groups over %d actors", step.name, len(urls),
                 len(finished), len(groups), min(fan.workers, len(groups)))
        for part in _pool_map(spec, groups, fan, errors, while_starting=step.prepare_reduce):
            _merge(summary, part)
            for name in part.done:  # the actors' units, announced in this process: a task's step folder on an
                step.unit_published(name)  # object store pushes them now (tasks/paths.py StepFolder), not at close
    done_now = {u.name for u in todo if step.is_done(u.name)}  # the disk decides, not the messages
    unfinished = [u.name for u in todo if u.name not in done_now]
    if unfinished:
        summary.seconds = time.perf_counter() - t0
        raise FanOutIncomplete(step.name, unfinished, errors, summary)
    t_pool = time.perf_counter()
    for unit in step.units(urls):  # every unit is finished now: steps that aggregate over all units see them
        step.visit_finished(unit)
    summary.missing = step.finish(len(urls))
    summary.seconds = time.perf_counter() - t0
    log.info("%s: pool %.1fs (from the driver's first look at the units), reduce %.1fs", step.name, t_pool - t0,
             summary.seconds - (t_pool - t0), extra={"pool_s": t_pool - t0, "reduce_s": summary.seconds - (t_pool - t0)})
    return summary


def _merge(into: StepSummary, part: StepSummary) -> None:
    into.done.extend(part.done)
    into.skipped.extend(part.skipped)  # units a retried group found published by its crashed first attempt
    for k, v in part.counts.items():
        into.counts[k] = into.counts.get(k, 0) + v
    for k, v in part.reasons.items():
        into.reasons[k] = into.reasons.get(k, 0) + v
    into.results.update(part.results)


def limit_threads(n: int) -> None:
    """Pin torch and OpenMP/BLAS to `n` threads in this process (an actor: one per reserved CPU). torch reads
    OMP_NUM_THREADS when imported, so a step that imports it later gets `n` too (no torch import here: steps
    without torch start faster)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


class GroupWorker:
    """A Ray actor: builds the step once, then processes groups of units (`ShardStep.process_units`)."""

    def __init__(self, spec: StepSpec, threads: int):
        limit_threads(threads)
        self.step = spec.build()

    def ready(self) -> int:
        return os.getpid()

    def run_group(self, urls: list[str]) -> StepSummary:
        return self.step.process_units(urls)


def _ray_init(fan: FanOut) -> bool:
    """Start a local Ray sized for the pool unless one is running or a cluster is named; True when started."""
    import ray

    if ray.is_initialized():  # a flytekitplugins-ray task (KubeRay) or the caller already connected
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=max(1, math.ceil(fan.workers * fan.cpus_per_worker)), include_dashboard=False,
                 log_to_driver=False)
    return True


QUEUE_DEPTH = 2  # groups queued on each actor: it starts the next one as it ends one, without a driver round trip


def _pool_map(spec: StepSpec, groups: list[list[str]], fan: FanOut, errors: list[str],
              while_starting: Callable[[], None] | None = None):
    """Yield each group's `StepSummary` as it finishes; errors (a group that raised, an actor that died for
    good) are appended to `errors`. `while_starting` runs on the driver once the actors are asked for, before
    waiting for them (the reduce's loading overlaps their start-up; if it raises, the actors are killed)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    owns = _ray_init(fan)
    try:
        n = min(fan.workers, len(groups))
        res = ray.cluster_resources()
        need_cpu, need_gpu = n * fan.cpus_per_worker, n * fan.gpus_per_worker
        if need_gpu > res.get("GPU", 0.0) or need_cpu > res.get("CPU", 0.0):
            log.warning("fan-out: %d actors need %.1f CPUs and %.1f GPUs, the cluster has %.1f and %.1f now; "
                        "waiting up to %.0fs for workers to join", n, need_cpu, need_gpu, res.get("CPU", 0.0),
                        res.get("GPU", 0.0), fan.start_timeout_s)
        spec_ref = ray.put(spec)  # one copy in the object store, however many actors (prev may hold 12M ids)
        cls = ray.remote(num_cpus=fan.cpus_per_worker, num_gpus=fan.gpus_per_worker, max_restarts=fan.max_restarts,
                         max_task_retries=fan.max_task_retries)(GroupWorker)
        actors = [cls.remote(spec_ref, fan.threads) for _ in range(n)]
        try:
            t0 = time.perf_counter()
            if while_starting is not None:
                while_starting()
                log.info("fan-out: the driver's reduce loaded in %.1fs while the actors start",
                         time.perf_counter() - t0, extra={"prepare_reduce_s": time.perf_counter() - t0})
            deadline = t0 + fan.start_timeout_s
            starting = {a.ready.remote(): a for a in actors}  # an actor gets groups once it has started
            started: set = set()
            todo = deque((g, False) for g in groups)  # (group, lost once with a dead actor already)
            running: dict[Any, tuple] = {}  # group's result ref -> (its actor, the group, lost once)
            dead: set = set()

            def feed(actor) -> None:  # the actor's next group, queued behind the one it runs
                if todo and actor in started and actor not in dead:
                    g, lost = todo.popleft()
                    running[actor.run_group.remote(g)] = (actor, g, lost)

            while running or (todo and starting):
                # an actor that has started works at once: the others (a GPU node still joining) do not hold it
                timeout = None if running else max(0.0, deadline - time.perf_counter())
                done, _ = ray.wait([*running, *starting], num_returns=1, timeout=timeout)
                if not done:  # nothing running and no actor started in time
                    if not started:
                        raise RuntimeError(f"no fan-out actor started within {fan.start_timeout_s}s: each needs "
                                           f"{fan.cpus_per_worker} CPU and {fan.gpus_per_worker} GPU; cluster has "
                                           f"{ray.cluster_resources()}")
                    errors.append(f"no live actor: the started ones are lost, {len(starting)} did not start "
                                  f"within {fan.start_timeout_s}s")
                    break
                (ref,) = done
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except (RayActorError, RayTaskError) as e:  # its constructor raised, or its process died
                        dead.add(actor)
                        log.error("fan-out: an actor failed to start: %s", str(e)[:2000])
                        errors.append(f"{type(e).__name__}: {str(e)[:300]}")
                        continue
                    started.add(actor)
                    if not starting:
                        log.info("fan-out: %d/%d actors started in %.1fs", len(started), n, time.perf_counter() - t0,
                                 extra={"actors_ready_s": time.perf_counter() - t0})
                    for _ in range(QUEUE_DEPTH):  # it starts the next group as it ends one
                        feed(actor)
                    continue
                actor, group, lost = running.pop(ref)
                try:
                    part = ray.get(ref)
                except RayActorError as e:  # dead for good (after Ray's restarts), with the groups queued on it
                    dead.add(actor)
                    if not lost and len(dead) < len(actors):  # once more, on another actor: it skips the units
                        log.warning("fan-out: an actor is lost, its group goes to another one: %s", str(e)[:500])
                        todo.appendleft((group, True))  # the lost group published (a killer group stops there)
                        for a in started:
                            if a not in dead and sum(x[0] is a for x in running.values()) < QUEUE_DEPTH:
                                feed(a)
                        continue
                    log.error("fan-out: an actor is lost: %s", str(e)[:2000])
                    errors.append(f"{type(e).__name__}: {str(e)[:300]}")
                    continue
                except RayTaskError as e:  # a group that raised (after Ray's retries): the step's own exception
                    cause = getattr(e, "cause", None) or e
                    log.error("fan-out: a group failed: %s", str(e)[:2000])
                    errors.append(f"{type(cause).__name__}: {str(cause)[:300]}")
                    feed(actor)
                    continue
                feed(actor)  # before the caller merges this result: the actor never waits on the driver
                yield part
        finally:
            for a in actors:
                ray.kill(a)
    finally:
        if owns:
            ray.shutdown()
