"""Embedding step configuration: `EmbedConfig` and its presets.

`tiny_embed_config()` is the embedded default (demo, tests, CPU): a small open_clip ViT registered by this
package, trained by the project contrastively on the demo generator's image/caption pairs (core/steps/embed/tiny_train.py). `siglip2_embed_config()` is the production model, loaded from a local
cache directory, a `local-dir:` folder or an fsspec checkpoint (never from the network at run time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.foundation.configs import ConfigJSON, check_ranges, override, register_preset

TEXT_VIEWS = ("first_human", "all_human", "all")
WHAT = ("image", "text", "both")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "amp_bf16", "bf16")
OUT_DTYPES = ("float16", "float32")

TINY_MODEL_NAME = "mmcurate-tiny-vit"
SIGLIP2_MODEL_NAME = "hf-hub:timm/ViT-SO400M-14-SigLIP2-378"


@dataclass
class EmbedConfig(ConfigJSON):
    """How to embed samples.

    model_name:   any open_clip model id: a built-in name (`ViT-B-16`), `hf-hub:org/repo` (resolved from
                  `cache_dir`, offline), `local-dir:/path` or `local-dir:s3://...` (folder with
                  open_clip_config.json + weights; remote folders are copied to `cache_dir` first).
    pretrained:   for names without a schema: an open_clip tag, a checkpoint path or fsspec URL, or None
                  (random init seeded with `seed`). The tiny model with None gets its trained weights
                  (`core.steps.embed.tiny_train`: contrastive on demo-generator pairs, trained once per machine,
                  copied under cache_dir); `"random-init"` gives its untrained weights (baselines).
    precision:    fp32 | amp_bf16 (fp32 weights, bf16 autocast) | bf16 (bf16 weights + autocast);
                  bf16 modes apply on CUDA only, CPU always runs fp32.
    device:       auto | cpu | cuda.
    num_actors:   Ray actors (one model each); shards are spread over them.
    num_gpus:     GPUs reserved per actor (0 on CPU; fractional values share a GPU).
    cpus_per_actor: CPUs reserved per actor (Ray scheduling) and torch threads on CPU.
    decode_workers: threads per actor that read, decode and preprocess the next batches while the model
                  runs on the current one.
    text_view:    which conversation text is embedded: first_human | all_human | all.
    what:         image | text | both.
    out_dtype:    float16 | float32 for the stored (L2-normalised) vectors.
    max_shard_retries: how often a shard whose actor died is re-queued on a surviving actor in one run.
    prefetch_batches: batches the reader/decoders may run ahead of the model.
    jpeg_draft:   decode JPEGs at a reduced DCT scale that still covers the model's input size (much
                  cheaper; pixels differ slightly from a full decode + resize). False: full decode.
    actor_start_timeout_s: how long to wait for actors to load their model (GPU workers may still be joining).
    """

    model_name: str
    pretrained: str | None
    precision: str = "fp32"
    device: str = "auto"
    batch_size: int = 32
    num_actors: int = 2
    num_gpus: float = 0.0
    cpus_per_actor: int = 1
    decode_workers: int = 2
    text_view: str = "first_human"
    what: str = "both"
    out_dtype: str = "float16"
    cache_dir: str | None = None
    seed: int = 0
    max_shard_retries: int = 1
    prefetch_batches: int = 4
    actor_start_timeout_s: float = 900.0
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        _check("text_view", self.text_view, TEXT_VIEWS)
        _check("what", self.what, WHAT)
        _check("device", self.device, DEVICES)
        _check("precision", self.precision, PRECISIONS)
        _check("out_dtype", self.out_dtype, OUT_DTYPES)
        check_ranges(self, {"batch_size": (1, None), "num_actors": (1, None), "decode_workers": (1, None),
                            "cpus_per_actor": (1, None), "num_gpus": (0, None), "max_shard_retries": (0, None),
                            "prefetch_batches": (1, None), "actor_start_timeout_s": (0, None, {"lo_open": True})})
        if self.device == "cpu" and self.num_gpus:
            raise ValueError("device='cpu' with num_gpus > 0 would hold GPUs it never uses")
        if self.device == "cuda" and not self.num_gpus:
            raise ValueError("device='cuda' needs num_gpus > 0 so that Ray places the actor on a GPU")

    @property
    def embeds_images(self) -> bool:
        return self.what in ("image", "both")

    @property
    def embeds_texts(self) -> bool:
        return self.what in ("text", "both")

    def model_key(self) -> tuple:
        """Fields that determine the model weights and preprocessing (one loaded model per key)."""
        return (self.model_name, self.pretrained, self.precision, self.device, self.cache_dir, self.seed)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {allowed}")


@register_preset(EmbedConfig, "tiny", default=True)
def tiny_embed_config(**overrides: Any) -> EmbedConfig:
    """Embedded default: the tiny registered open_clip ViT on CPU, two actors, float32 output."""
    cfg = EmbedConfig(
        model_name=TINY_MODEL_NAME,
        pretrained=None,
        precision="fp32",
        device="cpu",
        batch_size=32,
        num_actors=2,
        num_gpus=0.0,
        cpus_per_actor=1,
        decode_workers=1,
        out_dtype="float32",
    )
    return override(cfg, **overrides)


@register_preset(EmbedConfig, "siglip2")
def siglip2_embed_config(cache_dir: str | None = None, **overrides: Any) -> EmbedConfig:
    """Production: SigLIP2 so400m/14 at 378 px, bf16 autocast on one GPU per actor, float16 output.

    Weights come from `cache_dir` (a Hugging Face cache holding timm/ViT-SO400M-14-SigLIP2-378; run with
    HF_HUB_OFFLINE=1). For weights in object storage use
    `model_name="local-dir:s3://bucket/siglip2-so400m-378"` (open_clip_config.json + weights + tokenizer).
    """
    cfg = EmbedConfig(
        model_name=SIGLIP2_MODEL_NAME,
        pretrained=None,
        precision="amp_bf16",
        device="cuda",
        batch_size=256,
        num_actors=2,
        num_gpus=1.0,
        cpus_per_actor=8,
        decode_workers=8,
        out_dtype="float16",
        cache_dir=cache_dir,
        prefetch_batches=4,
    )
    return override(cfg, **overrides)

