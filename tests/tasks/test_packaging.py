"""Serialization: every workflow and launch plan of the `workflows` package ends up in the Flyte package.

Runs `pyflyte --pkgs workflows package` and `pyflyte register --dry-run --copy none` offline (no cluster, no
Docker), then compares the package's contents with the workflows and launch plans found by importing every
module under workflows/ — so workflows added later are covered without touching this file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYFLYTE = str(Path(sys.executable).with_name("pyflyte"))
from tests.package_checks import IMAGE_ARGS, IMAGES  # noqa: E402

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
def repo_package(flyte_package):
    return discover(ROOT), read_package(flyte_package)


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


# ---------------------------------------------------------------- what a cluster accepts (protobufs, flyteidl)
from tests.package_checks import (  # noqa: E402
    package_problems,
    reachable_tasks,
    read_entities,
    spec_gpus,
    task_gpus,
)

# Tasks that need a GPU in production (their decorators state it; the tiny presets override it per node).
GPU_TASKS = ["tasks.embed.embed_shards", "tasks.dedup.cluster_embeddings", "tasks.dedup.prune_cluster_group",
             "tasks.perplexity.score_perplexity", "tasks.rephrase.rephrase_samples", "tasks.train.train_mini_llava",
             "tasks.evals.evaluate_checkpoint_benchmarks", "tasks.mixing.train_expert", "tasks.mixing.evaluate_soup",
             "tasks.targeted.generate_targeted_shard"]
# static; curate_demo/standard_ablation, embedding_*, semdedup_* and targeted generation's map (@dynamic bodies
# whose profiles come from their inputs): see the dynamic tests
TINY_PLANS = ["mixing_demo", "targeted_demo", "targeted_ablation_demo"]
GPU_PLANS = ["perplexity_deciles"]


@pytest.fixture(scope="module")
def entities(flyte_package):
    return read_entities(flyte_package)


def test_package_is_what_a_cluster_accepts(entities):
    """Launch plans target WORKFLOWs of the package; every referenced task/sub-workflow is in it; images bound;
    map nodes carry a concurrency cap."""
    assert {"curate_demo", "mammoth_v1_curation", "standard_ablation", "nightly_eval"} <= set(entities.launch_plans)
    assert package_problems(entities) == []
    for name in ("curate_demo", "mammoth_v1_curation"):
        assert entities.launch_plans[name].spec.workflow_id.name == "workflows.curate.curate"
    assert entities.launch_plans["standard_ablation"].spec.workflow_id.name == "workflows.ablate.ablate"


def test_gpu_tasks_request_gpus_and_no_twin_exists(entities):
    """The GPU tasks state their production profile; no `*_cpu` task or workflow is left (profiles, not twins:
    the compiled dynamics of tests/tasks/test_profiles.py and the dynamic tests below prove the tiny plans never
    request a GPU)."""
    for name in GPU_TASKS:
        assert task_gpus(entities.tasks[name]) >= 1, f"{name} requests no GPU"
    twins = [n for n in [*entities.tasks, *entities.workflows] if re.search(r"_cpu(_wf)?$|_cpu_", n)]
    assert twins == [], twins
    assert not (ROOT / "tasks" / "resources.py").read_text().count("def renamed")


def test_tiny_plans_run_no_gpu_task_and_production_plans_do(entities):
    for plan in TINY_PLANS:
        wf = entities.launch_plans[plan].spec.workflow_id.name
        tasks = reachable_tasks(entities, wf)
        assert tasks and all(task_gpus(entities.tasks[t]) == 0 for t in tasks), (plan, tasks)
    for plan in GPU_PLANS:  # static GPU nodes; the dynamic bodies are compiled in test_profiles.py
        tasks = reachable_tasks(entities, entities.launch_plans[plan].spec.workflow_id.name)
        assert any(task_gpus(entities.tasks[t]) for t in tasks), (plan, tasks)
    assert entities.launch_plans["mixing_demo"].spec.workflow_id.name == "workflows.mixing.mixing_search"
    assert (entities.launch_plans["targeted_ablation_demo"].spec.workflow_id.name
            == "workflows.targeted.targeted_ablation")


def test_schedules_serialized_but_registered_inactive(entities):
    assert entities.launch_plans["nightly_eval"].spec.entity_metadata.schedule.cron_schedule.schedule == "0 3 * * *"
    makefile = (ROOT / "Makefile").read_text()
    assert "--activate-launchplans" not in makefile
    venv = Path(sys.executable).parent.parent
    cmd = ["make", "-o", "setup", "activate", f"VENV={venv}", "VERSION=abc1234", "ACTIVATE_ARGS=--dry-run"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCURATE_NIGHTLY")}
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "placeholder" in refused.stderr
    env |= {"MMCURATE_NIGHTLY_PREFIX": "s3://team/ckpts/", "MMCURATE_NIGHTLY_CACHE": "s3://team/eval-cache/"}
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "launchplan --project flytesnacks --domain development --activate nightly_eval abc1234" in ok.stdout


def test_checker_rejects_a_launch_plan_on_a_dynamic(tmp_path):
    """The failure the checker exists for: a LaunchPlan built on a @dynamic serializes as a TASK target."""
    pkg = tmp_path / "badflows"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(
        textwrap.dedent(
            """
            from flytekit import LaunchPlan, dynamic, task

            @task
            def double(x: int) -> int:
                return 2 * x

            @dynamic
            def fan(x: int = 1) -> int:
                return double(x=x)

            fan_plan = LaunchPlan.get_or_create(fan, name="fan_plan")
            """
        )
    )
    out = tmp_path / "bad.tgz"
    _run([PYFLYTE, "--pkgs", "badflows", "package", *IMAGE_ARGS, "--force", "--output", str(out)], cwd=tmp_path)
    problems = package_problems(read_entities(out))
    assert problems == ["launch plan fan_plan: workflow_id badflows.bad.fan is a TASK, not a WORKFLOW"]


# ---------------------------------------------------------------- the dynamic parts, compiled as propeller would
def compile_dynamic(dyn, **inputs):
    """The DynamicJobSpec (flyteidl) a @dynamic returns at run time for `inputs` (defaults filled in)."""
    from flytekit.configuration import Image, ImageConfig, SerializationSettings
    from flytekit.core.context_manager import ExecutionState, FlyteContextManager

    images = {r: Image(name=r, fqn=ref.split(":")[0], tag=ref.split(":")[1]) for r, ref in IMAGES.items()}
    settings = SerializationSettings(image_config=ImageConfig(default_image=images["cpu"], images=list(images.values())),
                                     project="p", domain="d", version="v")
    kw = {k: d for k, (_, d) in dyn.python_interface.inputs_with_defaults.items()} | inputs
    ctx = FlyteContextManager.current_context().with_serialization_settings(settings)
    cached, dyn._wf = dyn._wf, None  # flytekit compiles a dynamic once per process (one pod, one run)
    try:
        with FlyteContextManager.with_context(ctx) as ctx:
            state = ctx.execution_state.with_params(mode=ExecutionState.Mode.TASK_EXECUTION)
            with FlyteContextManager.with_context(ctx.with_execution_state(state)) as ctx:
                return dyn.compile_into_workflow(ctx, dyn._task_function, **kw).to_flyte_idl()
    finally:
        dyn._wf = cached


def _dynamic_gpus(spec) -> dict:
    return {t.id.name: task_gpus(t) for t in spec.tasks}


def test_curate_tiny_preset_runs_no_gpu_task_production_does():
    """The compiled `curate_steps` of the demo preset requests no GPU on any node (overrides and Ray workers
    included); the production preset's requests GPUs on the GPU steps, by the one profile rule."""
    from core.foundation.configs import override
    from core.runs.steps import profile
    from workflows.curate import curate_demo, curate_steps, mammoth_v1_curation

    paths = dict(source="s.json", image_root="img", eval_cache="ec")
    on = dict(decontam=True, rephrase=True)
    demo_cfg = override(curate_demo.saved_inputs["config"], **on)
    demo = compile_dynamic(curate_steps, config=demo_cfg, **paths)
    gpus = spec_gpus(demo)
    assert demo.tasks and not any(gpus.values()), gpus
    assert not demo.subworkflows  # the launchers create the nodes inline: no twin sub-workflows
    assert not any(t.id.name.endswith("_cpu") for t in demo.tasks)
    prod_cfg = override(mammoth_v1_curation.saved_inputs["config"], **on)
    prod = compile_dynamic(curate_steps, config=prod_cfg, **paths)
    gpus = spec_gpus(prod)
    assert prod_cfg.embed_config.num_gpus >= 1 and prod_cfg.embed_config.model_name.endswith("SigLIP2-378")
    for name in ("tasks.embed.embed_shards", "tasks.dedup.cluster_embeddings", "tasks.perplexity.score_perplexity"):
        assert gpus[name] >= 1, gpus
    assert gpus["tasks.rephrase.rephrase_samples"] == 0  # the production preset's rephrase config says device cpu
    tasks = {t.id.name: t for t in prod.tasks}
    score = next(n for n in prod.nodes if n.WhichOneof("target") == "task_node"
                 and n.task_node.reference_id.name == "tasks.perplexity.score_perplexity")
    req = {r.name: r.value for r in score.task_node.overrides.resources.requests}
    want = profile("perplexity", prod_cfg.perplexity_config, run_gpu=True)  # the head: the fan-out's driver
    assert req == {1: want.cpu, 2: str(want.gpu), 3: want.mem} and want.gpu == 0, req  # docs/scale.md assumes it
    assert gpus["tasks.perplexity.score_perplexity"] == 8  # each of its Ray worker pods holds 8 GPUs
    assert tasks["tasks.perplexity.score_perplexity"].container.image  # bound


