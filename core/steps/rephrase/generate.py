"""Text generation backends behind one interface: transformers (CPU/GPU) and vLLM (GPU, vllm image).

A request is a chat message list (``[{"role": "system"|"user", "content": str}, ...]``); the model's
own chat template turns it into a prompt. Every request carries its own seed so results do not depend
on how requests are batched or on where a resumed run starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    """One model answer: text, why it stopped (``stop`` = EOS/stop string, ``length`` = cut by
    max_new_tokens, ``prompt_too_long`` = not run: prompt + budget exceed the model's context) and how
    many tokens were generated."""

    text: str
    finish_reason: str
    n_tokens: int


class Generator(Protocol):
    """Generates one answer per chat request, in request order."""

    def generate(self, requests: Sequence[Messages], seeds: Sequence[int]) -> list[Generation]: ...


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; explicit values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersGenerator:
    """Batched `model.generate` with left padding and the model's chat template.

    Requests are sorted by prompt length before batching (less padding); each batch is seeded from
    the first request's seed, so a fixed chunk of requests always gives the same output.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        device: str = "auto",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"tokenizer in {model_path} has no chat template; rephrasing needs a chat model")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.generated_tokens = 0
        self.generate_seconds = 0.0

    def prompt(self, messages: Messages) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, requests: Sequence[Messages], seeds: Sequence[int]) -> list[Generation]:
        import torch

        prompts = [self.prompt(m) for m in requests]
        lengths = [len(ids) for ids in self.tok(prompts, add_special_tokens=False)["input_ids"]]
        out: list[Generation | None] = [None] * len(prompts)
        # a prompt that cannot fit with its generation budget in the model's context is not run
        # (validation rejects it as unfinished) rather than silently degraded past the position limit
        ctx = getattr(self.model.config, "max_position_embeddings", None)
        fits = []
        for i, n in enumerate(lengths):
            if ctx is not None and n + self.max_new_tokens > ctx:
                out[i] = Generation("", "prompt_too_long", 0)
            else:
                fits.append(i)
        order = sorted(fits, key=lambda i: (lengths[i], i))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            sample = self.temperature > 0
            kwargs = dict(do_sample=sample, max_new_tokens=self.max_new_tokens, pad_token_id=self.tok.pad_token_id)
            if sample:
                kwargs.update(temperature=self.temperature, top_p=self.top_p)
            else:  # silence generation_config sampling defaults that greedy decoding ignores
                kwargs.update(temperature=None, top_p=None, top_k=None)
            torch.manual_seed(int(seeds[idx[0]]))
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = self.model.generate(**enc, **kwargs)
            self.generate_seconds += time.perf_counter() - t0
            new = gen[:, enc["input_ids"].shape[1] :].tolist()
            for i, ids in zip(idx, new):
                out[i] = self._decode(ids)
        return out  # type: ignore[return-value]

    def _decode(self, ids: list[int]) -> Generation:
        n = len(ids)
        reason = "length"
        for j, t in enumerate(ids):
            if t in self.eos_ids:
                n, reason = j + 1, "stop"
                break
        self.generated_tokens += n
        return Generation(self.tok.decode(ids[:n], skip_special_tokens=True), reason, n)


class VLLMGenerator:
    """vLLM offline engine: `LLM.chat` over the whole request list (vLLM schedules the batches)."""

    def __init__(
        self,
        model_path: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        tensor_parallel: int = 1,
        gpu_memory_utilization: float = 0.9,
    ):
        try:
            import vllm
        except ImportError as e:  # the CPU image has no vLLM; it lives in the vllm image (VLLM_IMAGE)
            raise RuntimeError(
                "backend='vllm' needs the vllm package (vllm image, GPU); it is not installed here. "
                "Use backend='transformers' on CPU."
            ) from e
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            tensor_parallel_size=tensor_parallel,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.generated_tokens = 0
        self.generate_seconds = 0.0

    def sampling_params(self, seed: int):
        return self._vllm.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p if self.temperature > 0 else 1.0,
            max_tokens=self.max_new_tokens,
            seed=int(seed),
        )

    def generate(self, requests: Sequence[Messages], seeds: Sequence[int]) -> list[Generation]:
        params = [self.sampling_params(s) for s in seeds]
        t0 = time.perf_counter()
        outs = self.llm.chat(list(requests), sampling_params=params, use_tqdm=False)
        self.generate_seconds += time.perf_counter() - t0
        res = []
        for o in outs:
            c = o.outputs[0]
            n = len(c.token_ids)
            self.generated_tokens += n
            res.append(Generation(c.text, c.finish_reason or "length", n))
        return res


def make_generator(cfg) -> Generator:
    """Build the generator named by `cfg.backend` (a `RephraseConfig`); loads the model once."""
    if cfg.backend == "vllm":
        return VLLMGenerator(
            cfg.model,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
            tensor_parallel=cfg.tensor_parallel,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
    if cfg.backend == "transformers":
        return TransformersGenerator(
            cfg.model,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            batch_size=cfg.batch_size,
            device=cfg.device,
        )
    raise ValueError(f"unknown backend {cfg.backend!r}")
