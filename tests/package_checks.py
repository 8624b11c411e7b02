"""Checks on a serialized Flyte package (`pyflyte package` .tgz), on the protobufs themselves (flyteidl).

`read_entities` parses every .pb; `package_problems` returns what a Flyte cluster would reject or what
would run differently than meant: launch plans whose workflow_id is not a WORKFLOW of the package, task or
sub-workflow references missing from it, unbound image placeholders, map tasks without a concurrency cap.
`task_gpus` / `reachable_tasks` answer the resource questions (GPU requests, what a launch plan can run).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2
from flyteidl.core import identifier_pb2
from google.protobuf.json_format import MessageToDict

GPU_KEYS = ("nvidia.com/gpu", "gpu")
# the image of each role a package binds (`make package` passes the same flags with real references)
IMAGES = {
    "cpu": "reg.test/mmcurate-cpu:t1",
    "gpu": "reg.test/mmcurate-gpu:t1",
    "vllm": "reg.test/mmcurate-vllm:t1",
    "train": "reg.test/mmcurate-train:t1",
}
IMAGE_ARGS = ["--image", IMAGES["cpu"]] + [a for role, ref in IMAGES.items() for a in ("--image", f"{role}={ref}")]


def build_package(root: Path, out: Path, pkg: str = "workflows", timeout: int = 300) -> Path:
    """`pyflyte --pkgs <pkg> package` of `root` into `out` (offline, images bound), in a fresh interpreter."""
    import os
    import subprocess
    import sys

    pyflyte = str(Path(sys.executable).with_name("pyflyte"))
    cmd = [pyflyte, "--pkgs", pkg, "package", *IMAGE_ARGS, "--force", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


@dataclass
class Entities:
    tasks: dict = field(default_factory=dict)  # name -> TaskTemplate
    workflows: dict = field(default_factory=dict)  # name -> WorkflowSpec
    launch_plans: dict = field(default_factory=dict)  # name -> LaunchPlan


def read_entities(tgz: Path) -> Entities:
    """Every task, workflow and launch plan of a package, keyed by name (<n>_<name>_<1|2|3>.pb)."""
    out = Entities()
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.endswith(".pb")):
                continue
            data = tar.extractfile(member).read()
            kind = member.name.rsplit("_", 1)[-1]
            if kind == "1.pb":
                tmpl = task_pb2.TaskSpec.FromString(data).template
                out.tasks[tmpl.id.name] = tmpl
            elif kind == "2.pb":
                spec = workflow_pb2.WorkflowSpec.FromString(data)
                out.workflows[spec.template.id.name] = spec
            elif kind == "3.pb":
                plan = launch_plan_pb2.LaunchPlan.FromString(data)
                out.launch_plans[plan.id.name] = plan
    return out


def _nodes(nodes):
    """Every node, descending into branches and array nodes."""
    for n in nodes:
        yield n
        target = n.WhichOneof("target")
        if target == "branch_node":
            ie = n.branch_node.if_else
            yield from _nodes([ie.case.then_node] + [c.then_node for c in ie.other] +
                              ([ie.else_node] if ie.HasField("else_node") else []))
        elif target == "array_node":
            yield from _nodes([n.array_node.node])


def _workflow_templates(spec) -> list:
    return [spec.template, *spec.sub_workflows]


def task_gpus(tmpl) -> int:
    """GPUs a task requests: its container's requests, or its pods' (Ray workers, pod templates)."""
    gpus = 0
    for r in tmpl.container.resources.requests:
        if r.name == 2:  # core.Resources.ResourceName.GPU
            gpus = max(gpus, int(r.value))
    return max(gpus, _custom_gpus(tmpl))


def node_gpus(node, tasks: dict) -> int:
    """GPUs a compiled node requests: its `task_node.overrides.resources` GPU request when the workflow set one
    (`.with_overrides`, the resource profiles), else the task template's (`task_gpus`); array nodes by their
    sub-node. `tasks`: task templates by name (a DynamicJobSpec's `tasks`, or `Entities.tasks`)."""
    if node.WhichOneof("target") == "array_node":
        return node_gpus(node.array_node.node, tasks)
    if node.WhichOneof("target") != "task_node":
        return 0
    for r in node.task_node.overrides.resources.requests:
        if r.name == 2:  # GPU
            return int(r.value)
    tmpl = tasks.get(node.task_node.reference_id.name)
    return task_gpus(tmpl) if tmpl is not None else 0


def spec_gpus(spec) -> dict:
    """{task name: GPUs} of every task node of a compiled DynamicJobSpec, overrides applied (the Ray worker GPUs
    of a task's custom config included)."""
    tasks = {t.id.name: t for t in spec.tasks}
    out: dict = {}
    for n in _nodes(spec.nodes):
        if n.WhichOneof("target") == "task_node":
            name = n.task_node.reference_id.name
            out[name] = max(out.get(name, 0), node_gpus(n, tasks), _custom_gpus(tasks.get(name)))
    return out


def _custom_gpus(tmpl) -> int:
    """GPUs of a task's plugin config only (Ray worker groups, pod templates); the container's requests left out."""
    if tmpl is None or not tmpl.HasField("custom"):
        return 0

    def walk(o) -> int:
        if isinstance(o, dict):
            return max([int(float(v)) if k in GPU_KEYS and isinstance(v, (str, int, float)) else walk(v)
                        for k, v in o.items()], default=0)
        if isinstance(o, list):
            return max([walk(v) for v in o], default=0)
        return 0

    return walk(MessageToDict(tmpl.custom))


def task_image(tmpl) -> str:
    if tmpl.HasField("container"):
        return tmpl.container.image
    if tmpl.HasField("k8s_pod"):
        return str(MessageToDict(tmpl.k8s_pod.pod_spec).get("containers", [{}])[0].get("image", ""))
    return ""


def reachable_tasks(ents: Entities, workflow: str) -> set[str]:
    """Names of the tasks a workflow can run, through its sub-workflows and launch plans (statically)."""
    seen_wf, tasks, todo = set(), set(), [workflow]
    while todo:
        name = todo.pop()
        if name in seen_wf or name not in ents.workflows:
            continue
        seen_wf.add(name)
        for tmpl in _workflow_templates(ents.workflows[name]):
            for n in _nodes(tmpl.nodes):
                t = n.WhichOneof("target")
                if t == "task_node":
                    tasks.add(n.task_node.reference_id.name)
                elif t == "workflow_node":
                    ref = n.workflow_node
                    if ref.HasField("sub_workflow_ref"):
                        todo.append(ref.sub_workflow_ref.name)
                    else:
                        lp = ents.launch_plans.get(ref.launchplan_ref.name)
                        if lp is not None:
                            todo.append(lp.spec.workflow_id.name)
    return tasks


def package_problems(ents: Entities) -> list[str]:
    """What a cluster would reject or run unlike the code says; empty when the package is sound."""
    problems = []
    for name, plan in sorted(ents.launch_plans.items()):
        wid = plan.spec.workflow_id
        if wid.resource_type != identifier_pb2.WORKFLOW:
            kind = identifier_pb2.ResourceType.Name(wid.resource_type)
            problems.append(f"launch plan {name}: workflow_id {wid.name} is a {kind}, not a WORKFLOW")
        elif wid.name not in ents.workflows:
            problems.append(f"launch plan {name}: workflow {wid.name} is not in the package")
    for name, spec in sorted(ents.workflows.items()):
        subs = {s.id.name for s in spec.sub_workflows}
        for tmpl in _workflow_templates(spec):
            for n in _nodes(tmpl.nodes):
                t = n.WhichOneof("target")
                if t == "task_node" and n.task_node.reference_id.name not in ents.tasks:
                    problems.append(f"workflow {name}: node {n.id} runs task {n.task_node.reference_id.name}, "
                                    "not in the package")
                elif t == "workflow_node":
                    ref = n.workflow_node
                    if ref.HasField("sub_workflow_ref"):
                        if ref.sub_workflow_ref.name not in ents.workflows | dict.fromkeys(subs):
                            problems.append(f"workflow {name}: sub-workflow {ref.sub_workflow_ref.name} missing")
                    elif ref.launchplan_ref.name not in ents.launch_plans:
                        problems.append(f"workflow {name}: launch plan {ref.launchplan_ref.name} missing")
                elif t == "array_node" and n.array_node.parallelism <= 0:
                    problems.append(f"workflow {name}: map node {n.id} has no concurrency cap (parallelism)")
    for name, tmpl in sorted(ents.tasks.items()):
        image = task_image(tmpl)
        if tmpl.type in ("python-task", "ray", "pytorch", "container_array", "dynamic") or tmpl.HasField("container"):
            if not image or "{{" in image:
                problems.append(f"task {name}: image not bound ({image!r})")
    return problems
