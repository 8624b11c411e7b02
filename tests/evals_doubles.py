"""Test doubles for the eval runner (tests only): deterministic backends that answer from the fixtures'
ground truth, echo, or fail on purpose."""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np

from core.evals.backends import GenRequest
from core.evals.base import EvalItem
from core.evals.registry import get_benchmark


def image_key(images) -> str:
    h = hashlib.sha1()
    for im in images:
        h.update(im.convert("RGB").tobytes())
    return h.hexdigest()


def ideal_answer(bench: str, item: EvalItem) -> str:
    """What a perfect model would reply, in the format each prompt asks for."""
    t = item.target
    if bench == "countbench":
        return str(t)
    if bench == "docvqa":
        return t[0]
    if bench in ("chartqa", "realworldqa"):
        return str(t)
    if bench == "pixmo_points":
        import io

        from PIL import Image

        w, h = Image.open(io.BytesIO(item.images[0])).size
        pts = t["points"]
        if not pts:
            return "There are none."
        label = item.question
        if len(pts) == 1:  # Molmo's point format (its PointingEval checks the format)
            return f'<point x="{pts[0][0] / w * 100:.2f}" y="{pts[0][1] / h * 100:.2f}" alt="{label}">{label}</point>'
        attrs = " ".join(f'x{i}="{p[0] / w * 100:.2f}" y{i}="{p[1] / h * 100:.2f}"' for i, p in enumerate(pts, 1))
        return f'<points {attrs} alt="{label}">{label}</points>'
    raise KeyError(bench)


def oracle_table(cache_dir: str, benches: list[str]) -> dict[tuple[str, str], str]:
    """(prompt, image hash) -> ideal answer for every loadable, decodable fixture item."""
    from core.evals.runner import decode_images

    table = {}
    for name in benches:
        b = get_benchmark(name)
        for item in b.load(os.path.join(cache_dir, name)):
            if not isinstance(item, EvalItem):
                continue
            try:
                images = decode_images(item)
            except Exception:
                continue
            table[(b.prompt(item), image_key(images))] = ideal_answer(name, item)
    return table


class OracleBackend:
    """Answers from the ground-truth table; replies `wrong` for checkpoints whose dir contains WRONG, and
    raises for prompts containing `fail_on`."""

    def __init__(self, table, checkpoint_dir: str, fail_on: str = ""):
        self.table = table
        self.wrong = os.path.exists(os.path.join(checkpoint_dir, "WRONG"))
        self.fail_on = fail_on
        self.calls = 0
        self.lock = threading.Lock()

    def generate(self, requests: list[GenRequest]) -> list[str]:
        with self.lock:
            self.calls += 1
        out = []
        for r in requests:
            if self.fail_on and self.fail_on in r.prompt:
                raise RuntimeError("planted generation failure")
            out.append("I cannot tell" if self.wrong else self.table[(r.prompt, image_key(r.images))])
        return out

    def close(self) -> None:
        pass


def make_tiny_llava(out: str, seed: int = 0) -> str:
    """A random 1-layer LLaVA (CLIP vision + Llama text) with a BPE tokenizer, chat template and processor,
    saved as an HF model directory: loads with AutoProcessor + AutoModelForImageTextToText."""
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

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    words = "how many red circles are in the image what is total answer question point color blue green".split()
    rng = np.random.default_rng(0)
    tk.train_from_iterator(
        [" ".join(rng.choice(words, 10)) for _ in range(200)],
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<image>"],
    )
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(out)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    )
    proc.save_pretrained(out)
    return out
