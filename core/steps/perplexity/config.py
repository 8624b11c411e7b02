"""Configuration of the perplexity step, and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.foundation.configs import ConfigJSON, check_ranges, register_preset
from core.runs.fanout import FanOut, tiny_fanout

MODES = ("text", "assistant_only", "vlm")
TEXT_VIEWS = ("all", "assistant", "all_human")


@dataclass
class PerplexityConfig(ConfigJSON):
    """How to score samples with a causal LM.

    :param model: Local directory of any HF causal LM + tokenizer (no network at run time). The presets leave it
        "": the scoring task fills it with its `model` input (a directory known only at run time).
    :param mode: `text` (all turns joined as plain text, `<image>` placeholders removed with LLaVA's
        newline), `assistant_only` (loss only on assistant-turn content tokens, conditioned on all
        preceding turns, rendered with the model's chat template or the plain template), or `vlm`
        (as assistant_only, with the images through a VLM: `core.steps.perplexity.vlm.HFVLMScorer`).
    :param device: `cpu`, `cuda`, `cuda:N` or `auto` (cuda when available).
    :param dtype: `auto` (bf16 on cuda, fp32 on cpu), `float32`, `bfloat16` or `float16`.
    :param batch_tokens: Token budget of one batch, padding included (batch rows x longest row).
    :param max_length: Longest token sequence scored; longer samples are truncated and flagged.
    :param truncation_side: `left` keeps the end of the conversation (the last answers), `right` the start.
    :param chat_template: `auto` (the tokenizer's template, else the plain template), `model` (the
        tokenizer's, error when it has none) or `plain` (always the documented plain template).
    :param keep_image_placeholders: In `assistant_only`, keep `<image>` in the human turns as context
        (never scored either way); False strips them like `text` mode does.
    :param text_view: In `text` mode, which turns form the text: `all`, `assistant` or `all_human`.
    :param add_bos: Prepend the tokenizer's BOS token when the encoding does not already start with it
        (None: only when the tokenizer has a BOS token; the first token is then scored too).
    :param max_padding_waste: A batch is closed early when adding the next (shorter) sample would make
        more than this fraction of its tokens padding (bounds the waste; 1.0 = fill to the budget).
    :param sort_buckets: Length-bucketed batching (sort by length); False keeps input order (ablation).
    :param fanout: How the shards spread over workers (core/runs/fanout.py `FanOut`: workers, shards per group,
        CPUs/GPUs per worker); the default scores in-process. Where and how fast it runs, never what it makes: the
        step folder's stamp leaves it out.
    """

    model: str
    mode: str = "assistant_only"
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int = 8192
    max_length: int = 2048
    truncation_side: str = "left"
    chat_template: str = "auto"
    keep_image_placeholders: bool = True
    text_view: str = "all"
    add_bos: bool | None = None
    max_padding_waste: float = 0.1
    sort_buckets: bool = True
    fanout: FanOut = field(default_factory=tiny_fanout)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side {self.truncation_side!r} not in (left, right)")
        if self.chat_template not in ("auto", "model", "plain"):
            raise ValueError(f"chat_template {self.chat_template!r} not in (auto, model, plain)")
        if self.text_view not in TEXT_VIEWS:
            raise ValueError(f"text_view {self.text_view!r} not in {TEXT_VIEWS}")
        check_ranges(self, {"max_length": (2, None), "batch_tokens": (self.max_length, None),
                            "max_padding_waste": (0, 1)})


@register_preset(PerplexityConfig, "tiny")
def tiny_perplexity_config(model: str = "", mode: str = "assistant_only") -> PerplexityConfig:
    """The project's tiny LM (core/models/tiny_lm.py) on CPU, fp32: demo and tests."""
    # ~2k-token batches: on CPU larger ones spill the activations out of cache and get slower
    return PerplexityConfig(model=model, mode=mode, device="cpu", dtype="float32", batch_tokens=2048,
                            max_length=256)


@register_preset(PerplexityConfig, "qwen0.5b")
def qwen_perplexity_config(model: str = "", mode: str = "assistant_only") -> PerplexityConfig:
    """A ~0.5B chat LM (e.g. a local copy of Qwen2.5-0.5B-Instruct) in bf16 on one GPU."""
    return PerplexityConfig(model=model, mode=mode, device="auto", dtype="auto", batch_tokens=32768,
                            max_length=4096)


@register_preset(PerplexityConfig, "reference", default=True)
def reference_perplexity_config(model: str = "", mode: str = "assistant_only") -> PerplexityConfig:
    """The tiny preset with device and dtype `auto`: what `score_perplexity`, `curate` and `ablate` run by default
    with the embedded reference LM (the GPU task scores on its GPU in bf16, the CPU twin on CPU in fp32)."""
    return PerplexityConfig(model=model, mode=mode, device="auto", dtype="auto", batch_tokens=2048, max_length=256)