def test_curate_runs_the_step_table_in_order():
    """`curate_steps` holds no step-specific wiring: its nodes follow the table's order for any switch set."""
    from core.foundation.configs import override
    from core.runs.steps import active_steps
    from workflows.curate import curate_demo, curate_steps

    for on in ({}, {"decontam": True, "rephrase": True, "image_filter": True}, {"semdedup": False, "perplexity": False}):
        cfg = override(curate_demo.saved_inputs["config"], **on)
        spec = compile_dynamic(curate_steps, config=cfg, source="s.json", image_root="img", eval_cache="ec")
        order = []
        for n in spec.nodes:
            name = n.task_node.reference_id.name if n.WhichOneof("target") == "task_node" else n.id
            for step, task in (("ingest", "ingest_dataset"), ("image_filter", "filter_samples"), ("embed", "embed_shards"), ("decontam", "dedup.decontam"),
                               ("semdedup", "decide_semdedup"), ("perplexity", "score_perplexity"),
                               ("ppl_filter", "slice_by_perplexity"), ("rephrase", "rephrase_samples"),
                               ("export", "export_dataset")):
                if name.endswith(task) and step not in order:
                    order.append(step)
        assert order == [s.name for s in active_steps(cfg)], (on, order)


def test_ablate_tiny_preset_runs_no_gpu_task_production_does():
    from core.foundation.configs import override
    from workflows.ablate import ablate_steps, standard_ablation

    on = dict(source="s.json", image_root="img", eval_cache="ec", variants=["baseline", "semdedup@0.1", "ppl@0-90"])
    tiny_cfg = standard_ablation.saved_inputs["config"]
    assert tiny_cfg.embed_config.num_gpus == 0 and tiny_cfg.train_config.epochs == 2
    tiny = compile_dynamic(ablate_steps, **(standard_ablation.saved_inputs | on))
    assert not any(spec_gpus(tiny).values()), spec_gpus(tiny)
    prod = spec_gpus(compile_dynamic(ablate_steps, config=override(tiny_cfg, embed_config="siglip2"), **on))
    for name in ("tasks.embed.embed_shards", "tasks.perplexity.score_perplexity", "tasks.train.train_mini_llava"):
        assert prod[name] >= 1, prod


