"""Resources as profiles (issue 22, item 2) for the mixing, targeted, evaluation and training parts: one workflow
each, no `*_cpu` twin; the `@dynamic` bodies give every GPU-capable node the run's profile.

Checked on the DynamicJobSpecs the dynamics return at run time (compiled as propeller would, `compile_dynamic`)
for the launch plans' own default inputs: the tiny/demo plans request no GPU on any node, the production plans
request GPUs on the GPU nodes, and the map-node concurrency caps are the code's constants.
"""

from __future__ import annotations

import pytest
from flytekit.types.directory import FlyteDirectory

from core.foundation.configs import override
from tests.package_checks import _custom_gpus, _nodes, node_gpus
from tests.tasks.test_packaging import compile_dynamic


def requested(spec) -> dict[str, int]:
    """Task reference name -> the most GPUs any node running it requests (its overrides, else its template; Ray
    worker GPUs of its plugin config included), over every node of a compiled dynamic (array sub-nodes and
    sub-workflows included)."""
    tasks = {t.id.name: t for t in spec.tasks}
    nodes = [*_nodes(spec.nodes), *(n for w in spec.subworkflows for n in _nodes(w.nodes))]
    out: dict[str, int] = {}
    for n in nodes:
        if n.WhichOneof("target") == "task_node":
            name = n.task_node.reference_id.name
            out[name] = max(out.get(name, 0), node_gpus(n, tasks), _custom_gpus(tasks.get(name)))
    return out


def gpus_of(req: dict[str, int], task: str) -> list[int]:
    """The GPUs of the nodes running `task` (a plain task name, or the map task built from it)."""
    got = [g for name, g in req.items() if name.rsplit(".", 1)[-1] == task or f".map_{task}_" in name]
    assert got, (task, sorted(req))
    return got


def caps(spec) -> dict[str, list[int]]:
    """Map task -> the parallelism of each array node running it."""
    out: dict[str, list[int]] = {}
    for n in _nodes(spec.nodes):
        if n.WhichOneof("target") == "array_node":
            name = n.array_node.node.task_node.reference_id.name.rsplit(".", 1)[-1].removeprefix("map_")
            out.setdefault(name.rsplit("_", 1)[0], []).append(n.array_node.parallelism)
    return out


def workflow_input(spec, workflow: str, name: str):
    """The literal bound to input `name` of the sub-workflow node running `workflow` (a static value)."""
    for n in _nodes(spec.nodes):
        if n.WhichOneof("target") == "workflow_node" and n.workflow_node.sub_workflow_ref.name == workflow:
            for b in n.inputs:
                if b.var == name:
                    return b.binding.scalar.primitive
    raise AssertionError(f"no {workflow} node binding {name}")


def plan_inputs(plan) -> dict:
    """What a launch plan runs its workflow with: the workflow's defaults, then the plan's default inputs."""
    wf = {k: v for k, (_, v) in plan.workflow.python_interface.inputs_with_defaults.items()}
    return wf | plan.saved_inputs


@pytest.fixture
def d(tmp_path):
    return FlyteDirectory(str(tmp_path))


# ---- evaluation ---------------------------------------------------------------------------------------------
def _eval_spec(device: str, gpu: bool):
    from workflows.evaluate import evaluate_jobs

    return compile_dynamic(evaluate_jobs, checkpoints=["a", "b"], groups=["docvqa", "docvqa"], cache_dir="c",
                           backend="auto", device=device, batch_size=8, max_samples=0, scoring="exact", gpu=gpu)


@pytest.mark.parametrize("device, gpu, want", [("auto", False, 0), ("auto", True, 1), ("cpu", True, 0),
                                               ("cuda", False, 1)])
def test_eval_workers_follow_the_device_else_the_run(device, gpu, want):
    from workflows.evaluate import EVAL_CONCURRENCY

    spec = _eval_spec(device, gpu)
    assert gpus_of(requested(spec), "evaluate_checkpoint_benchmarks") == [want]
    assert caps(spec) == {"evaluate_checkpoint_benchmarks": [EVAL_CONCURRENCY]}


def test_nightly_eval_requests_a_gpu_per_worker():
    from workflows.evaluate import nightly_eval

    inputs = plan_inputs(nightly_eval)
    assert gpus_of(requested(_eval_spec(inputs["device"], True)), "evaluate_checkpoint_benchmarks") == [1]


