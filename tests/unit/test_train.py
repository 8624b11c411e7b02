"""Built-in trainer: masking, resume after a kill, checkpoints, validation, stages, generation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from export_train_fixtures import make_records, make_tiny_lm, register_tiny_clip, write_tar

from core.foundation.configs import override
from core.train.config import TrainConfig
from core.train.data import IGNORE_INDEX, build_index, encode_conversation, epoch_order, list_tar_shards, read_entry
from core.train.loop import STATE_FILE, list_checkpoints, train
from core.train.mini_llava import build_mini_llava, load_mini_llava


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    torch.set_num_threads(1)  # the test machine is shared: 1 thread is faster than 2 contended
    name = register_tiny_clip(tmp)
    lm = make_tiny_lm(tmp / "lm")
    recs = make_records(72, seed=3)
    write_tar(tmp / "shards" / "shard-000000.tar", recs[:40])
    write_tar(tmp / "shards" / "shard-000001.tar", recs[40:])
    return {"tmp": tmp, "clip": name, "lm": lm, "data": str(tmp / "shards"), "records": recs}


def _cfg(env, out, **kw):
    base = dict(epochs=2, batch_size=8, lr=3e-3, val_size=8, val_every_n_steps=3, ckpt_every_n_steps=4,
                device="cpu", max_seq_len=200)
    base.update(kw)
    return TrainConfig(output_dir=str(env["tmp"] / out), vision_model=env["clip"], lm_path=env["lm"], **base)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_labels_mask_image_and_non_assistant_tokens(env):
    model = build_mini_llava(env["clip"], env["lm"], device="cpu")
    tok, img_id, n_img = model.tokenizer, model.image_token_id, model.n_image_tokens
    turns = [{"from": "human", "value": "<image>\nwhat color"}, {"from": "gpt", "value": "red square"},
             {"from": "human", "value": "how many"}, {"from": "gpt", "value": "two"}]
    ids, labels, n_full = encode_conversation(tok, turns, img_id, n_img, max_len=1000)
    assert n_full == 1 and ids.count(img_id) == n_img
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == img_id)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained.replace(" ", "") == "redsquare<|im_end|>two<|im_end|>"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    # truncation inside the second image block drops that whole image, never half of it
    two = [{"from": "human", "value": "<image><image>\nq"}, {"from": "gpt", "value": "a"}]
    ids2, labels2, n2 = encode_conversation(tok, two, img_id, n_img, max_len=4 + n_img + n_img // 2)
    assert n2 == 1 and ids2.count(img_id) == n_img
    # the model refuses a batch whose image slots do not match its images
    b = torch.tensor([ids])
    with pytest.raises(ValueError, match="image"):
        model(b, torch.ones_like(b), torch.tensor([labels]), pixel_values=torch.zeros(2, 3, 32, 32))


def test_index_reads_multi_image_samples_in_order(env):
    entries = build_index(list_tar_shards(env["data"]))
    assert len(entries) == 72
    rec, imgs = read_entry(entries[2])  # make_records: sample 2 has two images
    assert rec["id"] == "s00002" and imgs == env["records"][2][1]
    o1, o2 = epoch_order(np.arange(10), 0, 1), epoch_order(np.arange(10), 0, 2)
    assert sorted(o1) == list(range(10)) and list(o1) != list(o2)
    assert list(o1) == list(epoch_order(np.arange(10), 0, 1))


class Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_losses(env):
    ref = train(env["data"], _cfg(env, "ref"))
    cfg = _cfg(env, "killed")

    def kill(step):
        if step == 11:  # mid-epoch 2 (8 steps per epoch); last checkpoint is step 8 (epoch 1), then 12 never
            raise Killed

    with pytest.raises(Killed):
        train(env["data"], cfg, on_step=kill)
    assert [d.name for _, d in list_checkpoints(cfg.output_dir)] == ["epoch-0001"]
    # a checkpoint half-written when the kill came is ignored
    shutil.copytree(f"{cfg.output_dir}/checkpoints/epoch-0001", f"{cfg.output_dir}/checkpoints/step-00000012.tmp")
    res = train(env["data"], cfg)
    assert res.resumed_from.endswith("epoch-0001")
    a, b = _rows(ref.metrics_path), _rows(res.metrics_path)
    assert [(r["step"], "val_loss" in r) for r in a] == [(r["step"], "val_loss" in r) for r in b]
    for x, y in zip(a, b):
        key = "val_loss" if "val_loss" in x else "loss"
        assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6)
    assert [p.rsplit("/", 1)[-1] for p in res.checkpoints] == ["epoch-0001", "epoch-0002"]
    assert res.global_step == ref.global_step == 16
    # losses go down: it trains for real
    losses = [r["loss"] for r in a if "loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3


def test_resume_mid_epoch_from_step_checkpoint(env):
    ref = _rows(train(env["data"], _cfg(env, "ref2", epochs=1, ckpt_every_n_steps=2)).metrics_path)
    cfg = _cfg(env, "killed2", epochs=1, ckpt_every_n_steps=2)

    def kill(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train(env["data"], cfg, on_step=kill)
    assert list_checkpoints(cfg.output_dir)[-1][1].name == "step-00000004"
    res = train(env["data"], cfg)
    assert res.resumed_from.endswith("step-00000004")
    b = _rows(res.metrics_path)
    assert [r.get("loss", r.get("val_loss")) for r in b] == pytest.approx(
        [r.get("loss", r.get("val_loss")) for r in ref], rel=1e-5)
    # step checkpoints older than the newest epoch checkpoint are pruned
    assert [d.name for _, d in list_checkpoints(cfg.output_dir)] == ["epoch-0001"]
    # a finished run is not retrained
    again = train(env["data"], cfg)
    assert again.global_step == res.global_step and again.checkpoints == res.checkpoints


def test_checkpoint_contents_validation_and_projector_stage(env):
    cfg = _cfg(env, "proj", stage="projector", epochs=1, val_every_n_steps=2, max_steps=5)
    base = build_mini_llava(env["clip"], env["lm"], device="cpu")
    res = train(env["data"], cfg)
    assert res.global_step == 5 and res.checkpoints[-1].endswith("step-00000005")
    ck = res.checkpoints[-1]
    state = json.loads(open(f"{ck}/{STATE_FILE}").read())
    assert state["global_step"] == 5 and state["epoch"] == 0 and state["step_in_epoch"] == 5 and state["done"]
    assert state["config"]["stage"] == "projector" and state["data"]["n_val"] == 8
    model = load_mini_llava(ck)
    # stage 1 trains the projector only: LM weights are untouched, projector weights moved
    assert [p.shape for p in base.lm_parameters()] == [p.shape for p in model.lm_parameters()]
    for p0, p1 in zip(base.lm_parameters(), model.lm_parameters()):
        assert torch.equal(p0, p1)
    assert not torch.equal(base.projector.linear_1.weight, model.projector.linear_1.weight)
    for (k, v0), v1 in zip(base.vision.state_dict().items(), model.vision.state_dict().values()):
        assert torch.equal(v0, v1), k
    rows = _rows(res.metrics_path)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert all(np.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)


def test_generate_batched_equals_single(env):
    import io

    from PIL import Image

    res = train(env["data"], _cfg(env, "gen", epochs=1))
    model = load_mini_llava(res.checkpoints[-1])
    recs = env["records"]
    ims = [[Image.open(io.BytesIO(b)) for b in recs[i][1]] for i in (0, 2, 3)]
    prompts = ["what color is the square", "<image>\n<image>\nhow many", "describe"]
    batched = model.generate(ims, prompts, max_new_tokens=6)
    single = [model.generate([im], [p], max_new_tokens=6)[0] for im, p in zip(ims, prompts)]
    assert batched == single and len(batched) == 3 and all(isinstance(x, str) for x in batched)


def test_mirror_lets_a_fresh_pod_resume(env):
    """A preempted pod loses its local dir; the relaunch on a new one pulls the mirror and resumes."""
    import fsspec

    ref = _rows(train(env["data"], _cfg(env, "ref3", epochs=1, ckpt_every_n_steps=3)).metrics_path)
    uri = "memory://mmcurate-test/run3"
    cfg = _cfg(env, "pod_a", epochs=1, ckpt_every_n_steps=3, mirror_uri=uri)

    def kill(step):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(env["data"], cfg, on_step=kill)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/mmcurate-test/run3/checkpoints/step-00000003/trainer_state.json")
    res = train(env["data"], override(cfg, output_dir=str(env["tmp"] / "pod_b")))  # new, empty local dir
    assert res.resumed_from.endswith("step-00000003")
    b = _rows(res.metrics_path)
    assert [r.get("loss", r.get("val_loss")) for r in b] == pytest.approx(
        [r.get("loss", r.get("val_loss")) for r in ref], rel=1e-5)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/mmcurate-test/run3/checkpoints", detail=False)] == ["epoch-0001"]
