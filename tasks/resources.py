"""Resource profiles applied to task nodes: the one rule of core/runs/steps.py (`profile`) turned into the
`.with_overrides(...)` arguments of a node, used by the `@dynamic` workflows.

A task's decorator states its production (GPU) profile, so a task called on its own on a cluster gets what
production needs; a workflow that knows the run's configs overrides each node with `overrides(kind, config,
run_gpu)`: the tiny presets then request two CPUs, no GPU, on the same image. There are no CPU twin tasks: which
profile a node gets is decided by the run's configs at run time (an input), never by the machine that serializes
the package, and a compiled run states every node's requests (the package test reads them).
"""

from __future__ import annotations

from typing import Any

from flytekit import Resources

from core.runs.steps import TINY, Profile, profile
from tasks.images import CPU_IMAGE, GPU_IMAGE, TRAIN_IMAGE, VLLM_IMAGE

IMAGES = {"cpu": CPU_IMAGE, "gpu": GPU_IMAGE, "vllm": VLLM_IMAGE, "train": TRAIN_IMAGE}
# What a tiny preset's step requests (kept for tasks whose decorator is the tiny profile).
TINY_REQUESTS = Resources(cpu=TINY.cpu, mem=TINY.mem)


def resources(p: Profile) -> Resources:
    """The requests (= limits) of a profile; a CPU profile states `gpu=0` so it never inherits a GPU."""
    return Resources(cpu=p.cpu, mem=p.mem, gpu=str(p.gpu))


def overrides(kind: str, config: Any, run_gpu: bool, **extra: Any) -> dict:
    """`.with_overrides(**overrides(...))` arguments for a node of task kind `kind` (core/runs/steps.py
    GPU_PROFILES) on a run: requests and limits from the profile, its image; `extra` passes through (name...)."""
    p = profile(kind, config, run_gpu)
    r = resources(p)
    return dict(requests=r, limits=r, container_image=IMAGES[p.image], **extra)


def ray_cluster(kind: str, config: Any, run_gpu: bool) -> Any:
    """The KubeRay cluster of a fan-out task node (tasks whose decorator has a `RayJobConfig`): the head is the
    task's pod (its requests are the node's `overrides`, so no head requests here); with
    `config.fanout.pod_workers > 0` one worker group of `fanout.pods` pods, each sized for `pod_workers` actors
    (core/runs/steps.py `worker_pods`); otherwise no worker pods (the actors run in the head's pod, which the
    profile sized for all of them). Depends only on the config, never on this machine."""
    from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

    from core.runs.steps import worker_pods

    pods = worker_pods(kind, config, run_gpu)
    groups = []
    if pods is not None:
        n, p = pods
        r = resources(p)
        groups = [WorkerNodeConfig(group_name=f"{kind}-workers", replicas=n, requests=r, limits=r)]
    return RayJobConfig(worker_node_config=groups, head_node_config=HeadNodeConfig(),
                        shutdown_after_job_finishes=True, ttl_seconds_after_finished=600)


def ray_node(task: Any, node_overrides: dict, **inputs: Any) -> Any:
    """A node of a Ray task inside a workflow, with `node_overrides` (its `task_config` included). The node runs a
    shallow copy of the task: flytekit's `with_overrides(task_config=...)` sets the config on the node's task
    object, and on the shared task it would leak into every later node and serialization."""
    import copy

    return copy.copy(task)(**inputs).with_overrides(**node_overrides)


def fanout_node(task: Any, kind: str, config: Any, run_gpu: bool, **inputs: Any) -> Any:
    """A node of a fan-out task (a Ray task) for one step config: the profile's requests and image on the head
    pod, and the Ray cluster `ray_cluster` shapes (`ray_node`)."""
    return ray_node(task, overrides(kind, config, run_gpu, task_config=ray_cluster(kind, config, run_gpu)),
                    config=config, **inputs)
