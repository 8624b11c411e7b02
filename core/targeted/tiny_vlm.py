"""The project's tiny HF LLaVA for the CPU preset and tests: random weights, a byte-level BPE tokenizer
trained on the given texts (so it can spell anything), a ChatML chat template and a LLaVA processor.

It loads like any local HF VLM (AutoProcessor + AutoModelForImageTextToText), so the CPU demo runs the
real transformers backend end to end. Its weights are random: what it writes is noise, and the filters
reject nearly all of it (with reasons) — that is the honest expectation of the CPU preset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKER = "mmcurate_tiny_vlm.json"


def build_tiny_llava(out_dir: str | os.PathLike, texts: Sequence[str], seed: int = 0, vocab_size: int = 1000) -> str:
    """Write a tiny random LLaVA (1-layer CLIP vision 32px + 1-layer Llama) to `out_dir`; reuse it when the
    marker says it was built from the same texts and seed. Returns the directory."""
    import hashlib

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    key = hashlib.sha256(json.dumps([list(texts), seed, vocab_size]).encode()).hexdigest()[:16]
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return str(out)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(texts) or ["Question: Answer:"], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1).save_pretrained(out)
    marker.write_text(json.dumps({"key": key, "seed": seed, "n_texts": len(texts)}))
    return str(out)


def train_tiny_llava(model_dir: str, examples: Sequence[tuple[bytes, str, str, str]], steps: int = 200,
                     batch_size: int = 8, lr: float = 3e-3, seed: int = 0) -> dict:
    """Teach the tiny LLaVA the reply shape on reference data: `examples` are (image bytes, system, user
    prompt, target reply); loss on the reply tokens only. Saves the weights in place; returns the losses.

    A few hundred CPU steps teach it the `Question: ...` / `Answer: ...` frame and the reference vocabulary,
    not to read images: most of what it writes is still rejected by parsing and the filters.
    """
    import random

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from core.io.images import decode_image
    from core.targeted.vlm import VLMRequest, hf_messages

    if not examples:
        raise ValueError("train_tiny_llava needs at least one example")
    proc = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).train()
    tok = proc.tokenizer
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        prompts = [proc.apply_chat_template(hf_messages(VLMRequest(b, s, u, 0)), add_generation_prompt=True,
                                            tokenize=False) for b, s, u, _ in batch]
        texts = [p + t + tok.eos_token for p, (_, _, _, t) in zip(prompts, batch)]
        images = [[decode_image(b)] for b, _, _, _ in batch]
        tok.padding_side = "right"
        enc = proc(text=texts, images=images, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, p in enumerate(prompts):
            n_prompt = len(proc(text=[p], images=[images[i]], return_tensors="pt")["input_ids"][0])
            labels[i, :n_prompt] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval().save_pretrained(model_dir)
    info = {"steps": steps, "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}
    (Path(model_dir) / "mmcurate_tiny_vlm_train.json").write_text(json.dumps(info))
    return info


def training_examples(ref_shards: Sequence[str], ref, pools: dict, cfg) -> list[tuple[bytes, str, str, str]]:
    """(image, system, user prompt, target reply) per used reference sample, with the generation prompt of
    its subgroup (k other examples of the subgroup) and its own first Q/A pair as the target."""
    from core.io.wds import iter_samples
    from core.steps.rephrase.chunks import request_seed
    from core.targeted.generate import SYSTEM_PROMPT, build_user_prompt, pick_examples

    used = ref[ref["used"]].set_index("ref_id")
    out = []
    for s in iter_samples(ref_shards, include_ids=set(used.index), verify_images=False):
        r = used.loc[s.id]
        others = [e for e in pools.get(r.subgroup, []) if e["ref_id"] != s.id]
        ex = pick_examples(others, cfg.k_shot, request_seed(cfg.seed, s.id, 1))
        out.append((s.image_bytes[0], SYSTEM_PROMPT, build_user_prompt(cfg.prompts[r.family], ex),
                    f"Question: {r.question}\nAnswer: {r.answer}"))
    return out
