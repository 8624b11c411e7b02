"""Minimal LLaVA-style model: frozen open_clip vision tower -> MLP projector -> causal LM.

Each `<image>` placeholder is expanded to `n_image_tokens` copies of the `<image>` token id; the
embeddings at those positions are replaced by the projected patch features of that image (in order).
A checkpoint directory is self-contained (vision tower config + weights, projector, LM + tokenizer), so
`load_mini_llava(ckpt_dir)` needs nothing else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from core.train.data import chatml_segments

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
MODEL_FILE = "mini_llava.json"


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu (decided at run time on the worker, never at import)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class MiniLlava(nn.Module):
    """Vision tower + projector + LM with the tokenizer and image preprocessing that go with them."""

    def __init__(self, vision: Any, projector: Any, lm: Any, tokenizer: Any, preprocess: Any, meta: dict[str, Any]):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.meta = meta
        self.image_token_id = int(meta["image_token_id"])
        self.n_image_tokens = int(meta["n_image_tokens"])
        for p in self.vision.parameters():
            p.requires_grad_(False)
        self.vision.eval()

    # ---- model pieces -------------------------------------------------------------------------
    def train(self, mode: bool = True):  # the frozen tower stays in eval mode
        super().train(mode)
        self.vision.eval()
        return self

    def set_stage(self, stage: str) -> None:
        """`projector`: only the projector trains; `full`: projector and LM."""
        for p in self.lm.parameters():
            p.requires_grad_(stage == "full")
        for p in self.projector.parameters():
            p.requires_grad_(True)

    def encode_images(self, pixel_values: Any) -> Any:
        """[n_images, 3, H, W] -> [n_images, n_image_tokens, lm_hidden] (tower frozen, projector trains)."""
        with torch.no_grad():
            feats = vision_tokens(self.vision, pixel_values)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def embed(self, input_ids: Any, pixel_values: Any) -> Any:
        emb = self.lm.get_input_embeddings()(input_ids)
        is_img = input_ids == self.image_token_id
        n_slots = int(is_img.sum())
        if n_slots:
            if pixel_values is None:
                raise ValueError(f"{n_slots} image token slots but no images")
            proj = self.encode_images(pixel_values.to(emb.device))
            if proj.shape[0] * proj.shape[1] != n_slots:
                raise ValueError(f"{n_slots} image slots != {proj.shape[0]} images x {proj.shape[1]} tokens")
            emb = emb.masked_scatter(is_img.unsqueeze(-1), proj.reshape(-1, proj.shape[-1]).to(emb.dtype))
        return emb

    def forward(self, input_ids: Any, attention_mask: Any, labels: Any, pixel_values: Any = None) -> tuple[Any, Any]:
        """Summed token cross-entropy over labelled positions and the number of those positions."""
        import torch.nn.functional as F

        emb = self.embed(input_ids, pixel_values)
        logits = self.lm(inputs_embeds=emb, attention_mask=attention_mask).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        loss_sum = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        return loss_sum, (shift_labels != -100).sum()

    # ---- inference ----------------------------------------------------------------------------
    def generate(self, images: list[list[Any]], prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        """Batched greedy decoding. `images[i]` are the PIL images of prompt i (placeholders are added in
        front of the prompt when it has fewer `<image>` than images)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        device = next(self.lm.parameters()).device
        seqs, pix = [], []
        for ims, prompt in zip(images, prompts):
            missing = len(ims) - prompt.count(IMAGE_TOKEN)
            if missing < 0:
                raise ValueError(f"prompt has {prompt.count(IMAGE_TOKEN)} <image> but {len(ims)} images")
            text = IMAGE_TOKEN * missing + ("\n" if missing else "") + prompt
            turns = [{"from": "human", "value": text}]
            ids: list[int] = []
            for seg, _ in chatml_segments(turns, IMAGE_TOKEN, self.n_image_tokens):
                ids += self.tokenizer(seg, add_special_tokens=False)["input_ids"]
            ids += self.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
            seqs.append(ids)
            pix += [self.preprocess(im.convert("RGB")) for im in ims]
        n = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for b, s in enumerate(seqs):  # left padding: every prompt ends where generation starts
            input_ids[b, n - len(s):] = torch.tensor(s)
            mask[b, n - len(s):] = 1
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                emb = self.embed(input_ids.to(device), torch.stack(pix).to(device) if pix else None)
                out = self.lm.generate(
                    inputs_embeds=emb, attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, pad_token_id=pad, eos_token_id=self.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                )
        finally:
            self.train(was_training)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ---- persistence --------------------------------------------------------------------------
    def save(self, ckpt_dir: str | Path) -> None:
        """Write a self-contained checkpoint: safetensors weights + configs + tokenizer."""
        from safetensors.torch import save_file

        d = Path(ckpt_dir)
        (d / "vision_config").mkdir(parents=True, exist_ok=True)
        (d / "vision_config" / "open_clip_config.json").write_text(json.dumps(self.meta["open_clip_config"], indent=1))
        save_file(_contig(self.vision.state_dict()), str(d / "vision_tower.safetensors"))
        save_file(_contig(self.projector.state_dict()), str(d / "projector.safetensors"))
        self.lm.save_pretrained(str(d / "lm"))
        self.tokenizer.save_pretrained(str(d / "lm"))
        (d / MODEL_FILE).write_text(json.dumps({k: v for k, v in self.meta.items() if k != "open_clip_config"}, indent=1))


