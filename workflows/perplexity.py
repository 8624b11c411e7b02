"""Perplexity ablation workflow: reference LM -> perplexity scores -> range filter or slices (wiring only)."""

from typing import Optional

from flytekit import LaunchPlan, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from tasks.perplexity import score_perplexity, slice_by_perplexity, train_reference_lm


@workflow
def perplexity_slices(
    run: FlyteDirectory,
    reference_ids: Optional[FlyteFile] = None,
    mode: str = "assistant_only",
    slice_mode: str = "slices",
    n_slices: int = 10,
    high_pct: float = 90.0,
    lm_steps: int = 300,
) -> FlyteDirectory:
    """Score an ingested run with the embedded tiny LM and cut it by perplexity.

    :param run: Ingest output directory (shards/ + ledger/ingest).
    :param reference_ids: JSON ids (list, or an object with a "clean" list) the reference LM trains on.
    :param mode: Scoring mode: assistant_only or text.
    :param slice_mode: `slices` (equal-size id lists) or `range` (drop above high_pct).
    :param n_slices: Number of slices in slices mode.
    :param high_pct: Highest kept percentile in range mode.
    :param lm_steps: Training steps of the reference LM.
    """
    model = train_reference_lm(run=run, reference_ids=reference_ids, steps=lm_steps)
    scores = score_perplexity(run=run, model=model, prev=run, prev_step="ingest", mode=mode)
    return slice_by_perplexity(scores=scores, mode=slice_mode, n_slices=n_slices, high_pct=high_pct)


perplexity_deciles = LaunchPlan.get_or_create(perplexity_slices, name="perplexity_deciles",
                                              default_inputs={"slice_mode": "slices", "n_slices": 10})
perplexity_filter_p90 = LaunchPlan.get_or_create(perplexity_slices, name="perplexity_filter_p90",
                                                 default_inputs={"slice_mode": "range", "high_pct": 90.0})
