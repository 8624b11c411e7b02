"""The `vlm` mode interface: a scorer that expands images with a vision-language model.

Not bundled: the project has no small VLM to ship. A VLM scorer expands each `<image>` placeholder into
the model's image tokens (pixels through its vision tower), gives those positions label -100 (like every
other unscored span), and scores the assistant-turn tokens. Anything implementing `VLMScorer` plugs into
`score_shards(..., scorer=...)` with `PerplexityConfig(mode="vlm")`; samples then come with
`image_bytes` loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from core.perplexity.scorer import SampleScore
    from core.sample import Sample


@runtime_checkable
class VLMScorer(Protocol):
    """Scores samples with images; one `SampleScore` per input sample, in order.

    Contract: image tokens and non-assistant spans never count (label -100); `n_scored == 0` gives NaN
    with `reason="ppl_no_scored_tokens"`; `truncated` says whether the sequence was cut.
    """

    def score(self, samples: Sequence[Sample]) -> list[SampleScore]: ...
