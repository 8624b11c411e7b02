"""W&B logging of the built-in trainer, offline (WANDB_MODE=offline, every W&B dir inside the test's tmp dir).

- the trainer's own run (`TrainConfig.wandb_project`, non-Flyte use) holds the metrics.jsonl rows;
- `train_mini_llava` under the flytekit W&B plugin (MMCURATE_WANDB_* set, module reloaded): the plugin's run
  holds the rows and the trainer starts no second run;
- the serialized task requests the W&B secret only when enabled; disabled, nothing of W&B is imported.

The offline run is read from its `run-<id>.wandb` file (W&B's LevelDB-log framing of protobuf `Record`s).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from export_train_fixtures import make_records, make_tiny_clip_dir, make_tiny_lm, register_tiny_clip, write_tar

from core.foundation.configs import preset
from core.train.config import TrainConfig
from core.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
WANDB_VARS = ("MMCURATE_WANDB_PROJECT", "MMCURATE_WANDB_ENTITY", "MMCURATE_WANDB_SECRET_KEY",
              "MMCURATE_WANDB_SECRET_GROUP")


# ---- reading an offline run ---------------------------------------------------------------------------
def _records(path: Path):
    """Protobuf records of a `.wandb` file: a 7-byte header, then 32 KiB blocks of LevelDB-log chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B run file"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)  # wandb-core writes top-level keys as a one-element nested_key


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Every offline run under WANDB_DIR: project, entity, config, and the history rows merged by step.

    `run.finish()` returns once wandb-core has handled the exit record, not once its writer has flushed the
    run file (a ~2 KB run can still sit in the writer's buffer: seen in CI as a file holding only its header).
    `wandb.teardown()` stops the service, which closes the file; a run file without its exit record then fails
    here by name instead of reading as an empty run."""
    import wandb

    wandb.teardown()
    runs = []
    for f in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"project": None, "entity": None, "config": {}, "history": {}}
        kinds = []
        for rec in _records(f):
            kind = rec.WhichOneof("record_type")
            kinds.append(kind)
            if kind == "run":
                run["project"], run["entity"] = rec.run.project, rec.run.entity
                run["config"].update({_key(i): json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                run["config"].update({_key(i): json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
                run["history"].setdefault(rec.history.step.num, {}).update(row)
        assert kinds and kinds[-1] == "exit", f"{f} ({f.stat().st_size} bytes) is incomplete: records {kinds}"
        runs.append(run)
    return runs


def assert_history_holds(run: dict, metrics_path: str) -> None:
    """Every metrics.jsonl row is in the run's history at its step: loss, lr, epoch, val_loss."""
    rows = [json.loads(line) for line in open(metrics_path)]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert val, "the run logged no validation rows"
    hist = run["history"]
    assert {s for s, h in hist.items() if "val_loss" in h} == set(val)
    for step, v in val.items():
        assert hist[step]["val_loss"] == pytest.approx(v)
    for r in rows:
        for key in ("loss", "lr", "epoch"):
            if key in r:
                assert hist[r["step"]][key] == pytest.approx(r[key]), (r["step"], key)


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_wandb")
    torch.set_num_threads(1)
    recs = make_records(24, seed=5)
    write_tar(tmp / "shards" / "shard-000000.tar", recs)
    return {"tmp": tmp, "clip": register_tiny_clip(tmp), "lm": make_tiny_lm(tmp / "lm"), "data": str(tmp / "shards")}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """WANDB_MODE=offline with every W&B directory in tmp_path; returns WANDB_DIR."""
    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", *WANDB_VARS):
        monkeypatch.delenv(var, raising=False)
    dirs = {"WANDB_DIR": "runs", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config",
            "WANDB_DATA_DIR": "data", "WANDB_ARTIFACT_DIR": "artifacts"}
    for var, sub in dirs.items():
        (tmp_path / "wandb" / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / "wandb" / sub))
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB__DISABLE_STATS": "true", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(var, value)
    yield tmp_path / "wandb" / "runs"
    import wandb

    if wandb.run is not None:  # a failed test must not leave its run active for the next one
        wandb.finish()


@contextlib.contextmanager
def train_module(monkeypatch, **wandb_env):
    """tasks.train re-imported with exactly these MMCURATE_WANDB_* set; re-imported again, as before, after."""
    import tasks.train

    try:
        with monkeypatch.context() as m:
            for var in WANDB_VARS:
                m.delenv(var, raising=False)
            for var, value in wandb_env.items():
                m.setenv(var, value)
            yield importlib.reload(tasks.train)
    finally:
        importlib.reload(tasks.train)  # the environment is restored by now: the task as it was


