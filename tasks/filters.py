"""One task for every per-sample filter (core/steps/filters/): `filter_samples(step=...)` runs the filter
registered under that step name, so a new filter needs no new task.

A filter's config crosses the boundary as canonical JSON (`core.steps.filters.config_json(cfg)`), loaded onto its
class's default preset by the one override rule: each filter has its own config class and one task cannot be
typed for all of them. The cache version covers this module's imports and every filter module (they are found
by name at run time, which the import-following `task_version` alone cannot see).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory

from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import CPU_IMAGE
from tasks.paths import resume_key, source, step_workdir
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut, passing

log = logging.getLogger(__name__)


def filters_version() -> str:
    """cache_version of `filter_samples`: this module's import closure plus every filter module's."""
    from core.steps.filters import filter_modules

    h = hashlib.sha256(task_version(__name__).encode())
    for m in filter_modules():
        h.update(m.encode() + b"\0" + task_version(m).encode())
    return h.hexdigest()[:16]


@task(container_image=CPU_IMAGE, requests=Resources(cpu="2", mem="4Gi"), retries=1, enable_deck=True, deck_fields=DECK_FIELDS, cache=True,
      cache_version=filters_version())
def filter_samples(
    run: StepOut,
    step: str,
    prev: Optional[StepOut] = None,
    config_json: str = "",
) -> StepOut:
    """Run the per-sample filter registered as `step` (e.g. `image_filter`) on every input sample of a run.

    One ledger row per input sample: keep, drop (with the filter's reason) or quarantine (unreadable records and
    images, `filter_error:<ExcType>` when the filter itself raised). Resumable per shard.

    :param run: Ingest output (StepOut "ingest": its `shards/`).
    :param step: The filter's step name (core/steps/filters: `image_filter`, ...).
    :param prev: The previous step's output; its ledger selects the input ids (None: every sample of the shards).
    :param config_json: The filter's config as JSON, merged onto its default preset ("" = the default preset),
        e.g. `{"min_side": 64}` for image_filter.
    :return: StepOut `step`: `ledger/<step>/` and `decks/<step>.html`.
    """
    from core.foundation.step import shards_of
    from core.steps.filters import filter_class, filter_config, run_filter
    from core.steps.filters.report import filter_counts, filter_report_html

    cfg = filter_config(filter_class(step), config_json)  # an unknown step or config key fails before any work
    selected = passing(prev)
    t0 = step_started(step, prev_step=prev.step if prev else "", config=config_json or "default")
    sf = step_workdir(step, resume_key("filter_samples", filters_version(), run=run, step=step, prev=prev,
                                       config=cfg))  # a retry skips the shards already decided
    out = Path(sf.path)
    summary = run_filter(step, shards_of(source(run.dir)), out, cfg, prev=selected)
    log.info("%s: %s", step, {k: v for k, v in summary.items() if k != "config"})
    counts = filter_counts(out / "ledger" / step)
    Deck(step, filter_report_html(step, counts, summary["config"]))
    save_decks(str(out), step)
    step_finished(step, t0, sf.url)
    return StepOut(step, FlyteDirectory(sf.close()))
