"""The built-in model as a Hugging Face LLaVA: open_clip vision towers converted to HF vision models, the
processor (image processor + tokenizer + chat template) and the `LlavaConfig` that ties them together.

The trainer's model *is* a `transformers.LlavaForConditionalGeneration` (see `core/train/mini_llava.py`), so
a checkpoint is a plain HF folder that `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` load without project code (and vLLM serves by its architecture name). Only
the start of a run needs this module: the open_clip tower the user names is converted once, exactly:

- open_clip's own ViT (`VisionTransformer`, CLIP-style: class token, `ln_pre`) -> `CLIPVisionModel`
- a timm SigLIP-style ViT inside open_clip (`TimmModel`, no class token, no `ln_pre`) -> `SiglipVisionModel`

A tower with parts these HF classes lack (layer scale, qk-norm, attentional pooler, ...) is refused
with the reason, never converted approximately. Image features are LLaVA's: the hidden states of the
last block (`vision_feature_layer=-1`), before the tower's final norm, without the class token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

IMAGE_TOKEN = "<image>"

# ChatML, like core/models/tiny_lm.py, plus list content (`{"type": "image"}` / `{"type": "text"}` parts): the image
# parts become `<image>` placeholders in front of the text, then a newline, as in the LLaVA training data
# (`"<image>\n<question>"`). The processor expands each `<image>` to the tower's patch count.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set n_img = 0 %}"
    "{% else %}"
    "{% set n_img = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% set body = ('<image>' * n_img) + ('\\n' if n_img > 0 else '') + text %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ body + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ body + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class UnsupportedTower(ValueError):
    """The open_clip tower has no exact Hugging Face equivalent."""


def _ln(m: Any, what: str) -> float:
    if type(m).__name__ not in ("LayerNorm", "LayerNormFp32") or not isinstance(m, nn.LayerNorm):
        raise UnsupportedTower(f"{what} is {type(m).__name__}, not a LayerNorm")
    return float(m.eps)


def _identity(m: Any, what: str) -> None:
    if not isinstance(m, nn.Identity):
        raise UnsupportedTower(f"{what} ({type(m).__name__}) has no HF CLIP/SigLIP equivalent")


def _act(m: Any, what: str) -> str:
    name = type(m).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(m, nn.GELU):
        return "gelu" if m.approximate == "none" else "gelu_pytorch_tanh"
    raise UnsupportedTower(f"{what} activation {name} has no HF equivalent here")


def _square(v: Any, what: str) -> int:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if a != b:
        raise UnsupportedTower(f"{what} {v} is not square")
    return int(a)


def _clip_from_open_clip(visual: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """open_clip `VisionTransformer` -> (CLIPVisionConfig, CLIPVisionModel state dict)."""
    from transformers import CLIPVisionConfig

    blocks = list(visual.transformer.resblocks)
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedTower("attentional pooler")
    # patch dropout acts in training mode only; the frozen tower always runs in eval mode
    eps = _ln(visual.ln_pre, "ln_pre")
    act = None
    for i, b in enumerate(blocks):
        if type(b).__name__ != "ResidualAttentionBlock" or not isinstance(b.attn, nn.MultiheadAttention):
            raise UnsupportedTower(f"block {i} is {type(b).__name__} (custom attention)")
        _identity(b.ls_1, f"block {i} layer scale")
        _identity(b.ls_2, f"block {i} layer scale")
        _identity(getattr(b, "ln_attn", nn.Identity()), f"block {i} ln_attn")
        if _ln(b.ln_1, "ln_1") != eps or _ln(b.ln_2, "ln_2") != eps:
            raise UnsupportedTower("layer norms with different eps")
        a = _act(b.mlp.gelu, f"block {i}")
        if act not in (None, a):
            raise UnsupportedTower("blocks with different activations")
        act = a
        _identity(getattr(b.mlp, "ln", nn.Identity()), f"block {i} mlp ln")
    width = visual.conv1.out_channels
    patch = _square(visual.conv1.kernel_size, "patch size")
    size = _square(visual.image_size, "image size")
    cfg = CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, image_size=size, patch_size=patch, hidden_act=act,
        layer_norm_eps=eps, projection_dim=int(getattr(visual, "output_dim", width) or width), num_channels=3,
    )
    sd = visual.state_dict()
    out = {
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"], "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"], "post_layernorm.bias": sd["ln_post.bias"],
    }  # fmt: skip
    for i in range(len(blocks)):
        o, h = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[o + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[o + "attn.in_proj_bias"].chunk(3)
        out.update({
            h + "self_attn.q_proj.weight": q, h + "self_attn.q_proj.bias": qb,
            h + "self_attn.k_proj.weight": k, h + "self_attn.k_proj.bias": kb,
            h + "self_attn.v_proj.weight": v, h + "self_attn.v_proj.bias": vb,
            h + "self_attn.out_proj.weight": sd[o + "attn.out_proj.weight"],
            h + "self_attn.out_proj.bias": sd[o + "attn.out_proj.bias"],
            h + "layer_norm1.weight": sd[o + "ln_1.weight"], h + "layer_norm1.bias": sd[o + "ln_1.bias"],
            h + "layer_norm2.weight": sd[o + "ln_2.weight"], h + "layer_norm2.bias": sd[o + "ln_2.bias"],
            h + "mlp.fc1.weight": sd[o + "mlp.c_fc.weight"], h + "mlp.fc1.bias": sd[o + "mlp.c_fc.bias"],
            h + "mlp.fc2.weight": sd[o + "mlp.c_proj.weight"], h + "mlp.fc2.bias": sd[o + "mlp.c_proj.bias"],
        })  # fmt: skip
    return cfg, out


def _siglip_from_timm(trunk: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """timm `VisionTransformer` without class token (SigLIP / SigLIP2 fixed resolution) -> (SiglipVisionConfig,
    SiglipVisionModel state dict, without the pooling head: LLaVA uses patch tokens)."""
    from transformers import SiglipVisionConfig

    if getattr(trunk, "cls_token", None) is not None or getattr(trunk, "num_prefix_tokens", 0) != 0:
        raise UnsupportedTower("timm ViT with class/register tokens (no SigLIP equivalent)")
    n_patches = trunk.patch_embed.num_patches
    if getattr(trunk, "pos_embed", None) is None or tuple(trunk.pos_embed.shape[-2:]) != (n_patches, trunk.embed_dim):
        raise UnsupportedTower("no learned absolute position embedding per patch")
    _identity(trunk.norm_pre, "norm_pre")
    _identity(getattr(trunk.patch_embed, "norm", nn.Identity()), "patch-embed norm")
    if getattr(trunk.patch_embed, "dynamic_img_size", False) or getattr(trunk, "dynamic_img_size", False):
        raise UnsupportedTower("dynamic image size")
    blocks = list(trunk.blocks)
    eps = _ln(trunk.norm, "final norm")
    act = None
    for i, b in enumerate(blocks):
        if type(b).__name__ != "Block":
            raise UnsupportedTower(f"block {i} is {type(b).__name__}")
        for part in ("ls1", "ls2", "drop_path1", "drop_path2"):
            _identity(getattr(b, part, nn.Identity()), f"block {i} {part}")
        _identity(b.attn.q_norm, f"block {i} q_norm")
        _identity(b.attn.k_norm, f"block {i} k_norm")
        _identity(getattr(b.attn, "norm", nn.Identity()), f"block {i} attn norm")
        _identity(getattr(b.mlp, "norm", nn.Identity()), f"block {i} mlp norm")
        if _ln(b.norm1, "norm1") != eps or _ln(b.norm2, "norm2") != eps:
            raise UnsupportedTower("layer norms with different eps")
        a = _act(b.mlp.act, f"block {i}")
        if act not in (None, a):
            raise UnsupportedTower("blocks with different activations")
        act = a
        if b.attn.qkv.bias is None:
            raise UnsupportedTower("qkv without bias")
    proj = trunk.patch_embed.proj
    width = proj.out_channels
    cfg = SiglipVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.fc1.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, image_size=_square(trunk.patch_embed.img_size, "image size"),
        patch_size=_square(proj.kernel_size, "patch size"), hidden_act=act, layer_norm_eps=eps, num_channels=3,
        vision_use_head=False,
    )
    sd = trunk.state_dict()
    out = {
        "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": sd["patch_embed.proj.bias"],
        "embeddings.position_embedding.weight": sd["pos_embed"].reshape(-1, width),
        "post_layernorm.weight": sd["norm.weight"], "post_layernorm.bias": sd["norm.bias"],
    }  # fmt: skip
    for i in range(len(blocks)):
        o, h = f"blocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[o + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[o + "attn.qkv.bias"].chunk(3)
        out.update({
            h + "self_attn.q_proj.weight": q, h + "self_attn.q_proj.bias": qb,
            h + "self_attn.k_proj.weight": k, h + "self_attn.k_proj.bias": kb,
            h + "self_attn.v_proj.weight": v, h + "self_attn.v_proj.bias": vb,
            h + "self_attn.out_proj.weight": sd[o + "attn.proj.weight"],
            h + "self_attn.out_proj.bias": sd[o + "attn.proj.bias"],
            h + "layer_norm1.weight": sd[o + "norm1.weight"], h + "layer_norm1.bias": sd[o + "norm1.bias"],
            h + "layer_norm2.weight": sd[o + "norm2.weight"], h + "layer_norm2.bias": sd[o + "norm2.bias"],
            h + "mlp.fc1.weight": sd[o + "mlp.fc1.weight"], h + "mlp.fc1.bias": sd[o + "mlp.fc1.bias"],
            h + "mlp.fc2.weight": sd[o + "mlp.fc2.weight"], h + "mlp.fc2.bias": sd[o + "mlp.fc2.bias"],
        })  # fmt: skip
    return cfg, out


def hf_vision_tower(visual: Any) -> tuple[Any, dict[str, torch.Tensor], str]:
    """An open_clip image tower as (HF vision config, its weights under HF names, LLaVA feature strategy).

    Strategy "default" drops the class token (CLIP); "full" keeps every token (SigLIP has none)."""
    kind = type(visual).__name__
    if kind == "VisionTransformer":
        cfg, sd = _clip_from_open_clip(visual)
        return cfg, {k: v.detach().clone().contiguous() for k, v in sd.items()}, "default"
    if kind == "TimmModel" and type(visual.trunk).__name__ == "VisionTransformer":
        cfg, sd = _siglip_from_timm(visual.trunk)
        return cfg, {k: v.detach().clone().contiguous() for k, v in sd.items()}, "full"
    raise UnsupportedTower(f"open_clip tower {kind} (only ViT towers map to HF CLIP/SigLIP vision models)")


def image_processor(visual: Any, vision_config: Any) -> Any:
    """The HF image processor doing open_clip's eval preprocessing of `visual` (resize, crop, normalise).

    open_clip "shortest" resizes the short side then centre-crops (CLIP); "squash" resizes to the exact
    size (SigLIP). Both run PIL bicubic resizes, like open_clip's torchvision transforms on PIL images."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    pc = dict(visual.preprocess_cfg)
    size = pc["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if (h, w) != (vision_config.image_size, vision_config.image_size):
        raise UnsupportedTower(f"preprocess size {(h, w)} != tower image size {vision_config.image_size}")
    interp = {"bicubic": 3, "bilinear": 2}.get(pc.get("interpolation", "bicubic"))
    if interp is None:
        raise UnsupportedTower(f"interpolation {pc.get('interpolation')}")
    common = dict(do_resize=True, resample=interp, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=list(pc["mean"]), image_std=list(pc["std"]), do_convert_rgb=True)
    mode = pc.get("resize_mode", "shortest")
    if mode == "shortest" and h == w:
        return CLIPImageProcessor(size={"shortest_edge": h}, do_center_crop=True, crop_size={"height": h, "width": w},
                                  **common)  # fmt: skip
    if mode == "squash":
        return SiglipImageProcessor(size={"height": h, "width": w}, **common)
    raise UnsupportedTower(f"open_clip resize_mode {mode!r}")


# Module names (transformers 5) -> tensor names in model.safetensors: the llava-hf layout that the
# hub's LLaVA checkpoints, transformers 4.x/5.x and vLLM's LlavaForConditionalGeneration all read.
_FILE_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
FROZEN_PREFIXES = ("vision_tower.",)  # tensor-name prefixes the trainer never changes
TRAINED_PREFIXES = ("multi_modal_projector.", "language_model.")


def checkpoint_tensors(llava: Any) -> dict[str, torch.Tensor]:
    """The LLaVA's weights under their llava-hf file names (contiguous CPU tensors; a tied LM head is stored
    once, as the embedding, as transformers does)."""
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(llava.config, "tie_word_embeddings", False))
    for name, t in llava.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        for src, dst in _FILE_PREFIXES:
            if name.startswith(src):
                out[dst + name[len(src):]] = t.detach().contiguous().cpu()
                break
        else:
            raise KeyError(f"unexpected LLaVA parameter {name!r}")
    return out
