"""Serialization: every workflow and launch plan of the `workflows` package ends up in the Flyte package.

Runs `pyflyte --pkgs workflows package` and `pyflyte register --dry-run --copy none` offline (no cluster, no
Docker), then compares the package's contents with the workflows and launch plans found by importing every
module under workflows/ — so workflows added later are covered without touching this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYFLYTE = str(Path(sys.executable).with_name("pyflyte"))
IMAGES = {
    "cpu": "reg.test/mmcurate-cpu:t1",
    "gpu": "reg.test/mmcurate-gpu:t1",
    "vllm": "reg.test/mmcurate-vllm:t1",
    "train": "reg.test/mmcurate-train:t1",
}
IMAGE_ARGS = ["--image", IMAGES["cpu"]] + [a for role, ref in IMAGES.items() for a in ("--image", f"{role}={ref}")]

# Imports every module of a package (in a fresh interpreter, so two `workflows` packages never collide) and
# prints the names of the workflows, launch plans and tasks it defines at module level, plus each task's
# image placeholder role.
DISCOVER = textwrap.dedent(
    """
    import importlib, json, pkgutil, re, sys
    from flytekit import LaunchPlan
    from flytekit.core.base_task import PythonTask
    from flytekit.core.reference_entity import ReferenceEntity
    from flytekit.core.workflow import WorkflowBase

    pkg = importlib.import_module(sys.argv[1])
    found = {"workflows": set(), "launch_plans": set(), "task_roles": {}}
    modules = [pkg] + [importlib.import_module(m.name)
                       for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    for module in modules:
        for obj in list(vars(module).values()):
            if isinstance(obj, ReferenceEntity):
                continue
            if isinstance(obj, WorkflowBase):
                found["workflows"].add(obj.name)
                found["launch_plans"].add(obj.name)  # every workflow gets a default launch plan
            elif isinstance(obj, LaunchPlan):
                found["launch_plans"].add(obj.name)
            elif isinstance(obj, PythonTask):
                image = getattr(obj, "container_image", None)
                role = re.search(r"\\.image\\.(\\w+)\\.fqn", image) if isinstance(image, str) else None
                found["task_roles"][obj.name] = role.group(1) if role else "default"
    print(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in found.items()}))
    """
)


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root)}


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def discover(root: Path, package: str = "workflows") -> dict:
    """Workflows, launch plans and task image roles defined in `package` under `root`."""
    out = _run([sys.executable, "-c", DISCOVER, package], cwd=root).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_package(tgz: Path) -> dict:
    """Names in a `pyflyte package` archive: tasks (with images), workflows, launch plans (with schedules)."""
    from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2

    content = {"tasks": {}, "workflows": set(), "launch_plans": {}}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else None
            if data is None or not member.name.endswith(".pb"):
                continue
            kind = member.name.rsplit("_", 1)[-1]  # <n>_<name>_<1 task | 2 workflow | 3 launch plan>.pb
            if kind == "1.pb":
                spec = task_pb2.TaskSpec.FromString(data)
                content["tasks"][spec.template.id.name] = spec.template.container.image
            elif kind == "2.pb":
                content["workflows"].add(workflow_pb2.WorkflowSpec.FromString(data).template.id.name)
            elif kind == "3.pb":
                plan = launch_plan_pb2.LaunchPlan.FromString(data)
                content["launch_plans"][plan.id.name] = plan.spec.entity_metadata.schedule
    return content


def package(root: Path, out: Path, pkg: str = "workflows") -> dict:
    _run([PYFLYTE, "--pkgs", pkg, "package", *IMAGE_ARGS, "--force", "--output", str(out)], cwd=root)
    return read_package(out)


@pytest.fixture(scope="module")
def repo_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "flyte-package.tgz"
    return discover(ROOT), package(ROOT, out)


def test_package_holds_every_workflow_and_launch_plan(repo_package):
    found, content = repo_package
    assert found["workflows"], "no workflow found under workflows/"
    missing_wf = set(found["workflows"]) - content["workflows"]
    missing_lp = set(found["launch_plans"]) - set(content["launch_plans"])
    assert not missing_wf and not missing_lp, f"not packaged: workflows {missing_wf}, launch plans {missing_lp}"


def test_package_binds_every_task_to_its_image(repo_package):
    found, content = repo_package
    assert content["tasks"]
    for name, image in content["tasks"].items():
        assert "{{" not in image, f"{name}: unbound image placeholder {image}"
        assert image in IMAGES.values(), f"{name}: unexpected image {image}"
        role = found["task_roles"].get(name)
        if role is not None:  # tasks defined at module level: the placeholder's role decides the image
            assert image == IMAGES["cpu" if role == "default" else role], f"{name} ({role}) got {image}"


def test_register_dry_run_offline(tmp_path):
    proc = _run(
        [
            PYFLYTE,
            "--config",
            str(ROOT / "flyte.config"),
            "register",
            "--dry-run",
            "--copy",
            "none",
            "--version",
            "test-version",
            *IMAGE_ARGS,
            "workflows",
        ],
        cwd=ROOT,
    )
    assert "Dry run" in proc.stdout
    found = discover(ROOT)
    for name in found["workflows"]:
        assert f"Workflow: {name} " in proc.stdout
    for name in found["launch_plans"]:
        assert f"Launch Plan: {name} " in proc.stdout


def test_discovery_and_package_cover_launch_plans_and_schedules(tmp_path):
    """A throwaway workflows package with a named, scheduled launch plan: found, packaged, schedule kept."""
    pkg = tmp_path / "tinyflows"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.py").write_text(
        textwrap.dedent(
            """
            from flytekit import CronSchedule, LaunchPlan, task, workflow

            GPU = "{{.image.gpu.fqn}}:{{.image.gpu.version}}"

            @task(container_image=GPU)
            def double(x: int) -> int:
                return 2 * x

            @workflow
            def tiny(x: int = 1) -> int:
                return double(x=x)

            nightly_tiny = LaunchPlan.get_or_create(
                workflow=tiny, name="nightly_tiny", fixed_inputs={"x": 3},
                schedule=CronSchedule(schedule="0 3 * * *"),
            )
            """
        )
    )
    found = discover(tmp_path, "tinyflows")
    assert found["workflows"] == ["tinyflows.tiny.tiny"]
    assert set(found["launch_plans"]) == {"tinyflows.tiny.tiny", "nightly_tiny"}
    content = package(tmp_path, tmp_path / "p.tgz", "tinyflows")
    assert set(found["launch_plans"]) <= set(content["launch_plans"])
    assert content["launch_plans"]["nightly_tiny"].cron_schedule.schedule == "0 3 * * *"
    assert content["tasks"] == {"tinyflows.tiny.double": IMAGES["gpu"]}


def test_make_package_honours_package_out(tmp_path):
    out = tmp_path / "sub" / "custom.tgz"
    out.parent.mkdir()
    # -o setup: use the interpreter running the tests instead of (re)building .venv
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(
        ["make", "-o", "setup", "package", f"VENV={venv}", f"PACKAGE_OUT={out}", "REGISTRY=reg.test/x", "VERSION=v9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    content = read_package(out)
    assert content["workflows"] and not (ROOT / "custom.tgz").exists()
    assert set(content["tasks"].values()) <= {f"reg.test/x/mmcurate-{r}:v9" for r in IMAGES}


def test_make_help_lists_the_targets():
    proc = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for target in ("setup", "test", "demo", "lint", "package", "register"):
        assert f"make {target} " in proc.stdout, f"`make help` does not list {target}"


def test_make_register_refuses_a_dirty_tree():
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(
        ["make", "-o", "setup", "register", f"VENV={venv}", "GIT_DIRTY=-dirty", "VERSION=abc1234"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "uncommitted changes" in proc.stderr and "pyflyte" not in proc.stdout
