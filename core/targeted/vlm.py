"""VLM generators behind one interface: `generate(requests) -> list[Generation]`, in request order.

A `VLMRequest` is one image (encoded bytes), a chat (system + user text; the image goes first in the user
turn) and a seed. Two implementations:
- `TransformersVLM`: any local HF VLM loading with AutoProcessor + AutoModelForImageTextToText (the
  project's tiny LLaVA on CPU, the trainer's HF LLaVA checkpoints, a small Qwen2.5-VL on one GPU).
- `VLLMVLM`: vLLM's offline `LLM.chat` with OpenAI-style multimodal messages (the image as a base64 data
  URL), one engine per task on one GPU (vllm image). vLLM is imported inside the constructor; the
  request building (`vllm_messages`, `vllm_sampling_kwargs`) is plain Python and tested on CPU.
`Generation` (text, finish_reason: stop | length | prompt_too_long, n_tokens) is the rephrase step's.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from core.steps.rephrase.generate import Generation, resolve_device


@dataclass(frozen=True)
class VLMRequest:
    """One generation request: an encoded image, the system and user texts, a seed."""

    image: bytes
    system: str
    user: str
    seed: int


class VLMGenerator(Protocol):
    """Generates one answer per request, in request order. `name` identifies the generator in the ledger."""

    name: str

    def generate(self, requests: Sequence[VLMRequest]) -> list[Generation]: ...


def image_mime(data: bytes) -> str:
    """MIME type of encoded image bytes from their magic number (jpeg, png, webp, gif; else jpeg)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/jpeg"


def vllm_messages(req: VLMRequest) -> list[dict[str, Any]]:
    """OpenAI-style chat for `vllm.LLM.chat`: system text, then the user turn = image (data URL) + text."""
    url = f"data:{image_mime(req.image)};base64,{base64.b64encode(req.image).decode('ascii')}"
    msgs: list[dict[str, Any]] = []
    if req.system:
        msgs.append({"role": "system", "content": req.system})
    msgs.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": req.user}]})
    return msgs


def vllm_sampling_kwargs(seed: int, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request (per-request seed: batch-independent)."""
    return {"temperature": temperature, "top_p": top_p if temperature > 0 else 1.0, "max_tokens": max_new_tokens,
            "seed": int(seed)}


def hf_messages(req: VLMRequest) -> list[dict[str, Any]]:
    """The chat in the HF processor's chat-template format (one image part, then the text)."""
    msgs: list[dict[str, Any]] = []
    if req.system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": req.system}]})
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": req.user}]})
    return msgs


class TransformersVLM:
    """Batched `model.generate` of a local HF VLM; requests sorted by prompt length, each batch seeded from
    its first request's seed, so a fixed list of requests always gives the same outputs."""

    def __init__(self, model_path: str, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 batch_size: int = 8, device: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = f"transformers:{model_path.rstrip('/').rsplit('/', 1)[-1]}"
        self.device = resolve_device(device)
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        self.tok = self.processor.tokenizer
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        self.model = self.model.to(self.device).eval()
        self.max_new_tokens, self.temperature, self.top_p, self.batch_size = max_new_tokens, temperature, top_p, batch_size
        eos = self.model.generation_config.eos_token_id
        eos = self.tok.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.generate_seconds = 0.0

    def prompt(self, req: VLMRequest) -> str:
        return self.processor.apply_chat_template(hf_messages(req), add_generation_prompt=True, tokenize=False)

    def generate(self, requests: Sequence[VLMRequest]) -> list[Generation]:
        import torch

        from core.io.images import decode_image

        prompts = [self.prompt(r) for r in requests]
        lengths = [len(ids) for ids in self.tok(prompts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(requests)), key=lambda i: (lengths[i], i))
        out: list[Generation | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            images = [[decode_image(requests[i].image)] for i in idx]
            enc = self.processor(text=[prompts[i] for i in idx], images=images, return_tensors="pt", padding=True)
            enc = enc.to(self.device)
            kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.tok.pad_token_id)
            if self.temperature > 0:
                kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            torch.manual_seed(int(requests[idx[0]].seed))
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = self.model.generate(**enc, **kwargs)
            self.generate_seconds += time.perf_counter() - t0
            for i, ids in zip(idx, gen[:, enc["input_ids"].shape[1] :].tolist()):
                out[i] = self._decode(ids)
        return out  # type: ignore[return-value]

    def _decode(self, ids: list[int]) -> Generation:
        n, reason = len(ids), "length"
        for j, t in enumerate(ids):
            if t in self.eos_ids:
                n, reason = j + 1, "stop"
                break
        return Generation(self.tok.decode(ids[:n], skip_special_tokens=True), reason, n)


class VLLMVLM:
    """vLLM offline multimodal chat (vllm image, one GPU): the whole request list in one `LLM.chat`."""

    def __init__(self, model_path: str, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, tensor_parallel: int = 1, gpu_memory_utilization: float = 0.9):
        try:
            import vllm
        except ImportError as e:
            raise RuntimeError("backend='vllm' needs the vllm package (vllm image, GPU); use backend='transformers' "
                               "on CPU") from e
        self.name = f"vllm:{model_path.rstrip('/').rsplit('/', 1)[-1]}"
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_path, tensor_parallel_size=tensor_parallel, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt={"image": 1})
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.generate_seconds = 0.0

    def generate(self, requests: Sequence[VLMRequest]) -> list[Generation]:
        params = [self._vllm.SamplingParams(**vllm_sampling_kwargs(r.seed, self.max_new_tokens, self.temperature,
                                                                  self.top_p)) for r in requests]
        t0 = time.perf_counter()
        outs = self.llm.chat([vllm_messages(r) for r in requests], sampling_params=params, use_tqdm=False)
        self.generate_seconds += time.perf_counter() - t0
        return [Generation(o.outputs[0].text, o.outputs[0].finish_reason or "length", len(o.outputs[0].token_ids))
                for o in outs]


def make_vlm(cfg: Any) -> VLMGenerator:
    """The generator named by `cfg.backend` (a `TargetedConfig`); loads the model once."""
    if cfg.backend == "vllm":
        return VLLMVLM(cfg.model, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       seed=cfg.seed, tensor_parallel=cfg.tensor_parallel,
                       gpu_memory_utilization=cfg.gpu_memory_utilization)
    if cfg.backend == "transformers":
        return TransformersVLM(cfg.model, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, batch_size=cfg.batch_size, device=cfg.device)
    raise ValueError(f"unknown backend {cfg.backend!r}")
