"""Configuration of targeted (MM-Gen-style) generation: prompt families and the one stage config.

A *family* is the answer format of a benchmark family (what the generated question asks for and what
its answer must look like). Its prompt and the instruction appended to the generated question are
config, so a new benchmark family is a new `FamilyPrompt`, not new code. The answer check of a family
is one of `ANSWER_FORMATS` (core/targeted/parse.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from core.foundation.configs import ConfigJSON, override, preset, register_preset
from core.runs.fanout import FanOut, tiny_fanout

ANSWER_FORMATS = ("number", "short", "letter", "points")
PPL_DIRECTIONS = ("drop_high", "drop_low", "none")
RETRIEVAL_MODES = ("nearest", "centroid")
BACKENDS = ("transformers", "vllm")


@dataclass
class FamilyPrompt:
    """How to ask a VLM for one new question/answer pair of a benchmark family.

    :param instruction: task description shown before the in-context examples.
    :param answer_format: `number` (counting), `short` (charts/docs: a word or phrase), `letter` (multiple
        choice: the question lists options `A. ...`, the answer is one letter) or `points` (pointing:
        `<point x="..." y="...">` tags with percent coordinates, the PixMo-Points format).
    :param question_suffix: appended to the generated question in the training sample (the eval's prompt
        style), e.g. "Answer the question using a single word or phrase."
    :param max_answer_words: a `short` answer longer than this is rejected (`answer_format:too_long`).
    """

    instruction: str
    answer_format: str
    question_suffix: str = ""
    max_answer_words: int = 6

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format {self.answer_format!r} not in {ANSWER_FORMATS}")


_SHAPE = (
    "Write ONE new question about the image of the same kind as the examples, and its correct answer, read "
    "from the image. Reply in exactly two lines:\nQuestion: <question>\nAnswer: <answer>"
)
FAMILIES: dict[str, FamilyPrompt] = {
    "counting": FamilyPrompt(
        "You write counting questions (CountBench style) about images.\n" + _SHAPE + "\nThe answer is one integer.",
        "number", "Answer with a single number."),
    "chart": FamilyPrompt(
        "You write chart questions (ChartQA style): value lookup, comparison, trend.\n" + _SHAPE
        + "\nThe answer is a single word, number or short phrase.",
        "short", "Answer the question using a single word or phrase."),
    "doc": FamilyPrompt(
        "You write document questions (DocVQA style) about receipts, forms and memos.\n" + _SHAPE
        + "\nThe answer is text copied from the document: a word, number or short phrase.",
        "short", "Answer the question using a single word or phrase."),
    "mcq": FamilyPrompt(
        "You write multiple-choice questions (RealWorldQA style) about images.\n" + _SHAPE
        + "\nThe question lists the options on separate lines as 'A. ...', 'B. ...'; the answer is one letter.",
        "letter", "Answer with the option's letter from the given choices directly."),
    "points": FamilyPrompt(
        "You write pointing requests (PixMo-Points style) about images.\n" + _SHAPE
        + "\nThe answer marks every object with <point x=\"X\" y=\"Y\"> (percent of width/height, 0-100).",
        "points", ""),
}


@dataclass
class TargetedConfig(ConfigJSON):
    """Everything targeted generation needs. Required fields have no default. It crosses the Flyte boundary
    whole; on the command line a partial JSON onto the `tiny` preset (`'{"budget_per_subgroup": 50}'`) or onto
    another preset (`'{"preset": "qwen2.5-vl"}'`). `device` is also the generation workers' resource profile
    (core/runs/steps.py `uses_gpu`: `cuda` one GPU per shard, `cpu` two CPUs, `auto` the run's).

    Subgroups
    :param model: local directory of the generator VLM (HF layout; never downloaded); the workflows fill it in
        from their `model_dir` input (or the tiny model they build), leave it empty.
    :param subgroup_field: reference field naming the subgroup: `source`, `metadata.<key>`; "" = k-means
        on MiniLM embeddings of the reference questions with `n_clusters`.
    :param n_clusters: k of the question clustering (subgroup_field == "").
    :param include_subgroups: subgroups to generate for (empty: all with an image).
    :param families: subgroup -> family (key of `prompts`); unlisted subgroups use `default_family`.
    :param default_family: family of subgroups not in `families`.
    :param examples_per_subgroup: example questions per subgroup in the deck.
    Retrieval
    :param retrieval: `nearest` (pool images nearest to any reference image of the subgroup) or
        `centroid` (nearest to the mean reference image vector).
    :param budget_per_subgroup: pool images retrieved per subgroup (one generated sample each).
    :param oversample: candidates mined per subgroup = budget * oversample (room for images taken by
        another subgroup).
    :param embed_kind: embedding of the pool/reference used for retrieval (`image`).
    Generation
    :param backend: `transformers` (CPU/tests/small GPU) or `vllm` (production, vllm image, one GPU).
    :param k_shot: in-context examples (reference Q/A of the subgroup) per prompt.
    :param shard_size: retrieved images per generation shard (the unit of resume and of the map task).
    :param max_parallel_shards: concurrency cap of the generation map task.
    :param filter_fanout: How the filters' per-shard steps (perplexity scoring, text decontamination) spread over
        workers in the filter task's pod (core/runs/fanout.py `FanOut`; default in-process). Scheduling only.
    :param seed: base seed; each request's seed derives from it and the generated sample id.
    Filters
    :param ppl_direction: `drop_high` (drop above the `ppl_percentile`-th percentile: disfluent text),
        `drop_low` (drop below the (100 - ppl_percentile)-th: boilerplate/template text) or `none`.
    :param ppl_percentile: percentile of the perplexity cut (see ppl_direction).
    :param dedup_eps: SemDeDup eps among generated samples (MiniLM text of question + answer).
    :param reference_max_similarity: drop a generated sample whose MiniLM similarity to a reference
        item exceeds this (copied demonstration).
    :param decontam_threshold: drop a generated question whose MiniLM similarity to an eval item's
        question exceeds this (`eval_contamination:<benchmark>`).
    """

    model: str
    subgroup_field: str = "source"
    n_clusters: int = 4
    include_subgroups: list[str] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)
    default_family: str = "chart"
    examples_per_subgroup: int = 5
    retrieval: str = "nearest"
    budget_per_subgroup: int = 100
    oversample: int = 4
    embed_kind: str = "image"
    backend: str = "transformers"
    k_shot: int = 3
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 8
    shard_size: int = 256
    max_parallel_shards: int = 4
    filter_fanout: FanOut = field(default_factory=tiny_fanout)
    device: str = "auto"
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    max_question_words: int = 60
    ppl_direction: str = "drop_high"
    ppl_percentile: float = 90.0
    dedup_eps: float = 0.05
    reference_max_similarity: float = 0.97
    decontam_threshold: float = 0.95
    prompts: dict[str, FamilyPrompt] = field(default_factory=lambda: dict(FAMILIES))
    subset_name: str = "targeted"

    def __post_init__(self) -> None:
        self.prompts = {k: (FamilyPrompt(**v) if isinstance(v, dict) else v) for k, v in self.prompts.items()}
        if isinstance(self.filter_fanout, dict):
            self.filter_fanout = FanOut(**self.filter_fanout)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an inconsistent config (called on construction)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} not in {BACKENDS}")
        if self.retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval {self.retrieval!r} not in {RETRIEVAL_MODES}")
        if self.ppl_direction not in PPL_DIRECTIONS:
            raise ValueError(f"ppl_direction {self.ppl_direction!r} not in {PPL_DIRECTIONS}")
        if not 0.0 < self.ppl_percentile <= 100.0:
            raise ValueError("ppl_percentile must be in (0, 100]")
        for name in [self.default_family, *self.families.values()]:
            if name not in self.prompts:
                raise ValueError(f"family {name!r} has no prompt; known: {sorted(self.prompts)}")
        if min(self.budget_per_subgroup, self.oversample, self.shard_size, self.max_parallel_shards,
               self.batch_size, self.max_new_tokens, self.n_clusters) < 1:
            raise ValueError("budget_per_subgroup, oversample, shard_size, max_parallel_shards, batch_size, "
                             "max_new_tokens and n_clusters must be >= 1")
        if self.k_shot < 0:
            raise ValueError("k_shot must be >= 0")
        if not self.subset_name or "/" in self.subset_name:
            raise ValueError("subset_name must be a non-empty name without '/'")

    def family_of(self, subgroup: str) -> str:
        return self.families.get(subgroup, self.default_family)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetedConfig:
        return cls(**d)


@register_preset(TargetedConfig, "tiny", default=True)
def tiny_targeted_config(model: str = "", **overrides: Any) -> TargetedConfig:
    """CPU demo/tests: the project's tiny random HF LLaVA (core/targeted/tiny_vlm.py) with transformers.

    Subgroups are the demo's scene sources (chart, count, document). The tiny model writes noise, so
    expect validation to reject most of its outputs, with their reasons in the ledger.
    """
    cfg = TargetedConfig(
        model=model, subgroup_field="source", include_subgroups=["chartqa_like", "count_like", "doc_like"],
        families={"chartqa_like": "chart", "count_like": "counting", "doc_like": "doc"},
        budget_per_subgroup=12, oversample=3, backend="transformers", k_shot=2, max_new_tokens=32,
        temperature=1.0, top_p=1.0, batch_size=8, shard_size=12, max_parallel_shards=2, device="cpu",
        subset_name="targeted_demo",
    )
    return override(cfg, **overrides) if overrides else cfg


QWEN_VL_MODEL_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


@register_preset(TargetedConfig, "qwen2.5-vl")
def qwen_vl_targeted_config(model: str = "", **overrides: Any) -> TargetedConfig:
    """Production: Qwen/Qwen2.5-VL-7B-Instruct (local snapshot in `model`) on vLLM, one GPU per shard."""
    cfg = TargetedConfig(model=model, backend="vllm", budget_per_subgroup=20_000, shard_size=4096,
                         max_parallel_shards=8, k_shot=3, max_new_tokens=256, temperature=0.7, top_p=0.9,
                         batch_size=256, device="cuda")
    return override(cfg, **overrides) if overrides else cfg


def preset_config(name: str, model: str, overrides: Optional[dict[str, Any]] = None) -> TargetedConfig:
    """Registered preset `name` (core/foundation/configs.py registry) with `overrides` (TargetedConfig fields) applied by the
    one override rule (`override`: unknown keys rejected, None is a value, validated) and `model` filled in."""
    if "model" in (overrides or {}):
        raise ValueError("unknown TargetedConfig field in overrides: 'model' (model comes from model_dir)")
    return override(preset(TargetedConfig, name, **(overrides or {})), model=model)