def _contig(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def vision_tokens(visual: Any, pixel_values: Any) -> Any:
    """Last-block patch tokens [B, L, C] of an open_clip tower (ViT or timm), prefix tokens excluded."""
    out = visual.forward_intermediates(
        pixel_values, indices=1, intermediates_only=True, output_fmt="NLC", normalize_intermediates=True
    )
    return out["image_intermediates"][-1]


def _open_clip_config(name: str) -> dict[str, Any]:
    """The `open_clip_config.json` content ({model_cfg, preprocess_cfg}) of a model name."""
    import open_clip

    if name.startswith("local-dir:"):
        return json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text())
    if name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        return _get_hf_config(name[len("hf-hub:"):])
    from core.embed.model import register_tiny_model

    register_tiny_model()  # the project's own configs (mmcurate-tiny-vit) are valid names everywhere
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r} (register it with open_clip.add_model_config)")
    return {"model_cfg": cfg}


def _projector(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def _load_lm(lm_path: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=dtype)
    vocab = tok.get_vocab()
    missing = [t for t in [IMAGE_TOKEN, *CHAT_SPECIAL_TOKENS] if t not in vocab]
    if missing:  # any HF LM works: missing markers become special tokens with fresh embeddings
        log.info("adding special tokens %s to the tokenizer of %s", missing, lm_path)
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else "<|im_end|>"
    if len(tok) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tok))
    return tok, lm


def build_mini_llava(vision_model: str, lm_path: str, vision_pretrained: str | None = None, device: str = "cpu",
                     seed: int = 0) -> MiniLlava:
    """A fresh model: open_clip tower (frozen) + new projector (seeded init) + the LM at `lm_path`."""
    import open_clip

    device = resolve_device(device)
    torch.manual_seed(seed)  # a tower without pretrained weights (tests) must still be reproducible
    oc_cfg = _open_clip_config(vision_model)
    clip, _, preprocess = open_clip.create_model_and_transforms(vision_model, pretrained=vision_pretrained)
    visual = clip.visual
    oc_cfg = {**oc_cfg, "preprocess_cfg": dict(visual.preprocess_cfg)}
    del clip  # the text tower is not needed
    tok, lm = _load_lm(lm_path, device)
    visual.eval()
    size = visual.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.no_grad():
        feats = vision_tokens(visual, torch.zeros(1, 3, *size))
    torch.manual_seed(seed)
    projector = _projector(feats.shape[-1], lm.get_input_embeddings().weight.shape[1])
    meta = {
        "format": 1,
        "vision_model": vision_model,
        "open_clip_config": oc_cfg,
        "n_image_tokens": int(feats.shape[1]),
        "vision_dim": int(feats.shape[-1]),
        "image_token_id": int(tok.convert_tokens_to_ids(IMAGE_TOKEN)),
    }
    model = MiniLlava(visual, projector, lm, tok, preprocess, meta)
    return model.to(device)


def load_mini_llava(ckpt_dir: str | Path, device: str = "cpu") -> MiniLlava:
    """Load a checkpoint written by `MiniLlava.save` (any epoch or step checkpoint of the trainer)."""
    import open_clip
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    device = resolve_device(device)
    meta = json.loads((d / MODEL_FILE).read_text())
    oc_cfg = json.loads((d / "vision_config" / "open_clip_config.json").read_text())
    meta["open_clip_config"] = oc_cfg
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{d / 'vision_config'}")
    visual = clip.visual
    del clip
    visual.load_state_dict(load_file(str(d / "vision_tower.safetensors")))
    tok, lm = _load_lm(str(d / "lm"), device)
    projector = _projector(int(meta["vision_dim"]), lm.get_input_embeddings().weight.shape[1])
    projector.load_state_dict(load_file(str(d / "projector.safetensors")))
    model = MiniLlava(visual, projector, lm, tok, preprocess, meta)
    return model.to(device).eval()

