"""Perplexity scoring of conversations (text / assistant_only / vlm modes) and perplexity slices."""

from core.steps.perplexity.config import PerplexityConfig, qwen_perplexity_config, tiny_perplexity_config
from core.steps.perplexity.encode import Encoded, EncodeError, Encoder
from core.steps.perplexity.pipeline import PerplexityStep, read_scores, score_shards
from core.steps.perplexity.scorer import BatchStats, PerplexityScorer, SampleScore, make_batches, naive_scores
from core.steps.perplexity.slices import SliceConfig, slice_by_perplexity
from core.steps.perplexity.vlm import HFVLMScorer, VLMScorer

__all__ = [
    "BatchStats", "HFVLMScorer", "EncodeError", "Encoded", "Encoder", "PerplexityConfig", "PerplexityScorer",
    "PerplexityStep", "SampleScore", "SliceConfig", "VLMScorer", "make_batches", "naive_scores", "qwen_perplexity_config",
    "read_scores", "score_shards", "slice_by_perplexity", "tiny_perplexity_config",
]
