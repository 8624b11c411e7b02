"""Inference backends behind one interface: `VLMBackend.generate(requests) -> list[str]`, batched.

Built-in kinds (all heavy imports are lazy, inside the constructors):
- "transformers": any HF VLM that loads locally with AutoProcessor + AutoModelForImageTextToText; the built-in
  trainer's checkpoints are such folders (HF LLaVA, see docs/train.md), so they load here with no project code.
- "mini_llava": the same as "transformers" (kept so configs that name it still run).
- "vllm": vLLM offline `LLM.generate` with `multi_modal_data` (GPU image only; vLLM needs CUDA).
- "auto": "transformers" when the checkpoint has an HF `config.json` with `architectures`. vLLM is only used
  when asked for by name.
Register another kind (tests register a deterministic one) with `register_backend(kind, factory)`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class GenRequest:
    """One generation: decoded PIL images, the text prompt (no placeholders), a token budget."""

    images: list[Any]
    prompt: str
    max_new_tokens: int


class VLMBackend(Protocol):
    """A loaded model. `generate` returns one string per request, in order; it may raise for the whole
    batch (the runner then retries the batch one request at a time to isolate the failing sample)."""

    def generate(self, requests: Sequence[GenRequest]) -> list[str]: ...

    def close(self) -> None: ...


# Optional on a backend: `loglikelihood(requests: Sequence[LikelihoodRequest]) -> list[Likelihood]` (the
# early-signal metrics of core/evals/likelihood.py); the runner leaves those metrics NaN for a backend without it.


BackendFactory = Callable[[str, str], VLMBackend]  # (checkpoint_dir, device) -> backend
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(kind: str, factory: BackendFactory) -> None:
    """Make `kind` available to `load_backend`."""
    _BACKENDS[kind] = factory


def unregister_backend(kind: str) -> None:
    """Remove a registered kind (tests use this in a finally/fixture)."""
    _BACKENDS.pop(kind, None)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' if torch sees a GPU else 'cpu'; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_kind(checkpoint_dir: str) -> str:
    """'transformers' for an HF model directory (config.json with `architectures`; the built-in trainer's
    checkpoints included); anything else is an error."""
    cfg = os.path.join(checkpoint_dir, "config.json")
    if os.path.exists(cfg):
        try:
            with open(cfg) as f:
                if json.load(f).get("architectures"):
                    return "transformers"
        except (OSError, ValueError):
            pass
    raise ValueError(f"cannot tell the backend of {checkpoint_dir}: no HF config.json with architectures")


# Model construction is not thread-safe: transformers 5 builds models on the meta device through process-wide
# state, so two threads of `evaluate_checkpoints` loading at once could leave one model's weights on `meta`
# ("Cannot copy out of meta tensor", seen here). Loads are serialized; generation still runs in parallel.
_LOAD_LOCK = threading.Lock()


def load_backend(kind: str, checkpoint_dir: str, device: str = "auto") -> VLMBackend:
    """Load the model in `checkpoint_dir` (a local directory) with backend `kind` (one load at a time)."""
    if kind == "auto":
        kind = detect_kind(checkpoint_dir)
    if kind not in _BACKENDS:
        raise KeyError(f"unknown backend {kind!r}; known: {sorted(_BACKENDS)}")
    with _LOAD_LOCK:
        return _BACKENDS[kind](checkpoint_dir, device)


class TransformersBackend:
    """Any HF VLM that loads locally with AutoProcessor + AutoModelForImageTextToText; greedy decoding,
    chat template from the processor, left padding for batched generation, bf16 on GPU."""

    def __init__(self, checkpoint_dir: str, device: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(checkpoint_dir, local_files_only=True)
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint_dir, local_files_only=True, dtype=dtype).to(
            self.device
        )
        self.model.eval()

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        import torch

        texts = [chat_prompt(self.processor, r) for r in requests]
        images = [list(r.images) for r in requests]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max(r.max_new_tokens for r in requests), do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [s.strip() for s in self.processor.batch_decode(new, skip_special_tokens=True)]

    # requests per forward pass of `loglikelihood`: the logits are [batch, tokens, vocab] floats
    likelihood_batch = 8

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        """Teacher-forced likelihood of each request's continuation (core/evals/likelihood.py). A checkpoint of
        the built-in trainer (its chat template) is encoded exactly as the trainer encodes a training sample;
        any other model gets its own chat template's user turn + the continuation (its answer tokens only: its
        end-of-turn marker is not known here)."""
        from core.train.hf_llava import CHAT_TEMPLATE

        trainer = getattr(self.processor, "chat_template", None) == CHAT_TEMPLATE
        out = []
        for i in range(0, len(requests), self.likelihood_batch):
            chunk = requests[i : i + self.likelihood_batch]
            out += self._trainer_likelihoods(chunk) if trainer else [self._chat_likelihood(r) for r in chunk]
        return out

    def _trainer_likelihoods(self, requests: Sequence[Any]) -> list[Any]:
        import torch

        from core.evals.likelihood import IGNORE_INDEX, sequence_likelihoods, trainer_encoding
        from core.train.mini_llava import ImagePreprocess

        tok, cfg = self.processor.tokenizer, self.model.config
        enc = [trainer_encoding(tok, int(cfg.image_token_id), int(cfg.image_seq_length), r, max_len=1 << 30)
               for r in requests]  # eval items are never truncated
        n = max(len(ids) for ids, _ in enc)
        ids = torch.full((len(enc), n), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(enc), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for b, (x, y) in enumerate(enc):  # right padding, as the trainer's Collator
            ids[b, : len(x)], labels[b, : len(y)], mask[b, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        prep = ImagePreprocess(self.processor.image_processor)
        pix = [prep(im.convert("RGB")) for r in requests for im in r.images]
        kw = {"pixel_values": torch.stack(pix).to(self.device, self.model.dtype)} if pix else {}
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw).logits
        return sequence_likelihoods(logits.cpu(), labels)

    def _chat_likelihood(self, req: Any) -> Any:
        import torch

        from core.evals.likelihood import IGNORE_INDEX, sequence_likelihoods

        ctx = chat_prompt(self.processor, GenRequest(req.images, req.prompt, 0))
        images = [list(req.images)] if req.images else None
        full = self.processor(text=[ctx + req.continuation], images=images, return_tensors="pt").to(self.device)
        n_ctx = self.processor(text=[ctx], images=images, return_tensors="pt")["input_ids"].shape[1]
        labels = full["input_ids"].clone().cpu()
        labels[:, :n_ctx] = IGNORE_INDEX
        with torch.inference_mode():
            logits = self.model(**full).logits
        return sequence_likelihoods(logits.cpu(), labels)[0]

    def close(self) -> None:
        self.model = None


def chat_prompt(processor: Any, req: GenRequest) -> str:
    """The model's own chat template applied to one user turn: one image part per image, then the text."""
    content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip


