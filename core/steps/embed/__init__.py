"""Embedding step: open_clip (SigLIP2 by default) image and text embeddings of WDS shards on Ray actors.

Public API: `EmbedConfig`, `tiny_embed_config`, `siglip2_embed_config`, `SigLIP2ImageEmbedder`,
`SigLIP2TextEmbedder`, `embed_shards`, `load_embeddings`. See docs/embed.md.
"""

from core.steps.embed.config import EmbedConfig, siglip2_embed_config, tiny_embed_config
from core.steps.embed.model import SigLIP2ImageEmbedder, SigLIP2TextEmbedder, as_ray_actor, load_model
from core.steps.embed.pipeline import EmbedIncomplete, EmbedSummary, embed_shards
from core.steps.embed.store import load_embeddings

__all__ = [
    "EmbedConfig",
    "EmbedIncomplete",
    "EmbedSummary",
    "SigLIP2ImageEmbedder",
    "SigLIP2TextEmbedder",
    "as_ray_actor",
    "embed_shards",
    "load_embeddings",
    "load_model",
    "siglip2_embed_config",
    "tiny_embed_config",
]
