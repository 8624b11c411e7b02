"""The project's tiny LM: loads offline with Auto classes, learns, generates, is deterministic."""

from __future__ import annotations

import json
import random

import pytest

from core.models.tiny_lm import IM_END, IMAGE_TOKEN, META_FILE, ensure_tiny_lm, render_chatml, train_tiny_lm


def clean_conversations(n: int = 120, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    things = ["cat", "dog", "chart", "table", "car", "tree", "person", "plane", "boat", "house"]
    colors = ["red", "blue", "green", "yellow", "white"]
    out = []
    for _ in range(n):
        t, c = rng.choice(things), rng.choice(colors)
        out.append(
            [
                {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat color is the {t} in the picture?"},
                {"role": "assistant", "content": f"The {t} in the picture is {c}."},
            ]
        )
    return out


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> str:
    return ensure_tiny_lm(tmp_path_factory.mktemp("tlm") / "model", clean_conversations(), steps=60, vocab_size=400)


def test_loads_offline_with_auto_classes_and_chat_template(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert model.config.model_type == "llama"
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    # <image> is one token, never split, even glued to text
    ids = tok("x<image>\n<image>y", add_special_tokens=False)["input_ids"]
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(img_id) == 2
    assert tok.decode(ids, skip_special_tokens=True) == "x<image>\n<image>y"
    msgs = clean_conversations(1)[0]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == render_chatml(msgs)
    assert rendered.startswith("<|im_start|>user\n<image>\n")
    # the {% generation %} block marks exactly the assistant content + <|im_end|>
    r = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    marked = [i for i, m in zip(r["input_ids"], r["assistant_masks"]) if m]
    assert tok.decode(marked) == msgs[1]["content"] + IM_END


def test_loss_decreases_and_generates(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((__import__("pathlib").Path(tiny_lm_dir) / META_FILE).read_text())
    losses = meta["losses"]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color is the dog in the picture?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "The" in new  # learned the answer pattern (trained text starts every answer with "The")


def test_ensure_reuses_and_retrains_on_change(tiny_lm_dir, tmp_path):
    import os

    before = os.path.getmtime(os.path.join(tiny_lm_dir, "model.safetensors"))
    again = ensure_tiny_lm(tiny_lm_dir, clean_conversations(), steps=60, vocab_size=400)
    assert again == tiny_lm_dir
    assert os.path.getmtime(os.path.join(tiny_lm_dir, "model.safetensors")) == before
    key1 = json.loads(open(os.path.join(tiny_lm_dir, META_FILE)).read())["key"]
    d = ensure_tiny_lm(tmp_path / "m", ["plain text only. " * 20], steps=3, vocab_size=300)
    key2 = json.loads(open(os.path.join(d, META_FILE)).read())["key"]
    assert key1 != key2


def test_deterministic_for_a_seed(tmp_path):
    import torch
    from safetensors.torch import load_file

    texts = [render_chatml(c) for c in clean_conversations(30)]
    a = train_tiny_lm(texts, tmp_path / "a", steps=5, vocab_size=300, seed=3)
    b = train_tiny_lm(texts, tmp_path / "b", steps=5, vocab_size=300, seed=3)
    c = train_tiny_lm(texts, tmp_path / "c", steps=5, vocab_size=300, seed=4)
    wa, wb, wc = (load_file(f"{d}/model.safetensors") for d in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
