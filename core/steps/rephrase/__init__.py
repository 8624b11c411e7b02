"""LLM rephrasing of conversation turns for token efficiency, validated, with a token-savings report."""

from core.steps.rephrase.chunks import rephrase_chunk
from core.steps.rephrase.config import (
    RephraseConfig,
    qwen_rephrase_config,
    tiny_rephrase_config,
)
from core.steps.rephrase.generate import Generation, Generator, TransformersGenerator, VLLMGenerator, make_generator
from core.steps.rephrase.report import summarize, write_report
from core.steps.rephrase.step import RephraseStep, ShardSummary, read_rephrased, rephrase_shards
from core.steps.rephrase.tokens import TokenCounter
from core.steps.rephrase.validate import REJECT_REASONS, protect, validate_rephrasing

__all__ = [
    "REJECT_REASONS",
    "Generation",
    "Generator",
    "RephraseConfig",
    "RephraseStep",
    "ShardSummary",
    "TokenCounter",
    "TransformersGenerator",
    "VLLMGenerator",
    "make_generator",
    "protect",
    "qwen_rephrase_config",
    "read_rephrased",
    "rephrase_chunk",
    "rephrase_shards",
    "summarize",
    "tiny_rephrase_config",
    "validate_rephrasing",
    "write_report",
]
