"""Minimal LLaVA-style model: frozen vision tower -> MLP projector -> causal LM, as a Hugging Face LLaVA.

The model is a `transformers.LlavaForConditionalGeneration`: the open_clip tower named in the config is
converted once, exactly, to an HF vision model (CLIP or SigLIP, `core/train/hf_llava.py`), the projector is
LLaVA's `LlavaMultiModalProjector` (linear_1 -> GELU -> linear_2) and the LM is the HF causal LM at `lm_path`
(the project's tiny Llama by default). Each `<image>` placeholder is expanded to `n_image_tokens` copies of the
`<image>` token; LLaVA replaces the embeddings there by the projected patch features of that image, in order.

A checkpoint is a plain HF folder, loadable with no project code:

    model = LlavaForConditionalGeneration.from_pretrained(ckpt)   # config.json (model_type llava), model.safetensors
    processor = AutoProcessor.from_pretrained(ckpt)               # image processor + tokenizer + chat template

`MiniLlava` adds what the trainer needs around it (summed loss, frozen tower, stages, batched generation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from core.train.hf_llava import CHAT_TEMPLATE, IMAGE_TOKEN

log = logging.getLogger(__name__)

CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu (decided at run time on the worker, never at import)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ImagePreprocess:
    """PIL image -> pixel tensor [3, H, W] through the checkpoint's own HF image processor, so training sees
    exactly what `AutoProcessor` gives at inference (a class, not a lambda: DataLoader workers pickle it)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


class MiniLlava(nn.Module):
    """An HF `LlavaForConditionalGeneration` + its `LlavaProcessor`, with the trainer's loss and stages."""

    def __init__(self, llava: Any, processor: Any):
        super().__init__()
        self.llava = llava
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.preprocess = ImagePreprocess(processor.image_processor)
        self.image_token_id = int(llava.config.image_token_id)
        self.n_image_tokens = int(llava.config.image_seq_length)
        for p in self.vision.parameters():
            p.requires_grad_(False)
        self.vision.eval()

    # ---- model pieces -------------------------------------------------------------------------
    @property
    def vision(self) -> Any:
        return self.llava.model.vision_tower

    @property
    def projector(self) -> Any:
        return self.llava.model.multi_modal_projector

    def lm_parameters(self) -> list[Any]:
        """The LM's parameters (decoder + head; a tied head is the embedding itself)."""
        seen: dict[int, Any] = {}
        for p in [*self.llava.model.language_model.parameters(), *self.llava.lm_head.parameters()]:
            seen.setdefault(id(p), p)
        return list(seen.values())

    def train(self, mode: bool = True):  # the frozen tower stays in eval mode
        super().train(mode)
        self.vision.eval()
        return self

    def set_stage(self, stage: str) -> None:
        """`projector`: only the projector trains; `full`: projector and LM."""
        for p in self.lm_parameters():
            p.requires_grad_(stage == "full")
        for p in self.projector.parameters():
            p.requires_grad_(True)

    def logits(self, input_ids: Any, attention_mask: Any, pixel_values: Any = None) -> Any:
        """LLaVA's logits [B, T, V]; the image slots in `input_ids` must match the images exactly."""
        n_slots = int((input_ids == self.image_token_id).sum())
        n_img = 0 if pixel_values is None else int(pixel_values.shape[0])
        if n_slots != n_img * self.n_image_tokens:
            raise ValueError(f"{n_slots} image token slots != {n_img} images x {self.n_image_tokens} tokens")
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.vision.dtype)
        return self.llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits

    def forward(self, input_ids: Any, attention_mask: Any, labels: Any, pixel_values: Any = None) -> tuple[Any, Any]:
        """Summed token cross-entropy over labelled positions and the number of those positions."""
        import torch.nn.functional as F

        logits = self.logits(input_ids, attention_mask, pixel_values)
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        loss_sum = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        return loss_sum, (shift_labels != -100).sum()

    # ---- inference ----------------------------------------------------------------------------
    def generate(self, images: list[list[Any]], prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        """Batched greedy decoding through the processor (chat template, left padding), as plain
        `transformers` does it. `images[i]` are the PIL images of prompt i (placeholders are added in front
        of the prompt when it has fewer `<image>` than images)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        texts, flat = [], []
        for ims, prompt in zip(images, prompts):
            missing = len(ims) - prompt.count(IMAGE_TOKEN)
            if missing < 0:
                raise ValueError(f"prompt has {prompt.count(IMAGE_TOKEN)} <image> but {len(ims)} images")
            text = IMAGE_TOKEN * missing + ("\n" if missing else "") + prompt
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": text}],
                                                            add_generation_prompt=True, tokenize=False))
            flat += [im.convert("RGB") for im in ims]
        device = self.llava.lm_head.weight.device
        inputs = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True,
                                padding_side="left")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.vision.dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self.llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        finally:
            self.train(was_training)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ---- persistence --------------------------------------------------------------------------
    def save(self, ckpt_dir: str | Path) -> None:
        """Write an HF LLaVA folder: config.json, generation_config.json, model.safetensors (one file, the
        llava-hf tensor names of `checkpoint_tensors`), the processor (image processor, tokenizer, chat
        template). Nothing in it names a path outside the folder."""
        from safetensors.torch import save_file

        from core.train.hf_llava import checkpoint_tensors

        d = Path(ckpt_dir)
        d.mkdir(parents=True, exist_ok=True)
        cfg = self.llava.config
        for c in (cfg, cfg.text_config, cfg.vision_config):  # where the LM came from is not the checkpoint's business
            c._name_or_path = ""
        cfg.architectures = [type(self.llava).__name__]
        cfg.save_pretrained(str(d))
        self.llava.generation_config.save_pretrained(str(d))
        save_file(checkpoint_tensors(self.llava), str(d / "model.safetensors"), metadata={"format": "pt"})
        self.processor.save_pretrained(str(d))


def _open_clip_visual(name: str, pretrained: str | None) -> Any:
    """The image tower of an open_clip model name (`local-dir:`, `hf-hub:` or a registered config name)."""
    import open_clip

    if not name.startswith(("local-dir:", "hf-hub:")):
        from core.steps.embed.model import register_tiny_model

        register_tiny_model()  # the project's own configs (mmcurate-tiny-vit) are valid names everywhere
    visual = open_clip.create_model(name, pretrained=pretrained).visual  # carries its preprocess_cfg
    return visual.eval()


def _prepare_lm(lm_path: str) -> tuple[Any, Any]:
    """The HF causal LM and tokenizer at `lm_path`, with `<image>` and the ChatML markers as tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_path)
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32)
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


