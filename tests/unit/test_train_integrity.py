"""Trainer integrity with hostile inputs: a changed config or data is never answered with the old checkpoints,
a checkpoint swap never leaves a gap, stale tars beside an export manifest are never trained on, and a
40,000-turn conversation is encoded in bounded time and memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from capped import run_capped
from export_train_fixtures import make_records, make_tiny_lm, register_tiny_clip, write_tar

from core.train import checkpoints as ck
from core.train.config import TrainConfig
from core.train.data import build_index, encode_conversation, list_tar_shards
from core.train.identity import RunMismatchError
from core.train.loop import STATE_FILE, list_checkpoints, train


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_integrity")
    torch.set_num_threads(1)
    recs = make_records(40, seed=5)
    export = tmp / "export"
    write_tar(export / "shards" / "shard-000000.tar", recs[:24])
    write_export_manifest(export, ["shard-000000.tar"])
    return {"tmp": tmp, "clip": register_tiny_clip(tmp), "lm": make_tiny_lm(tmp / "lm"), "export": export,
            "records": recs}


def write_export_manifest(export: Path, names: list[str]) -> None:
    """A manifest in core.steps.export's format (the fields the trainer reads: shard names, sizes, sha256)."""
    shards = []
    for n in names:
        data = (export / "shards" / n).read_bytes()
        shards.append({"name": n, "n_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "ids": []})
    (export / "manifest.json").write_text(json.dumps({"format": 1, "n_shards": len(names), "shards": shards}))


def _cfg(env, out, **kw):
    base = dict(epochs=1, batch_size=8, lr=3e-3, val_size=8, val_every_n_steps=100, ckpt_every_n_steps=0,
                device="cpu", max_seq_len=120, max_steps=2)
    base.update(kw)
    return TrainConfig(output_dir=str(env["tmp"] / out), vision_model=env["clip"], lm_path=env["lm"], **base)


# ---- stale export tars ----------------------------------------------------------------------------------------
def test_trainer_reads_the_manifest_not_a_glob(env, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(env["export"], export)
    write_tar(export / "shards" / "shard-000001.tar", env["records"][24:])  # stale: an earlier, larger export
    want = [str(export / "shards" / "shard-000000.tar")]
    assert list_tar_shards(str(export)) == want
    assert list_tar_shards(str(export / "shards")) == want  # what the task passes (the shards/ folder)
    assert len(build_index(list_tar_shards(str(export)))) == 24
    # a plain folder of tars (no manifest) still trains on every tar
    bare = tmp_path / "bare"
    shutil.copytree(export / "shards", bare)
    assert len(list_tar_shards(str(bare))) == 2


def test_manifest_naming_a_missing_or_escaping_shard_is_refused(env, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(env["export"], export)
    man = json.loads((export / "manifest.json").read_text())
    man["shards"].append({"name": "shard-000009.tar"})
    (export / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="shard-000009.tar listed in the manifest is missing"):
        list_tar_shards(str(export))
    for bad in ("../../etc/passwd", "image/../../x.tar", "/etc/passwd", "a/b/c.tar", "image//x.tar"):
        man["shards"][-1] = {"name": bad}
        (export / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(ValueError, match="is not a file of its shards/ folder"):
            list_tar_shards(str(export))


# ---- "already finished" only for the same run --------------------------------------------------------------
def test_finished_run_is_not_returned_for_another_config_or_data(env, tmp_path):
    cfg = _cfg(env, "run_a")
    first = train(str(env["export"]), cfg)
    assert first.global_step == 2
    assert train(str(env["export"]), cfg).checkpoints == first.checkpoints  # same run: already finished

    with pytest.raises(RunMismatchError, match=r"lr: 0\.003 -> 0\.001") as e:
        train(str(env["export"]), _cfg(env, "run_a", lr=1e-3))
    assert "on_config_change='restart'" in str(e.value)

    other = tmp_path / "export"  # same folder layout, other samples
    write_tar(other / "shards" / "shard-000000.tar", env["records"][16:40])
    write_export_manifest(other, ["shard-000000.tar"])
    with pytest.raises(RunMismatchError, match="data: "):
        train(str(other), cfg)
    # the old checkpoints are untouched by the refusals
    assert [str(d) for _, d in list_checkpoints(cfg.output_dir)] == first.checkpoints


def test_restart_moves_the_old_run_aside_and_trains_fresh(env):
    cfg = _cfg(env, "run_b")
    first = train(str(env["export"]), cfg)
    old_state = json.loads((Path(first.checkpoints[-1]) / STATE_FILE).read_text())
    res = train(str(env["export"]), _cfg(env, "run_b", lr=1e-3, on_config_change="restart"))
    assert res.resumed_from is None and res.global_step == 2
    new_state = json.loads((Path(res.checkpoints[-1]) / STATE_FILE).read_text())
    assert new_state["identity"]["lr"] == 1e-3 and old_state["identity"]["lr"] == 3e-3
    aside = list((Path(cfg.output_dir) / "superseded").iterdir())
    assert len(aside) == 1 and (aside[0] / "checkpoints" / Path(first.checkpoints[-1]).name / STATE_FILE).is_file()


def test_legacy_checkpoint_without_identity_is_compared_on_its_config(env):
    cfg = _cfg(env, "run_legacy")
    first = train(str(env["export"]), cfg)
    f = Path(first.checkpoints[-1]) / STATE_FILE
    state = json.loads(f.read_text())
    del state["identity"]
    f.write_text(json.dumps(state))
    assert train(str(env["export"]), cfg).checkpoints == first.checkpoints
    with pytest.raises(RunMismatchError, match="seed: 0 -> 1"):
        train(str(env["export"]), _cfg(env, "run_legacy", seed=1))


# ---- checkpoint swap without a gap ---------------------------------------------------------------------------
def _ckpt(root: Path, name: str, step: int, tag: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / STATE_FILE).write_text(json.dumps({"global_step": step, "tag": tag}))
    return d


def _tag(d: Path) -> str:
    return json.loads((d / STATE_FILE).read_text())["tag"]


@pytest.mark.parametrize("crash_at", [0, 1, 2, 3])
def test_a_crash_during_a_checkpoint_swap_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, crash_at):
    root = tmp_path / "checkpoints"
    _ckpt(root, "step-00000004", 4, "old")
    new = _ckpt(root, "step-00000004.x.tmp", 4, "new")
    calls = {"n": 0}

    def counting(fn):  # the swap is rmtree(aside), replace(final, aside), replace(tmp, final), rmtree(aside)
        def wrapped(*a, **kw):
            if calls["n"] == crash_at:
                raise KeyboardInterrupt("crash")
            calls["n"] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(ck.os, "replace", counting(os.replace))
    monkeypatch.setattr(ck.shutil, "rmtree", counting(shutil.rmtree))
    with pytest.raises(KeyboardInterrupt):
        ck.publish_dir(new, root / "step-00000004", root / "step-00000004.old")
    monkeypatch.undo()
    # at the crash point there is a complete checkpoint that list_checkpoints finds
    found = list_checkpoints(tmp_path)
    assert len(found) == 1 and found[0][0] == 4
    ck.recover_checkpoints(tmp_path)
    found = list_checkpoints(tmp_path)
    assert [d.name for _, d in found] == ["step-00000004"] and _tag(found[0][1]) in ("old", "new")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


def test_publish_replaces_an_existing_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _ckpt(root, "epoch-0001", 8, "old")
    ck.publish_dir(_ckpt(root, "epoch-0001.a.tmp", 8, "new"), root / "epoch-0001", root / "epoch-0001.old")
    assert [(d.name, _tag(d)) for _, d in list_checkpoints(tmp_path)] == [("epoch-0001", "new")]
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]


# ---- 40,000 turns -------------------------------------------------------------------------------------------
def _encode_long(lm: str, n_turns: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm)
    img = tok.convert_tokens_to_ids("<image>")
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": "a"} for i in range(n_turns)]
    ids, labels, n = encode_conversation(tok, turns, img, 4, max_len=512)
    # the first 300 turns already exceed max_len: the result must be theirs exactly
    ids2, labels2, n2 = encode_conversation(tok, turns[:300], img, 4, max_len=512)
    return {"same": (ids, labels, n) == (ids2, labels2, n2), "len": len(ids)}


def test_training_encoding_of_40000_turns_is_bounded(env):
    res = run_capped(_encode_long, env["lm"], 40_000, headroom_mb=2048, timeout_s=60)
    assert res.value == {"same": True, "len": 512}
    assert res.grown_mb < 500
