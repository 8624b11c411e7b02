"""The trainer's checkpoints are Hugging Face LLaVA folders: exact tower conversion, equal logits through plain
`transformers`, generation with `from_pretrained` + processor + `generate`, relocatable, stable tensor names."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch
from export_train_fixtures import make_records, make_tiny_lm, register_tiny_clip, write_tar

from core.train.config import TrainConfig
from core.train.data import encode_conversation
from core.train.hf_llava import FROZEN_PREFIXES, TRAINED_PREFIXES, UnsupportedTower, hf_vision_tower
from core.train.loop import STATE_FILE, train
from core.train.mini_llava import build_mini_llava, load_mini_llava


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_hf")
    torch.set_num_threads(1)
    name = register_tiny_clip(tmp)
    lm = make_tiny_lm(tmp / "lm")
    recs = make_records(72, seed=5)
    write_tar(tmp / "shards" / "shard-000000.tar", recs)
    cfg = TrainConfig(output_dir=str(tmp / "run"), vision_model=name, lm_path=lm, epochs=2, batch_size=4, lr=3e-3,
                      val_size=8, val_every_n_steps=8, device="cpu", max_seq_len=200)  # fmt: skip
    res = train(str(tmp / "shards"), cfg)
    return {"tmp": tmp, "clip": name, "lm": lm, "records": recs, "res": res}


def _image(env, i=0):
    from PIL import Image

    return Image.open(io.BytesIO(env["records"][i][1][0])).convert("RGB")


def test_open_clip_vit_converts_exactly_to_clip_vision_model(env):
    import open_clip
    from transformers import CLIPVisionModel

    torch.manual_seed(3)
    visual = open_clip.create_model(env["clip"]).visual.eval()
    cfg, sd, strategy = hf_vision_tower(visual)
    hf = CLIPVisionModel(cfg).eval()
    hf.load_state_dict(sd, strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = visual.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NLC",
                                           normalize_intermediates=False)["image_intermediates"][-1]  # fmt: skip
        got = hf(x, output_hidden_states=True).hidden_states[-1][:, 1:]  # LLaVA "default": drop the class token
    assert strategy == "default" and got.shape == ref.shape == (4, 16, 64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_timm_siglip_vit_converts_exactly_to_siglip_vision_model():
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer
    from transformers import SiglipVisionModel

    class TimmModel(torch.nn.Module):  # the shape of open_clip's TimmModel: the timm ViT is `.trunk`
        def __init__(self, trunk):
            super().__init__()
            self.trunk = trunk

    torch.manual_seed(0)
    trunk = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=3.5,
                              class_token=False, global_pool="map", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              act_layer=partial(torch.nn.GELU, approximate="tanh")).eval()  # fmt: skip
    cfg, sd, strategy = hf_vision_tower(TimmModel(trunk))
    assert strategy == "full" and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.intermediate_size == 168
    hf = SiglipVisionModel(cfg).eval()
    hf.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = trunk.forward_intermediates(x, indices=1, norm=False, intermediates_only=True, output_fmt="NLC")[-1]
        got = hf(x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # a tower the HF classes cannot express exactly is refused, not approximated
    trunk.blocks[0].ls1 = torch.nn.Linear(48, 48)
    with pytest.raises(UnsupportedTower, match="ls1"):
        hf_vision_tower(TimmModel(trunk))


def test_checkpoint_is_an_hf_llava_folder_without_absolute_paths(env):
    ck = env["res"].checkpoints[-1]
    names = set(os.listdir(ck))
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", STATE_FILE} <= names  # fmt: skip
    assert "mini_llava.json" not in names
    cfg = json.loads(open(f"{ck}/config.json").read())
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_config"]["model_type"] == "clip_vision_model" and cfg["text_config"]["model_type"] == "llama"
    tmp = str(env["tmp"])
    for f in names - {"model.safetensors", "optimizer.pt"}:
        assert tmp not in open(os.path.join(ck, f), encoding="utf-8").read(), f
    state = json.loads(open(f"{ck}/{STATE_FILE}").read())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"], state["epochs_completed"]) == (32, 2, 0, 2.0)
    assert state["config"]["output_dir"] == "../.." and not os.path.isabs(state["config"]["lm_path"])
    # relocatable: a copy elsewhere loads the same
    moved = env["tmp"] / "moved" / "ckpt"
    shutil.copytree(ck, moved)
    a, b = load_mini_llava(ck), load_mini_llava(moved)
    for (k, x), y in zip(a.llava.state_dict().items(), b.llava.state_dict().values()):
        assert torch.equal(x, y), k


def test_plain_transformers_logits_equal_the_trainers(env):
    """The trainer's own input path (ChatML segments, its image preprocessing) and model vs plain transformers
    (AutoProcessor chat template + AutoModelForImageTextToText) on the same conversation and image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    ck = env["res"].checkpoints[-1]
    proj = load_mini_llava(ck)
    turns = [{"from": "human", "value": "<image>\nwhat color is the square"}, {"from": "gpt", "value": "red"}]
    ids, _, n_img = encode_conversation(proj.tokenizer, turns, proj.image_token_id, proj.n_image_tokens, 1000)
    pix = proj.preprocess(_image(env)).unsqueeze(0)
    ours = proj.logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pix)

    processor = AutoProcessor.from_pretrained(ck)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the square"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]  # fmt: skip
    text = processor.apply_chat_template(msgs, tokenize=False)
    inputs = processor(text=[text], images=[_image(env)], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids and n_img == 1  # same tokens, image slots included
    torch.testing.assert_close(inputs["pixel_values"], pix)
    for cls in (LlavaForConditionalGeneration, AutoModelForImageTextToText):
        hf = cls.from_pretrained(ck).eval()
        with torch.no_grad():
            theirs = hf(**inputs).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # ... and both are the model as defined: open_clip tower (last block, class token dropped) -> MLP projector
    # -> LM, with the projected patches in the image slots (the tower rebuilt from open_clip, not from the file)
    import open_clip

    torch.manual_seed(0)  # build_mini_llava's seed: the same random tower
    visual = open_clip.create_model(env["clip"]).visual.eval()
    with torch.no_grad():
        feats = visual.forward_intermediates(pix, indices=1, intermediates_only=True, output_fmt="NLC",
                                             normalize_intermediates=False)["image_intermediates"][-1]  # fmt: skip
        p = hf.model.multi_modal_projector
        proj = p.linear_2(torch.nn.functional.gelu(p.linear_1(feats)))
        ids_t = torch.tensor([ids])
        emb = hf.model.language_model.embed_tokens(ids_t)
        emb[ids_t == hf.config.image_token_id] = proj.reshape(-1, proj.shape[-1])
        ref = hf.lm_head(hf.model.language_model(inputs_embeds=emb).last_hidden_state)
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-5)