def test_one_step_workflows_take_their_profile_from_their_inputs(tmp_path):
    """embedding and semdedup (the launch plans embedding_tiny/_siglip2, semdedup_tiny/_target10): their @dynamic
    bodies request a GPU exactly when the plan's inputs make a GPU run."""
    from flytekit.types.directory import FlyteDirectory

    from tasks.types import StepOut
    from workflows.dedup import semdedup_run, semdedup_target10_lp, semdedup_tiny_lp
    from workflows.embed import embed_run, embedding_siglip2, embedding_tiny

    d = FlyteDirectory(str(tmp_path))
    for plan, gpu in ((embedding_tiny, False), (embedding_siglip2, True)):
        gpus = spec_gpus(compile_dynamic(embed_run, shards=d, config=plan.saved_inputs["config"]))
        assert (gpus["tasks.embed.embed_shards"] >= 1) == gpu, (plan.name, gpus)
    for plan, gpu in ((semdedup_tiny_lp, False), (semdedup_target10_lp, True)):
        gpus = spec_gpus(compile_dynamic(semdedup_run, embeddings=StepOut("embed", d), **plan.saved_inputs))
        assert (gpus["tasks.dedup.cluster_embeddings"] >= 1) == gpu, (plan.name, gpus)


def test_semdedup_map_task_cap_is_the_configs(tmp_path):
    from flytekit.types.file import FlyteFile

    from core.steps.dedup.config import target_dedup_config
    from workflows.steps import prune_groups

    cfg = target_dedup_config(0.1, n_clusters=8)
    cfg.max_parallel_groups = 3
    groups = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for g in groups:
        g.write_bytes(b"x")
    for gpu, gpus in ((True, 1), (False, 0)):
        spec = compile_dynamic(prune_groups, groups=[FlyteFile(str(g)) for g in groups], config=cfg, gpu=gpu)
        arrays = [n for n in spec.nodes if n.WhichOneof("target") == "array_node"]
        assert [n.array_node.parallelism for n in arrays] == [3]
        assert list(spec_gpus(spec).values()) == [gpus]