class VLLMBackend:
    """vLLM offline inference (GPU image): the prompt comes from the checkpoint's HF processor chat template
    (same as the transformers backend), images go in `multi_modal_data` (vLLM's documented offline
    multimodal input), greedy decoding, the whole batch in one `LLM.generate`. Untested on CPU (vLLM needs
    CUDA)."""

    def __init__(self, checkpoint_dir: str, device: str = "auto", max_images: int = 4):
        from transformers import AutoProcessor
        from vllm import LLM  # GPU image only

        self.processor = AutoProcessor.from_pretrained(checkpoint_dir, local_files_only=True)
        self.llm = LLM(model=checkpoint_dir, limit_mm_per_prompt={"image": max_images})

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        from vllm import SamplingParams

        prompts = [
            {"prompt": chat_prompt(self.processor, r),
             "multi_modal_data": {"image": r.images[0] if len(r.images) == 1 else list(r.images)}}
            if r.images else {"prompt": chat_prompt(self.processor, r)}
            for r in requests
        ]  # fmt: skip
        params = SamplingParams(temperature=0.0, max_tokens=max(r.max_new_tokens for r in requests))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

    def close(self) -> None:
        self.llm = None


register_backend("mini_llava", TransformersBackend)  # the trainer's checkpoints are HF LLaVA folders
register_backend("transformers", TransformersBackend)
register_backend("vllm", VLLMBackend)
