"""One log line when a step starts and one when it ends, with its counts (what `pyflyte run` shows locally).

The end line reads the step's own ledger (`<out_dir>/ledger/<step>/`) when there is one, so the counts are
the decisions that were recorded (keep / modify / drop / quarantine), not a second bookkeeping.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("tasks.step")


def _fmt(facts: dict[str, Any]) -> str:
    return (" " + " ".join(f"{k}={v}" for k, v in facts.items())) if facts else ""


def step_started(step: str, **facts: Any) -> float:
    """Log `step <step>: start k=v ...` and open the step's deck page (`tasks.decks.begin_decks`: decks made
    from here on are this step's); returns the start time for `step_finished`."""
    from tasks.decks import begin_decks

    log.info("step %s: start%s", step, _fmt(facts))
    begin_decks()
    return time.time()


def step_finished(step: str, t0: float, out_dir: str | None = None, **counts: Any) -> None:
    """Log `step <step>: end in Ns k=v ...`, with the ledger's decision counts when `out_dir` holds one."""
    if out_dir and "://" not in out_dir and os.path.isdir(os.path.join(out_dir, "ledger", step)):
        from core.foundation.ledger import read_ledger, step_dir

        led = read_ledger(step_dir(out_dir, step))
        counts = {"inputs": len(led), **led["decision"].value_counts().sort_index().to_dict(), **counts}
    log.info("step %s: end in %.1fs%s", step, time.time() - t0, _fmt(counts))
