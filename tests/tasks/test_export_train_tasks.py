"""The export and training Flyte tasks, run locally (training through torch elastic, gloo on CPU)."""

from __future__ import annotations

import json
import os

import pytest
from export_train_fixtures import make_tiny_clip_dir, make_tiny_lm
from flytekit.types.directory import FlyteDirectory

from core.foundation.configs import preset
from core.steps.export import ExportConfig
from core.train.config import TrainConfig
from core.train.mini_llava import load_mini_llava
from tasks.types import StepOut
from tests.unit.test_export import _make_run


@pytest.fixture(scope="module")
def flyte_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    old = {k: os.environ.get(k) for k in ("HOME", "OMP_NUM_THREADS")}
    (tmp / "home").mkdir()
    os.environ["HOME"] = str(tmp / "home")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield tmp
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def exported(flyte_env):
    from tasks.export import export_dataset

    run, kept = _make_run(flyte_env)
    out = export_dataset(run=StepOut("ingest", FlyteDirectory(str(run))), config=ExportConfig(max_samples=10))
    assert out.step == "export"
    return out.dir, kept


def test_export_task(exported):
    out, kept = exported
    manifest = json.loads(open(os.path.join(out.path, "manifest.json")).read())
    assert manifest["n_samples"] == len(kept) and manifest["n_shards"] == 4
    assert sorted(os.listdir(os.path.join(out.path, "shards"))) == ["image", "images2", "text"]
    assert sorted(os.listdir(os.path.join(out.path, "shards", "image"))) == ["shard-000000.tar", "shard-000001.tar"]
    card = open(os.path.join(out.path, "README.md")).read()
    assert "config_name: \"images2\"" in card and "code version: `" in card


def test_partitioned_export_task_exports_the_same_samples(exported, flyte_env):
    """`partition_shards > 0` runs the partitioned export in the task's resumable step folder: the same samples
    and bytes per kind as the default export (other shard boundaries), a manifest of the same totals."""
    import webdataset as wds

    from tasks.export import export_dataset

    out, kept = exported
    run, _ = _make_run(flyte_env / "p")  # the same run as `exported` (deterministic), in a folder of its own
    part = export_dataset(run=StepOut("ingest", FlyteDirectory(str(run))),
                          config=ExportConfig(max_samples=10, partition_shards=1)).dir
    a = json.loads(open(os.path.join(out.path, "manifest.json")).read())
    b = json.loads(open(os.path.join(part.path, "manifest.json")).read())
    assert b["n_samples"] == a["n_samples"] == len(kept) and b["config"]["partition_shards"] == 1

    def members(root):
        got = {}
        for kind in sorted(os.listdir(os.path.join(root, "shards"))):
            for t in sorted(os.listdir(os.path.join(root, "shards", kind))):
                for s in wds.WebDataset(os.path.join(root, "shards", kind, t), shardshuffle=False):
                    got[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
        return got

    assert members(part.path) == members(out.path)
    assert "part-u000000.parquet" in os.listdir(os.path.join(part.path, "ledger", "export"))


@pytest.mark.slow
def test_train_task_runs_ddp_under_torch_elastic(exported, flyte_env):
    """The task body under torch elastic with 2 local workers (DDP over gloo), as on a 2-GPU node."""
    from flytekit import task
    from flytekitplugins.kfpytorch import Elastic

    from tasks.train import TRAIN_IMAGE, train_mini_llava

    two = task(container_image=TRAIN_IMAGE,
               task_config=Elastic(nnodes=1, nproc_per_node=2, increase_shared_mem=False))(train_mini_llava.task_function)
    out, _ = exported
    clip_dir = make_tiny_clip_dir(flyte_env / "clip", flyte_env)
    lm = make_tiny_lm(flyte_env / "lm")
    res = two(data=out, vision_model="", vision_dir=FlyteDirectory(clip_dir), lm=FlyteDirectory(lm),
              config=preset(TrainConfig, "default", epochs=2, batch_size=2, lr=3e-3, val_size=4, val_every_n_steps=2,
                            device="cpu"),
              checkpoint_uri=str(flyte_env / "ckpt"))
    names = [os.path.basename(c.path) for c in res.checkpoints]
    assert names == ["epoch-0001", "epoch-0002"]
    state = json.loads(open(os.path.join(res.checkpoints[-1].path, "trainer_state.json")).read())
    assert state["data"]["world_size"] == 2 and state["config"]["nproc_per_node"] == 2
    rows = [json.loads(x) for x in open(res.metrics.path)]
    # 23 training samples // (2 per rank x 2 ranks) = 5 steps per epoch
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    model = load_mini_llava(res.checkpoints[-1].path)
    assert len(model.generate([[]], ["hello"], max_new_tokens=3)) == 1
