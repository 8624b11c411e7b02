"""Training metrics: JSONL rows on rank 0, mirrored to W&B (an active run, or one started when asked)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from core.train.config import TrainConfig

log = logging.getLogger(__name__)


class Metrics:
    """Append-only JSONL on rank 0; on resume, rows after the checkpoint's step are dropped first.

    W&B (rank 0 only): a run already active in this process gets every row (the flytekit W&B plugin starts
    one around the training task, see tasks/train.py); else, with `cfg.wandb_project`, a run is started here
    (and finished in `close`). wandb is never imported just to look for an active run.
    """

    def __init__(self, cfg: TrainConfig, rank: int, resume_step: int | None):
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.rank = rank
        self.wandb = None
        self.owns_wandb = False
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r)["step"] <= resume_step]
            self.path.write_text("".join(r + "\n" for r in keep))
        active = active_wandb_run()
        if active is not None:
            if cfg.wandb_project and cfg.wandb_project != getattr(active, "project", None):
                log.info("a W&B run is already active (project %s): logging to it, not to wandb_project=%s",
                         getattr(active, "project", None), cfg.wandb_project)
            self.wandb = active
            active.config.update(cfg.to_dict(), allow_val_change=True)
        elif cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("wandb_project=%s but wandb is not installed; metrics go to %s only",
                            cfg.wandb_project, self.path)
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                                        config=cfg.to_dict(), resume="allow")
                self.owns_wandb = True

    def log(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        """Finish the W&B run this object started; a run started by someone else is theirs to finish."""
        if self.wandb is not None and self.owns_wandb:
            self.wandb.finish()


def active_wandb_run() -> Any:
    """The W&B run active in this process (`wandb.run`), or None; None too when wandb was never imported."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None
