"""A tiny causal LM + byte-level BPE tokenizer that the project trains itself, in seconds, on CPU.

It is the embedded default model for the demo and the tests (perplexity, rephrasing, training,
evaluation): a real, trained model, so perplexity ranks the demo's planted garbage worst, yet small
enough that no download is needed. Production configs point at real model directories instead.

    path = ensure_tiny_lm(".cache/tiny_lm", texts)          # trains once per machine, then reuses it
    tok = AutoTokenizer.from_pretrained(path)                # PreTrainedTokenizerFast, ChatML template
    model = AutoModelForCausalLM.from_pretrained(path)       # LlamaForCausalLM

Tokenizer: byte-level BPE (any text round-trips), with `<image>` as one added token that is never
split and survives `decode(..., skip_special_tokens=True)`, and the special tokens `<|im_start|>`,
`<|im_end|>`, `<pad>` (pad), `<s>` (bos, not added automatically) and `</s>` (eos).
Chat template: ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n`, roles user/assistant/system),
with `{% generation %}` around assistant content so `return_assistant_tokens_mask=True` works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
META_FILE = "tiny_lm.json"
FORMAT_VERSION = 2  # bump when training changes, so ensure_tiny_lm retrains stale directories

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A text is either a plain string (trained as is) or a conversation: a list of {"role", "content"}
# messages (roles user/assistant/system), rendered with the ChatML template before training.
TrainText = str | Sequence[dict[str, str]]


def build_tokenizer(texts: Sequence[str], vocab_size: int = 2000) -> Any:
    """Train a byte-level BPE tokenizer on `texts`; return a transformers `PreTrainedTokenizerFast`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(list(texts), trainer=trainer)
    # Not special: one id, never split, and kept by decode(skip_special_tokens=True) so rephrasing
    # and generation preserve placeholders.
    tk.add_tokens([AddedToken(IMAGE_TOKEN, special=False, normalized=False, single_word=False)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        model_max_length=1 << 20,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def render_chatml(messages: Sequence[dict[str, str]]) -> str:
    """The ChatML string the template renders for `messages` (pure Python, no tokenizer needed)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def _as_string(t: TrainText) -> str:
    if isinstance(t, str):
        return t
    return render_chatml(t)


def train_tiny_lm(
    texts: Sequence[TrainText],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 2000,
    steps: int = 300,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_len: int = 256,
    batch_size: int = 8,
    seq_len: int = 128,
    lr: float = 3e-3,
    threads: int = 1,
) -> str:
    """Train tokenizer + tiny `LlamaForCausalLM` from scratch on `texts`; save both to `out_dir`.

    `texts` are plain strings or conversations (lists of `{"role", "content"}`, rendered as ChatML).
    Every text is wrapped as `<s> text </s>`; the token stream is cut into `seq_len` blocks and trained with AdamW
    (cosine schedule) for `steps` steps of `batch_size` blocks. Deterministic for a given seed: the
    thread count is pinned to `threads` while training (float reduction order depends on it).
    Writes `tiny_lm.json` (params, loss curve) next to the weights. Returns `out_dir` as a string.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not texts:
        raise ValueError("train_tiny_lm needs at least one text")
    t0 = time.time()
    strings = [_as_string(t) for t in texts]
    tok = build_tokenizer(strings, vocab_size=vocab_size)
    seq_len = min(seq_len, max_len)

    stream: list[int] = []
    for s in strings:  # <s> text </s>: scorers that prepend BOS see what training saw
        stream.append(tok.bos_token_id)
        stream.extend(tok(s, add_special_tokens=False)["input_ids"])
        stream.append(tok.eos_token_id)
    # Repeat a short corpus so there are at least batch_size blocks to sample from.
    while len(stream) < (seq_len + 1) * batch_size:
        stream = stream + stream
    data = torch.tensor(stream, dtype=torch.long)
    n_blocks = (len(data) - 1) // seq_len

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_len,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, warmup=max(1, steps // 20)))
        losses: list[float] = []
        for step in range(steps):
            # Random block offsets (not only aligned blocks) give more distinct windows per epoch.
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
            x = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
            out = model(input_ids=x[:, :-1], labels=x[:, :-1])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(out.loss.item())
            if step % 50 == 0 or step == steps - 1:
                log.info("tiny_lm step %d/%d loss %.3f", step + 1, steps, losses[-1])
    finally:
        torch.set_num_threads(old_threads)

    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    # Chat replies end with <|im_end|>; plain text with </s>: generation stops at either.
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(IM_END), tok.eos_token_id]
    model.generation_config.bos_token_id = tok.bos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = {
        "format_version": FORMAT_VERSION,
        "params": _params(vocab_size, steps, seed, hidden, layers, heads, max_len, batch_size, seq_len, lr),
        "n_texts": len(strings),
        "n_train_tokens": len(stream),
        "n_blocks": n_blocks,
        "vocab_size_actual": len(tok),
        "losses": losses,
        "seconds": round(time.time() - t0, 2),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    log.info("tiny_lm trained in %.1fs: loss %.3f -> %.3f", meta["seconds"], losses[0], losses[-1])
    return str(out)


def ensure_tiny_lm(out_dir: str | os.PathLike, texts: Sequence[TrainText], **params: Any) -> str:
    """Return `out_dir` holding a tiny LM trained on exactly `texts` with `params`; train if missing.

    The directory is reused when its `tiny_lm.json` carries the same key (a hash of the texts, the
    parameters and the format version). Otherwise the model comes from the machine's shared cache
    (`shared_model_dir`: trained there once, under a file lock, by whichever process needs it first; training
    is deterministic, so a cached model has the bytes a fresh training would give) and is copied into a
    temporary directory that is swapped in, so a crash never leaves a half-written model behind.
    """
    out = Path(out_dir)
    key = tiny_lm_key(texts, **params)
    if _has_key(out, key):
        return str(out)
    shared = shared_model_dir(key)
    if shared is not None:
        _build_shared(shared, key, texts, params)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if shared is not None:
        shutil.copytree(shared, tmp)
    else:
        _train_keyed(texts, tmp, key, params)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def _has_key(d: Path, key: str) -> bool:
    try:
        return json.loads((d / META_FILE).read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):  # missing or unreadable metadata: not this model
        return False


def _train_keyed(texts: Sequence[TrainText], dest: Path, key: str, params: dict[str, Any]) -> None:
    train_tiny_lm(texts, dest, **params)
    meta = json.loads((dest / META_FILE).read_text())
    meta["key"] = key
    (dest / META_FILE).write_text(json.dumps(meta, indent=1))


def _build_shared(shared: Path, key: str, texts: Sequence[TrainText], params: dict[str, Any]) -> None:
    """Train into the shared cache folder `shared` unless it holds the model already (one trainer at a time:
    a POSIX advisory lock; the others wait, then reuse)."""
    import fcntl

    shared.parent.mkdir(parents=True, exist_ok=True)
    with open(str(shared) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _has_key(shared, key):
                tmp = shared.with_name(shared.name + f".tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                _train_keyed(texts, tmp, key, params)
                shutil.rmtree(shared, ignore_errors=True)
                os.replace(tmp, shared)
            else:
                log.info("tiny_lm: reusing %s", shared)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shared_model_dir(key: str) -> Path | None:
    """Where the machine's shared cache keeps the tiny LM of `key`: `<cache>/tiny_lm/<key>-<build>`, with
    `<cache>` = MMCURATE_CACHE or ~/.cache/mmcurate (the folder of the trained tiny embed model too,
    `core.steps.embed.tiny_train.shared_cache_dir`) and `<build>` a hash of this module's source and the torch,
    transformers and tokenizers versions (training code or libraries change: another folder). None when
    MMCURATE_TINY_LM_CACHE=0 (train in place, as before)."""
    if os.environ.get("MMCURATE_TINY_LM_CACHE", "1") == "0":
        return None
    root = Path(os.environ.get("MMCURATE_CACHE") or Path.home() / ".cache" / "mmcurate")
    return root / "tiny_lm" / f"{key[:32]}-{_build_tag()}"


def _build_tag() -> str:
    from importlib.metadata import version

    h = hashlib.sha256(Path(__file__).read_bytes())
    for pkg in ("torch", "transformers", "tokenizers"):
        h.update(f"{pkg}=={version(pkg)}".encode())
    return h.hexdigest()[:12]


def tiny_lm_key(texts: Sequence[TrainText], **params: Any) -> str:
    """Hash identifying a trained tiny LM: texts, training parameters and the format version."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "params": params}, sort_keys=True).encode())
    for t in texts:
        h.update(json.dumps(t, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _params(*vals: Any) -> dict[str, Any]:
    names = ("vocab_size", "steps", "seed", "hidden", "layers", "heads", "max_len", "batch_size", "seq_len", "lr")
    return dict(zip(names, vals))


def _warmup_cosine(total: int, warmup: int):
    import math

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f
