"""Perplexity ablation workflow: reference LM -> perplexity scores -> range filter or slices (wiring only)."""

from typing import Optional

from flytekit import LaunchPlan, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from core.foundation.configs import preset
from core.steps.perplexity.config import PerplexityConfig
from core.steps.perplexity.slices import SliceConfig
from tasks.perplexity import score_perplexity, slice_by_perplexity, train_reference_lm
from tasks.types import StepOut, step_out


@workflow
def perplexity_slices(
    run: FlyteDirectory,
    reference_ids: Optional[FlyteFile] = None,
    config: PerplexityConfig = preset(PerplexityConfig, "reference"),
    slice_config: SliceConfig = preset(SliceConfig, "deciles"),
    lm_steps: int = 300,
) -> StepOut:
    """Score an ingested run with the embedded tiny LM and cut it by perplexity.

    :param run: Ingest output directory (shards/ + ledger/ingest).
    :param reference_ids: JSON ids (list, or an object with a "clean" list) the reference LM trains on.
    :param config: PerplexityConfig (mode assistant_only or text, device, ...; `model` is the trained reference LM).
    :param slice_config: SliceConfig: `slices` (equal-size id lists, the default) or `range` (drop above high_pct).
    :param lm_steps: Training steps of the reference LM.
    """
    ingested = step_out(dir=run, step="ingest")
    model = train_reference_lm(run=ingested, reference_ids=reference_ids, steps=lm_steps)
    scores = score_perplexity(run=ingested, model=model, prev=ingested, config=config)
    return slice_by_perplexity(scores=scores, config=slice_config)


perplexity_deciles = LaunchPlan.get_or_create(perplexity_slices, name="perplexity_deciles",
                                              default_inputs={"slice_config": preset(SliceConfig, "deciles")})
perplexity_filter_p90 = LaunchPlan.get_or_create(perplexity_slices, name="perplexity_filter_p90",
                                                 default_inputs={"slice_config": preset(SliceConfig, "p90")})
