"""Per-sample filters: `SampleFilter` (core/steps/filters/base.py), whose subclasses implement only
`decide(sample) -> (decision, reason, score)`, and the filters written with it (one module each, found by name:
`filter_class("image_filter")`). `run_filter(step, shards, out, config, prev)` runs any of them."""

from core.steps.filters.base import (
    FILTERS,
    SampleFilter,
    Verdict,
    config_json,
    filter_class,
    filter_config,
    filter_modules,
    run_filter,
)

__all__ = ["FILTERS", "SampleFilter", "Verdict", "config_json", "filter_class", "filter_config", "filter_modules",
           "run_filter"]
