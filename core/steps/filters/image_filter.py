"""The image resolution / aspect-ratio filter (`image_filter`): the worked example of `SampleFilter`.

Where the thresholds come from (long side / short side is the aspect ratio; a sample is dropped when any of its
images fails, since one image cannot be cut out of a conversation that refers to it):

- `qwen2vl` (default): the limits a dynamic-resolution VLM's image processor refuses outright. Qwen2-VL's and
  Qwen2.5-VL's `smart_resize` (transformers `image_processing_qwen2_vl.py`, `qwen_vl_utils.vision_process`)
  raises for a side below its patch-merge factor 28 and for an aspect ratio above 200 (`MAX_RATIO`). A
  LLaVA-style pipeline would crash on these or skip them at train time; they are never useful, and a
  filter this loose keeps the legitimately long documents, receipts and screenshots of instruction data
  (MAmmoTH-VL's document/chart domains).
- `datacomp`: DataComp's "basic filtering" of image-text pairs (Gadre et al. 2023): smaller side >= 200 px,
  aspect ratio < 3 (here <= 3: a ratio of exactly 3.0 is kept). For caption-style pretraining sets.
- `cc3m`: Conceptual Captions' image filter (Sharma et al. 2018): both sides > 400 px, ratio <= 2; the
  strictest, for stage-1 caption sets of the LLaVA-558K kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.foundation.configs import ConfigJSON, check_ranges, register_preset
from core.foundation.sample import Sample
from core.runs.fanout import FanOut, tiny_fanout
from core.steps.filters.base import SampleFilter, Verdict


@dataclass
class ImageFilterConfig(ConfigJSON):
    """Which images are too small or too elongated to train on (presets `qwen2vl` (default), `datacomp`, `cc3m`).

    :param min_side: Smallest allowed short side in pixels: a sample with an image whose short side is below it is
        dropped as `image_too_small`.
    :param max_aspect: Largest allowed long side / short side: above it the sample is dropped as
        `image_aspect_ratio`.
    :param fanout: How the shards spread over workers (core/runs/fanout.py; default in-process).
    """

    min_side: int = 28
    max_aspect: float = 200.0
    fanout: FanOut = field(default_factory=tiny_fanout)

    def __post_init__(self) -> None:
        check_ranges(self, {"min_side": (1, None), "max_aspect": (1.0, None)})


@register_preset(ImageFilterConfig, "qwen2vl", default=True)
def qwen2vl_image_filter_config() -> ImageFilterConfig:
    """What Qwen2-VL's image processor refuses: a side < 28 px or an aspect ratio > 200."""
    return ImageFilterConfig(min_side=28, max_aspect=200.0)


@register_preset(ImageFilterConfig, "datacomp")
def datacomp_image_filter_config() -> ImageFilterConfig:
    """DataComp basic filtering: short side >= 200 px, aspect ratio <= 3."""
    return ImageFilterConfig(min_side=200, max_aspect=3.0)


@register_preset(ImageFilterConfig, "cc3m")
def cc3m_image_filter_config() -> ImageFilterConfig:
    """Conceptual Captions: both sides > 400 px, aspect ratio <= 2."""
    return ImageFilterConfig(min_side=401, max_aspect=2.0)


class ImageFilter(SampleFilter):
    """Drop samples with an image whose short side is below `min_side` (`image_too_small`) or whose aspect ratio
    exceeds `max_aspect` (`image_aspect_ratio`); score = the sample's worst aspect ratio. Text-only samples are
    kept (no score); undecodable images never get here: the base quarantines them (`corrupt_image`)."""

    name = "image_filter"
    config_class = ImageFilterConfig
    needs_images = True

    def decide(self, sample: Sample) -> Verdict:
        sizes = self.image_sizes(sample)
        if not sizes:
            return "keep", "", None
        worst = max(max(w, h) / min(w, h) for w, h in sizes)
        if min(min(w, h) for w, h in sizes) < self.config.min_side:
            return "drop", "image_too_small", worst
        return ("drop", "image_aspect_ratio", worst) if worst > self.config.max_aspect else ("keep", "", worst)
