"""A fan-out over KubeRay worker pods (`FanOut.pod_workers`): the pods' shape, the head's profile, the Ray cluster
of a task node, the refusal of a step folder the pods cannot share, and URL inputs fetched by the actors."""

from __future__ import annotations

from types import SimpleNamespace

import fsspec
import pytest

from core.io.fetch import local_dir
from core.runs.fanout import FanOut, cpu_cluster_fanout, gpu_cluster_fanout, gpu_node_fanout
from core.runs.steps import DRIVER, profile, worker_pods


def test_pods_are_workers_over_pod_workers_rounded_up():
    assert gpu_cluster_fanout().pods == 32
    assert cpu_cluster_fanout().pods == 32
    assert FanOut(workers=17, pod_workers=8).pods == 3
    assert FanOut(workers=8).pods == 0  # every actor in the task's own pod
    with pytest.raises(ValueError):
        FanOut(pod_workers=-1)


def test_one_pod_fanout_sizes_the_task_pod_and_has_no_worker_pods():
    cfg = SimpleNamespace(fanout=gpu_node_fanout(), device="cuda")
    p = profile("perplexity", cfg, run_gpu=True)
    assert (p.cpu, p.mem, p.gpu) == ("66", "256Gi", 8)
    assert worker_pods("perplexity", cfg, run_gpu=True) is None


def test_worker_pod_fanout_makes_the_task_the_driver_and_sizes_each_pod():
    cfg = SimpleNamespace(fanout=gpu_cluster_fanout(), device="cuda")
    head = profile("rephrase", cfg, run_gpu=True)
    assert (head.cpu, head.mem, head.gpu) == (DRIVER.cpu, DRIVER.mem, 0) and head.image == "vllm"
    n, pod = worker_pods("rephrase", cfg, run_gpu=True)
    assert n == 32 and (pod.cpu, pod.mem, pod.gpu, pod.image) == ("66", "256Gi", 8, "vllm")
    # a CPU config keeps its pods GPU-free
    n, pod = worker_pods("export", SimpleNamespace(fanout=cpu_cluster_fanout(), device="cpu"), run_gpu=True)
    assert n == 32 and pod.gpu == 0 and pod.cpu == "32"


def test_ray_cluster_of_a_node_has_the_worker_group():
    from tasks.resources import ray_cluster

    rc = ray_cluster("perplexity", SimpleNamespace(fanout=gpu_cluster_fanout(), device="cuda"), True)
    (g,) = rc.worker_node_config
    assert g.replicas == 32 and g.requests.gpu == "8" and g.requests == g.limits
    assert ray_cluster("perplexity", SimpleNamespace(fanout=FanOut(workers=8), device="cuda"), True).worker_node_config == []


def test_worker_pods_refuse_a_step_folder_only_this_pod_can_write():
    from tasks.paths import check_shared

    sf = SimpleNamespace(step="rephrase", url="s3://bucket/steps/rephrase/k", remote=True)
    with pytest.raises(ValueError, match="filesystem all pods mount"):
        check_shared(sf, gpu_cluster_fanout())
    check_shared(sf, gpu_node_fanout())  # one pod: its local mirror is fine
    check_shared(SimpleNamespace(step="rephrase", url="/fsx/steps/rephrase/k", remote=False), gpu_cluster_fanout())


def test_local_dir_fetches_a_url_folder_once_and_passes_paths_through(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe({"/models/lm/config.json": b"{}", "/models/lm/sub/weights.bin": b"w" * 10})
    got = local_dir("memory://models/lm", cache=str(tmp_path))
    assert open(f"{got}/config.json").read() == "{}" and open(f"{got}/sub/weights.bin", "rb").read() == b"w" * 10
    fs.pipe({"/models/lm/config.json": b"changed"})
    assert local_dir("memory://models/lm", cache=str(tmp_path)) == got  # fetched once per URL
    assert open(f"{got}/config.json").read() == "{}"
    assert local_dir("/a/local/path") == "/a/local/path" and local_dir("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(FileNotFoundError):
        local_dir("memory://models/none", cache=str(tmp_path))
