"""LLM rephrasing of conversation turns for token efficiency, validated, with a token-savings report."""

from core.rephrase.chunks import rephrase_chunk
from core.rephrase.config import (
    PRESETS,
    RephraseConfig,
    preset_config,
    qwen_rephrase_config,
    tiny_rephrase_config,
)
from core.rephrase.generate import Generation, Generator, TransformersGenerator, VLLMGenerator, make_generator
from core.rephrase.report import summarize, write_report
from core.rephrase.step import RephraseStep, ShardSummary, read_rephrased, rephrase_shards
from core.rephrase.tokens import TokenCounter
from core.rephrase.validate import REJECT_REASONS, protect, validate_rephrasing

__all__ = [
    "PRESETS",
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
    "preset_config",
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