def test_generate_through_plain_transformers(env):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ck = env["res"].checkpoints[-1]
    model = LlavaForConditionalGeneration.from_pretrained(ck)
    processor = AutoProcessor.from_pretrained(ck)
    processor.tokenizer.padding_side = "left"
    prompts = ["what color is the square", "how many"]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                           add_generation_prompt=True, tokenize=False) for p in prompts]  # fmt: skip
    inputs = processor(text=texts, images=[_image(env, 0), _image(env, 1)], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new.shape[0] == 2 and (new != processor.tokenizer.pad_token_id).any()
    texts_out = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    # the trained model answers in the training vocabulary, and the trainer's own generate agrees
    assert all(t and set(t.split()) <= set(" ".join(r["conversations"][1]["value"] for r, _ in env["records"]).split()
               + ["two", "how", "many"]) for t in texts_out), texts_out  # fmt: skip
    assert load_mini_llava(ck).generate([[_image(env, 0)], [_image(env, 1)]], prompts, max_new_tokens=8) == texts_out


def test_tensor_names_are_stable_and_only_the_trained_parts_move(env):
    from safetensors.torch import load_file

    e1, e2 = (load_file(f"{c}/model.safetensors") for c in env["res"].checkpoints)
    assert list(e1) == list(e2) and all(k.startswith(FROZEN_PREFIXES + TRAINED_PREFIXES) for k in e1)
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.") for k in e1)
    for k in e1:
        same = torch.equal(e1[k], e2[k])
        if k.startswith(FROZEN_PREFIXES):
            assert same, k
    assert not torch.equal(e1["multi_modal_projector.linear_1.weight"], e2["multi_modal_projector.linear_1.weight"])
    assert not torch.equal(e1["language_model.model.layers.0.mlp.up_proj.weight"],
                           e2["language_model.model.layers.0.mlp.up_proj.weight"])  # fmt: skip
    # the tower in the file is the open_clip tower the run started from, converted
    fresh = build_mini_llava(env["clip"], env["lm"], device="cpu")
    for k, v in fresh.vision.state_dict().items():
        assert torch.equal(e2["vision_tower.vision_model." + k], v), k
    # a build is fully determined by (tower, LM, seed): no uninitialised memory survives the fast construction
    again = build_mini_llava(env["clip"], env["lm"], device="cpu")
    for (k, v), w in zip(fresh.llava.state_dict().items(), again.llava.state_dict().values()):
        assert torch.equal(v, w) and torch.isfinite(v).all(), k