# ---- tests ------------------------------------------------------------------------------------------
def test_trainer_started_run_holds_the_metrics_rows(env, offline_wandb):
    """Non-Flyte use: `wandb_project` makes the trainer start (and finish) its own run."""
    import wandb

    cfg = TrainConfig(output_dir=str(env["tmp"] / "direct"), vision_model=env["clip"], lm_path=env["lm"],
                      epochs=1, batch_size=4, max_steps=4, val_size=4, val_every_n_steps=2, device="cpu",
                      max_seq_len=200, wandb_project="mmcurate-direct", wandb_run_name="direct")
    res = train(env["data"], cfg)
    assert wandb.run is None  # the trainer finished the run it started
    runs = offline_runs(offline_wandb)
    assert len(runs) == 1 and runs[0]["project"] == "mmcurate-direct"
    assert_history_holds(runs[0], res.metrics_path)
    assert runs[0]["config"]["lr"] == cfg.lr and runs[0]["config"]["max_steps"] == 4
    steps = sorted(s for s, h in runs[0]["history"].items() if "val_loss" in h)
    assert steps == [2, 4]


@pytest.mark.slow
def test_plugin_run_of_the_training_task_holds_the_metrics_rows(env, offline_wandb, monkeypatch):
    """train_mini_llava with MMCURATE_WANDB_* set, run locally under torch elastic: the plugin's run gets the
    rows; `wandb_project` is then ignored (no second run)."""
    from flytekit.types.directory import FlyteDirectory

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    clip_dir = make_tiny_clip_dir(env["tmp"] / "clip", env["tmp"])
    with train_module(monkeypatch, MMCURATE_WANDB_PROJECT="mmcurate-plugin", MMCURATE_WANDB_ENTITY="team") as tt:
        res = tt.train_mini_llava(
            data=FlyteDirectory(env["data"]), vision_model="", vision_dir=FlyteDirectory(clip_dir),
            lm=FlyteDirectory(env["lm"]),
            config=preset(TrainConfig, "default", epochs=1, batch_size=4, max_steps=4, val_size=4, val_every_n_steps=2,
                          max_seq_len=200, device="cpu"), checkpoint_uri=str(env["tmp"] / "plugin"), wandb_project="not-this-one",
        )
    runs = offline_runs(offline_wandb)
    assert [(r["project"], r["entity"]) for r in runs] == [("mmcurate-plugin", "team")]
    assert_history_holds(runs[0], res.metrics.path)
    assert runs[0]["config"]["lr"] == 1e-3 and runs[0]["config"]["batch_size"] == 4  # the TrainConfig


def _serialize(task) -> object:
    from flytekit.configuration import Image, ImageConfig, SerializationSettings
    from flytekit.tools.translator import get_serializable

    images = ImageConfig(default_image=Image(name="default", fqn="reg.test/mmcurate-cpu", tag="t1"),
                         images=[Image(name="train", fqn="reg.test/mmcurate-train", tag="t1")])
    settings = SerializationSettings(image_config=images, project="p", domain="development", version="v1")
    return get_serializable(OrderedDict(), settings, task).template


def test_serialized_task_requests_the_secret_only_when_enabled(monkeypatch):
    with train_module(monkeypatch, MMCURATE_WANDB_PROJECT="proj", MMCURATE_WANDB_ENTITY="team",
                      MMCURATE_WANDB_SECRET_GROUP="wandb") as tt:
        on = _serialize(tt.train_mini_llava)
        with pytest.raises(ValueError, match="MMCURATE_WANDB_ENTITY"):
            with train_module(monkeypatch, MMCURATE_WANDB_PROJECT="proj"):
                pass
    secrets = [(s.group, s.key) for s in on.security_context.secrets]
    assert secrets == [("wandb", "wandb-api-key")]
    assert on.config["project"] == "proj" and on.config["entity"] == "team" and on.config["link_type"]
    # the pod re-imports tasks/train.py: it must see the same settings to build the same decorated task
    assert on.container.env == {"MMCURATE_WANDB_PROJECT": "proj", "MMCURATE_WANDB_ENTITY": "team",
                                "MMCURATE_WANDB_SECRET_GROUP": "wandb"}
    assert on.container.image == "reg.test/mmcurate-train:t1" and on.id.name == "tasks.train.train_mini_llava"

    with train_module(monkeypatch) as tt:
        off = _serialize(tt.train_mini_llava)
    assert off.security_context is None or not off.security_context.secrets
    assert not off.config and not off.container.env
    assert off.interface == on.interface


def test_disabled_imports_nothing_of_wandb():
    code = ("import json, sys, tasks.train as t; "
            "print(json.dumps([m for m in sys.modules if 'wandb' in m] + [type(t.train_mini_llava.task_function).__name__]))")
    env = {k: v for k, v in os.environ.items() if k not in WANDB_VARS}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["function"]
