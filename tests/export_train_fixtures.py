"""Tiny models and WDS shards for the export/train tests (no network, built in seconds)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

TINY_CLIP = "mmcurate-export-tiny-vit"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

WORDS = ("red green blue square circle cat dog image shows a the is what color shape count two three "
         "answer question small large picture of there are how many describe").split()


def register_tiny_clip(tmp: Path) -> str:
    """Register the tiny ViT config with open_clip (CLIP BPE tokenizer by default) and return its name."""
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        d = tmp / "open_clip_cfg"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
        open_clip.add_model_config(d)
    return TINY_CLIP


def make_tiny_lm(out: Path, seed: int = 0) -> str:
    """The project's tiny LM (core/models/tiny_lm.py: byte-level BPE with `<image>`, ChatML), briefly trained."""
    from core.models.tiny_lm import train_tiny_lm

    rng = np.random.default_rng(seed)
    texts = [[{"role": "user", "content": "<image>\n" + " ".join(rng.choice(WORDS, 6))},
              {"role": "assistant", "content": " ".join(rng.choice(WORDS, 5))}] for _ in range(200)]
    return train_tiny_lm(texts, out, vocab_size=400, steps=30, hidden=64, seed=seed)


def image_bytes(rng: np.random.Generator, size: int = 32, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_records(n: int, seed: int = 0) -> list[tuple[dict, list[bytes]]]:
    """n LLaVA records: single-image, two-image and text-only ones, with their encoded images."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_img = [1, 1, 2, 0][i % 4]
        q = " ".join(rng.choice(WORDS, 6))
        a = " ".join(rng.choice(WORDS, 5))
        human = "<image>\n" * n_img + q
        turns = [{"from": "human", "value": human}, {"from": "gpt", "value": a}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "how many"}, {"from": "gpt", "value": "two"}]
        rec = {"id": f"s{i:05d}", "conversations": turns}
        imgs = [image_bytes(rng) for _ in range(n_img)]
        if n_img == 1:
            rec["image"] = f"img{i}.jpg"
        elif n_img:
            rec["image"] = [f"img{i}_{k}.jpg" for k in range(n_img)]
        out.append((rec, imgs))
    return out


def write_tar(path: Path, records: list[tuple[dict, list[bytes]]]) -> None:
    """A training-schema WDS shard (key.json + key.jpg / key.<i>.jpg) with fixed member metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for rec, imgs in records:
            key = rec["id"]
            members = [(f"{key}.json", json.dumps(rec, sort_keys=True).encode())]
            if len(imgs) == 1:
                members.append((f"{key}.jpg", imgs[0]))
            else:
                members += [(f"{key}.{k}.jpg", b) for k, b in enumerate(imgs)]
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
                tf.addfile(ti, io.BytesIO(data))


def make_tiny_clip_dir(out: Path, tmp: Path) -> str:
    """An open_clip `local-dir` (open_clip_config.json + open_clip_model.safetensors) of the tiny ViT."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    name = register_tiny_clip(tmp)
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return str(out)