# ---- mixing -------------------------------------------------------------------------------------------------
def _soup_spec(d, config):
    from workflows.mixing import soup_mixing_steps

    return compile_dynamic(soup_mixing_steps, run=d, domains=d, base=d, config=config, eval_cache="ec",
                           external_command="", output_dir="")


def _base_spec(d, config):
    from workflows.mixing import train_base

    return compile_dynamic(train_base, data=d, lm=d, vision=d, config=config, steps=3)


def test_mixing_demo_requests_no_gpu_production_does(d):
    from core.mixing.pipeline import MixingConfig
    from workflows.evaluate import ALL_BENCHMARKS, EVAL_CONCURRENCY
    from workflows.mixing import EXPERT_CONCURRENCY, mixing_demo

    tiny = plan_inputs(mixing_demo)["config"]
    assert tiny.device == "cpu"
    for spec in (_soup_spec(d, tiny), _base_spec(d, tiny)):
        req = requested(spec)
        assert req and not any(req.values()), req
    for prod in (MixingConfig(benchmarks=ALL_BENCHMARKS), override(tiny, device="cuda")):
        spec = _soup_spec(d, prod)
        req = requested(spec)
        assert gpus_of(req, "train_expert") == [1] and gpus_of(req, "evaluate_soup") == [1], req
        assert not gpus_of(req, "analyze_soups")[0] and not gpus_of(req, "prepare_experts")[0]
        assert caps(spec) == {"train_expert": [EXPERT_CONCURRENCY] * 2, "evaluate_soup": [EVAL_CONCURRENCY] * 2}
        assert gpus_of(requested(_base_spec(d, prod)), "train_mini_llava") == [1]


# ---- targeted -----------------------------------------------------------------------------------------------
def _targeted_spec(d, inputs):
    from tasks.types import StepOut
    from workflows.targeted import targeted_steps

    keep = {k: inputs[k] for k in ("embed_config", "decontam_config", "config", "benchmarks", "tiny_vlm_steps",
                                   "lm_steps")}
    return compile_dynamic(targeted_steps, ref=StepOut("ingest", d), pool=StepOut("ingest", d), reference_ids=None,
                           eval_cache="ec", model_dir=None, **keep)


def test_targeted_demo_requests_no_gpu_qwen_vl_does(d):
    from workflows.targeted import targeted_demo, targeted_qwen_vl

    demo = _targeted_spec(d, plan_inputs(targeted_demo))
    req = requested(demo)
    assert req and not any(req.values()), req
    tiny_cfg = plan_inputs(targeted_demo)["config"]
    assert caps(demo)["generate_targeted_shard"] == [tiny_cfg.max_parallel_shards]
    prod_inputs = plan_inputs(targeted_qwen_vl)
    prod = _targeted_spec(d, prod_inputs)
    assert gpus_of(requested(prod), "generate_targeted_shard") == [1]
    assert gpus_of(requested(prod), "embed_shards") == [1]  # SigLIP2 on GPU Ray actors (tasks/embed.py's profile)
    assert caps(prod)["generate_targeted_shard"] == [prod_inputs["config"].max_parallel_shards]


def _ablation_spec(d, inputs):
    from workflows.targeted import targeted_ablation_steps

    want = targeted_ablation_steps.python_interface.inputs
    return compile_dynamic(targeted_ablation_steps, **{k: v for k, v in inputs.items() if k in want})


def test_targeted_ablation_demo_trains_and_evaluates_on_cpu_production_on_gpus(d):
    from core.steps.embed.config import siglip2_embed_config
    from core.targeted.config import qwen_vl_targeted_config
    from workflows.targeted import targeted_ablation_demo

    demo = plan_inputs(targeted_ablation_demo)
    spec = _ablation_spec(d, demo)
    req = requested(spec)
    assert gpus_of(req, "train_mini_llava") == [0], req
    assert req and not any(req.values()), req
    assert workflow_input(spec, "workflows.evaluate.evaluation", "gpu").boolean is False
    prod = _ablation_spec(d, demo | {"embed_config": siglip2_embed_config(), "config": qwen_vl_targeted_config()})
    assert gpus_of(requested(prod), "train_mini_llava") == [1]
    assert workflow_input(prod, "workflows.evaluate.evaluation", "gpu").boolean is True
