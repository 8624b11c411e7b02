"""Configuration of the rephrase step: one dataclass plus named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.foundation.configs import ConfigJSON, check_ranges, register_preset
from core.runs.fanout import FanOut, gpu_cluster_fanout, tiny_fanout

DEFAULT_SYSTEM_PROMPT = (
    "You rewrite text from a visual question answering dataset so that it is as short as possible "
    "while keeping every fact, number, name and option. Reply with the rewritten text only."
)
# `{text}` is the turn to rewrite; the answer template may also use `{question}` (the preceding human
# turn, image placeholders removed) so the model can drop words that only repeat the question.
DEFAULT_HUMAN_PROMPT = (
    "Rewrite this question concisely. Keep its meaning, every number, name and answer option.\n\n{text}"
)
DEFAULT_GPT_PROMPT = (
    "Question: {question}\n\nRewrite this answer concisely. Keep every fact, number and the final "
    "answer; drop filler and repetition of the question.\n\n{text}"
)
# Answer-format instructions of LLaVA-style data: they steer the trained model's answer format, so a
# turn ending with one keeps it verbatim (it is cut off before prompting and appended afterwards).
DEFAULT_KEEP_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Answer the question with a short phrase.",
    "Please answer yes or no.",
    "Answer yes or no.",
)
DEFAULT_REFUSAL_PATTERNS = (
    r"here(?:'s| is| are)\b",
    r"sure\b",
    r"certainly\b",
    r"of course\b",
    r"(?s).*\bas an ai\b",  # anywhere in the text
    r"i (?:cannot|can't|can not|am unable|'m unable|won't)\b",
    r"i'?m sorry\b",
    r"sorry\b",
    r"(?:the )?(?:rephrased|rewritten|revised|concise|shorter) (?:version|text|question|answer)\b",
    r"rewrite:",
    r"rephrase:",
)


@dataclass
class RephraseConfig(ConfigJSON):
    """Everything the rephrase step needs. Required fields have no default.

    :param backend: ``"vllm"`` (GPU, vllm image) or ``"transformers"`` (CPU/GPU, tests, demo).
    :param model: local directory of a chat model with a chat template (HF layout); never downloaded. The presets
        leave it "": the rephrase task fills it from its `model_dir` input (or trains the tiny LM for `tiny`).
    :param tokenizer: training tokenizer directory used to count tokens before/after; empty = `model`.
    :param system_prompt: system message of every request (empty string: no system message).
    :param human_prompt: user message template for human turns; must contain ``{text}``.
    :param gpt_prompt: user message template for assistant turns; ``{text}`` and optional ``{question}``.
    :param max_new_tokens: generation budget per turn; a turn cut by it is rejected (``unfinished``).
    :param temperature: 0 = greedy; > 0 samples with `top_p`.
    :param seed: base seed; every request's seed derives from it and the sample id (resume-safe).
    :param batch_size: prompts per `model.generate` call (transformers); vLLM schedules a whole chunk.
    :param chunk_size: samples per checkpointed chunk; a crash loses at most one chunk.
    :param tensor_parallel: GPUs per vLLM engine.
    :param min_shortening: accepted only if new_tokens <= (1 - min_shortening) * old_tokens.
    :param check_numbers: reject a rephrasing that loses a number present in the original turn.
    :param min_turn_chars: turns shorter than this (placeholders removed) are copied, not rephrased.
    :param max_turn_chars: samples with a longer turn are kept unchanged (``rephrase_skipped:too_long``).
    :param device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (transformers backend).
    :param gpu_memory_utilization: vLLM KV-cache share of GPU memory.
    :param n_examples: before/after examples kept per shard for the report (accepted and rejected each).
    :param overlap_io: validate and write chunk k in a worker thread while chunk k+1 generates. Pays
        off when generation runs off the Python thread (vLLM engine process, GPU kernels); on a small
        CPU box the thread competes with `generate` for cores and the GIL.
    :param similarity_model: sentence encoder for the meaning check: ``"minilm"`` (packaged
        all-MiniLM-L6-v2), a local directory, or ``""`` to disable the check.
    :param min_similarity: a rephrased turn whose cosine similarity to the original is below this is
        rejected (``meaning_changed``).
    :param keep_suffixes: answer-format instructions kept verbatim at the end of a turn.
    :param refusal_patterns: regexes matched at the start of a rephrased turn (``refusal``).
    :param on_config_change: a shard in flight whose finished chunks were made by another config (model,
        tokenizer, prompts, generation or validation settings, chunk size): ``"refuse"`` (error naming the
        fields) or ``"recompute"`` (discard that shard's chunks and redo it).
    :param fanout: How the shards spread over workers (core/runs/fanout.py: one model or vLLM engine per worker);
        default in-process. Where and how fast it runs, never what it makes (left out of the stamp).
    """

    backend: str
    model: str
    tokenizer: str = ""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    human_prompt: str = DEFAULT_HUMAN_PROMPT
    gpt_prompt: str = DEFAULT_GPT_PROMPT
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    chunk_size: int = 256
    tensor_parallel: int = 1
    min_shortening: float = 0.05
    check_numbers: bool = True
    min_turn_chars: int = 20
    max_turn_chars: int = 6000
    device: str = "auto"
    gpu_memory_utilization: float = 0.9
    n_examples: int = 5
    overlap_io: bool = False
    similarity_model: str = "minilm"
    min_similarity: float = 0.7
    keep_suffixes: tuple[str, ...] = field(default=DEFAULT_KEEP_SUFFIXES)
    refusal_patterns: tuple[str, ...] = field(default=DEFAULT_REFUSAL_PATTERNS)
    on_config_change: str = "refuse"
    fanout: FanOut = field(default_factory=tiny_fanout)

    def __post_init__(self) -> None:
        if self.backend not in ("vllm", "transformers"):
            raise ValueError(f"backend {self.backend!r} must be 'vllm' or 'transformers'")
        if self.on_config_change not in ("refuse", "recompute"):
            raise ValueError(f"on_config_change {self.on_config_change!r} must be 'refuse' or 'recompute'")
        if "{text}" not in self.human_prompt or "{text}" not in self.gpt_prompt:
            raise ValueError("human_prompt and gpt_prompt must contain '{text}'")
        check_ranges(self, {"min_shortening": (0, 1, {"hi_open": True}), "chunk_size": (1, None),
                            "batch_size": (1, None), "max_new_tokens": (1, None), "temperature": (0, None),
                            "top_p": (0, 1, {"lo_open": True}), "tensor_parallel": (1, None),
                            "min_turn_chars": (0, None), "max_turn_chars": (1, None), "n_examples": (0, None),
                            "gpu_memory_utilization": (0, 1, {"lo_open": True}), "min_similarity": (-1, 1)})
        self.refusal_patterns = tuple(self.refusal_patterns)
        self.keep_suffixes = tuple(self.keep_suffixes)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["refusal_patterns"] = list(self.refusal_patterns)
        d["keep_suffixes"] = list(self.keep_suffixes)
        return d


@register_preset(RephraseConfig, "tiny", default=True)
def tiny_rephrase_config(model: str = "", tokenizer: str = "") -> RephraseConfig:
    """Embedded default (demo, tests): the project's tiny causal LM on CPU with the transformers backend.

    The tiny model writes poor text; expect validation to reject most of its rephrasings.
    """
    return RephraseConfig(
        backend="transformers",
        model=model,
        tokenizer=tokenizer,
        max_new_tokens=48,
        batch_size=16,
        chunk_size=64,
        device="cpu",
        n_examples=5,
    )


QWEN_MODEL_ID = "Qwen/Qwen2.5-1.5B-Instruct"


@register_preset(RephraseConfig, "qwen")
def qwen_rephrase_config(model: str = "", tokenizer: str = "") -> RephraseConfig:
    """Production: Qwen/Qwen2.5-1.5B-Instruct on vLLM (one GPU per engine), loaded from a local dir.

    `model` is the local snapshot directory of ``Qwen/Qwen2.5-1.5B-Instruct`` (no download at run
    time); `tokenizer` is the training tokenizer used for the token-savings numbers.
    """
    return RephraseConfig(
        backend="vllm",
        model=model,
        tokenizer=tokenizer,
        max_new_tokens=512,
        temperature=0.0,
        chunk_size=4096,
        tensor_parallel=1,
        device="cuda",
        overlap_io=True,  # vLLM generates in its engine process: validation/I/O hide behind it
        # one vLLM engine per GPU of the 32 x 8-GPU cluster (started once per actor, ~60-90 s), 8 per worker pod;
        # one node only: preset(RephraseConfig, "qwen", fanout=gpu_node_fanout())
        fanout=gpu_cluster_fanout(),
    )

