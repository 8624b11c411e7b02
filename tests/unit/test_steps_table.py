"""The step table (core/runs/steps.py): one declaration of the curate order, read by the workflows, the README and
the tests; and the one resource-profile rule."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from core.foundation.configs import load_config, override, preset
from core.runs.config import CurateConfig
from core.runs.steps import (
    BY_NAME,
    CURATE_STEPS,
    GPU_PROFILES,
    STEP_NAMES,
    TINY,
    active_steps,
    config_device,
    profile,
    run_uses_gpu,
    step_config,
)
from core.steps.embed.config import siglip2_embed_config, tiny_embed_config
from core.steps.perplexity.config import PerplexityConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_row_names_real_config_fields_and_one_name():
    fields = {f.name: f for f in dataclasses.fields(CurateConfig)}
    assert len(set(STEP_NAMES)) == len(STEP_NAMES) and STEP_NAMES[0] == "ingest" and STEP_NAMES[-1] == "export"
    for s in CURATE_STEPS:
        if s.switch is not None:
            assert fields[s.switch].type in (bool, "bool"), s
            assert s.switch in (s.name, "perplexity"), s  # one name; ppl_filter is perplexity's second half
        if s.config is not None:
            assert s.config in fields, s
            assert s.config == f"{s.name}_config" or s.name == "embed", s
    demo = preset(CurateConfig, "demo")
    assert step_config(BY_NAME["semdedup"], demo) is demo.semdedup_config


def test_active_steps_follow_the_switches_in_table_order():
    demo = preset(CurateConfig, "demo")
    assert [s.name for s in active_steps(demo)] == ["ingest", "embed", "semdedup", "perplexity", "ppl_filter", "export"]
    every = override(demo, image_filter=True, decontam=True, rephrase=True)
    assert [s.name for s in active_steps(every)] == list(STEP_NAMES)
    bare = override(demo, semdedup=False, perplexity=False)
    assert [s.name for s in active_steps(bare)] == ["ingest", "embed", "export"]


def test_the_launchers_cover_the_table_exactly():
    from workflows.steps import LAUNCHERS

    assert list(LAUNCHERS) == list(STEP_NAMES)  # same steps, same order: the import-time check holds


def test_readme_states_the_tables_order():
    text = (ROOT / "README.md").read_text()
    chain = re.search(r"runs the step table in order: (.*?), then the run summary", text, re.S).group(1)
    assert [w.strip() for w in chain.replace("\n", " ").split("→")] == list(STEP_NAMES)


def test_workflows_hold_no_step_specific_branch():
    """workflows/curate.py loops over the table: no `if c.<switch>` / step name tests left in it."""
    import ast

    tree = ast.parse((ROOT / "workflows" / "curate.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "curate_steps")
    assert not [n for n in ast.walk(fn) if isinstance(n, (ast.If, ast.IfExp, ast.Match))]
    names = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & set(STEP_NAMES), names & set(STEP_NAMES)


def test_old_config_keys_still_read_with_a_warning(caplog):
    cfg = load_config(CurateConfig, {"decontaminate": True, "dedup_config": {"target_removal": 0.2},
                                     "ppl_config": {"mode": "text"}}, preset(CurateConfig, "demo"))
    assert cfg.decontam and cfg.semdedup_config.target_removal == 0.2 and cfg.perplexity_config.mode == "text"
    assert "is now 'decontam'" in caplog.text
    with pytest.raises(ValueError, match="both 'decontaminate' and its new name"):
        load_config(CurateConfig, {"decontaminate": True, "decontam": False}, preset(CurateConfig, "demo"))


def test_the_profile_rule():
    tiny, prod = tiny_embed_config(), siglip2_embed_config()
    assert not run_uses_gpu(tiny) and run_uses_gpu(prod)
    assert config_device(tiny) == "cpu" and config_device(prod) == "gpu" and config_device(None) == "auto"
    auto = PerplexityConfig(model="m", device="auto")
    assert profile("perplexity", auto, run_gpu=False) == dataclasses.replace(TINY, image="gpu")  # follows the run
    assert profile("perplexity", auto, run_gpu=True) == GPU_PROFILES["perplexity"]
    assert profile("perplexity", override(auto, device="cpu"), run_gpu=True).gpu == 0  # the config names its device
    assert profile("perplexity", override(auto, device="cuda:1"), run_gpu=False).gpu == 1
    for kind, p in GPU_PROFILES.items():  # a CPU profile keeps the kind's image, never a GPU
        assert profile(kind, None, run_gpu=False).gpu == 0 and profile(kind, None, run_gpu=False).image == p.image


def test_profile_overrides_state_gpu_zero_on_cpu():
    from tasks.resources import overrides

    cpu = overrides("train", None, run_gpu=False)
    assert cpu["requests"].gpu == "0" and cpu["limits"] == cpu["requests"]  # never inherits the decorator's GPU
    gpu = overrides("train", None, run_gpu=True)
    assert gpu["requests"].gpu == "1" and "train" in gpu["container_image"]


def test_a_fanned_out_step_gets_the_pod_for_all_its_workers():
    """A fan-out in one pod (8 actors on one 8-GPU node): the profile asks for 8 GPUs, 8 x 8 + 2 CPUs; the production
    preset's fan-out over 32 worker pods leaves the task's pod as the driver and sizes each worker pod so."""
    from core.runs.fanout import FanOut, gpu_node_fanout
    from core.runs.steps import DRIVER, worker_pods

    prod = preset(CurateConfig, "mammoth_v1")
    one_node = override(prod.perplexity_config, fanout=gpu_node_fanout())
    p = profile("perplexity", one_node, run_uses_gpu(prod.embed_config))
    assert p.gpu == 8 and float(p.cpu) == 8 * 8 + 2
    assert p.mem == f"{int(GPU_PROFILES['perplexity'].mem.removesuffix('Gi')) * 8}Gi"
    assert worker_pods("perplexity", one_node, True) is None
    fan = prod.perplexity_config.fanout
    assert (fan.workers, fan.pod_workers, fan.gpus_per_worker) == (256, 8, 1.0)
    assert profile("perplexity", prod.perplexity_config, True) == dataclasses.replace(DRIVER, image="gpu")
    assert worker_pods("perplexity", prod.perplexity_config, True) == (32, p)  # each worker pod = the one-node pod
    two_cpu = override(preset(CurateConfig, "demo").perplexity_config, fanout=FanOut(workers=2))
    assert profile("perplexity", two_cpu, run_gpu=False) == dataclasses.replace(TINY, cpu="4", mem="16Gi", image="gpu")
    assert profile("filter", override(preset(CurateConfig, "demo").image_filter_config,
                                      fanout=FanOut(workers=4)), run_gpu=True).gpu == 0  # a CPU step stays on CPU