def _lm_to(model: MiniLlava, device: str) -> MiniLlava:
    """On CUDA the LM runs in bf16 (tower and projector stay fp32, autocast does the rest); fp32 on CPU."""
    model = model.to(device)
    if device.startswith("cuda"):
        model.llava.model.language_model.to(torch.bfloat16)
        model.llava.lm_head.to(torch.bfloat16)
    return model


def build_mini_llava(vision_model: str, lm_path: str, vision_pretrained: str | None = None, device: str = "cpu",
                     seed: int = 0) -> MiniLlava:
    """A fresh model: the open_clip tower converted to HF (frozen) + new projector (seeded init) + the LM."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from core.train.hf_llava import hf_vision_tower, image_processor

    device = resolve_device(device)
    torch.manual_seed(seed)  # a tower without pretrained weights (tests) must still be reproducible
    visual = _open_clip_visual(vision_model, vision_pretrained)
    vcfg, vsd, strategy = hf_vision_tower(visual)
    improc = image_processor(visual, vcfg)
    del visual
    tok, lm = _prepare_lm(lm_path)
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vcfg, text_config=lm.config, image_token_id=int(tok.convert_tokens_to_ids(IMAGE_TOKEN)),
        image_seq_length=n_patches, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy=strategy, multimodal_projector_bias=True,
    )
    from transformers.initialization import no_init_weights

    with no_init_weights():  # no random init of a (possibly 7B) LM that is overwritten next
        llava = LlavaForConditionalGeneration(cfg)
    llava.tie_weights()
    llava.model.vision_tower.load_state_dict(vsd, strict=True)
    llava.model.language_model.load_state_dict(lm.base_model.state_dict(), strict=True)  # LlamaModel, Qwen2Model...
    if not cfg.tie_word_embeddings:
        llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    torch.manual_seed(seed)  # the projector's init depends on the seed only
    for lin in (llava.model.multi_modal_projector.linear_1, llava.model.multi_modal_projector.linear_2):
        lin.reset_parameters()
    gen = llava.generation_config
    eos = lm.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    im_end = int(tok.convert_tokens_to_ids("<|im_end|>"))
    gen.eos_token_id = [im_end, *[e for e in eos if e != im_end]]  # chat replies end with <|im_end|>
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = lm.generation_config.bos_token_id
    processor = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=vcfg.patch_size,
                               vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1 if strategy == "default" else 0,
                               image_token=IMAGE_TOKEN)  # fmt: skip
    return _lm_to(MiniLlava(llava, processor), device)


def load_mini_llava(ckpt_dir: str | Path, device: str = "cpu") -> MiniLlava:
    """Load a checkpoint written by `MiniLlava.save` (any epoch or step checkpoint of the trainer): plain
    `LlavaForConditionalGeneration.from_pretrained` + `AutoProcessor.from_pretrained`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = resolve_device(device)
    llava = LlavaForConditionalGeneration.from_pretrained(str(ckpt_dir), dtype=torch.float32, local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(ckpt_dir), local_files_only=True)
    return _lm_to(MiniLlava(llava, processor), device).eval()
