"""What makes two trainings the same run: the config fields that change the result, and fingerprints of the
model and data inputs. A checkpoint records it (`trainer_state.json` `identity`); `train` compares it before
resuming or answering "already finished", so a changed config never gets the old checkpoints back.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.foundation.fingerprint import describe_diff, diff_fields, dir_fingerprint
from core.train.config import TrainConfig
from core.train.data import data_fingerprint

log = logging.getLogger(__name__)

# Fields that change what is trained (schedule, data order, model). Left out on purpose: where the run lives
# (output_dir, mirror_uri), how it is logged or checkpointed (wandb_*, log_every_n_steps, val_every_n_steps,
# ckpt_every_n_steps, keep_step_checkpoints, run_name), and the machine (device, num_workers, world shape:
# an elastic restart may get another one).
COMPARED = ("stage", "epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "lr_schedule", "max_seq_len",
            "max_steps", "val_size", "seed")
# Run-time paths (a Flyte task downloads them to a fresh folder per attempt): compared by fingerprint.
FINGERPRINTED = ("vision_model", "vision_pretrained", "lm_path", "init_from")
SUPERSEDED = "superseded"


class RunMismatchError(ValueError):
    """`output_dir` holds checkpoints of a different run (config or data); nothing was trained or returned."""


def run_identity(cfg: TrainConfig, shards: Sequence[str], val_shards: Sequence[str] | None = None) -> dict[str, Any]:
    """The identity of a training: compared config fields, input fingerprints, data fingerprints."""
    ident: dict[str, Any] = {k: getattr(cfg, k) for k in COMPARED}
    ident.update({k: dir_fingerprint(getattr(cfg, k)) for k in FINGERPRINTED})
    ident["data"] = data_fingerprint(shards)
    ident["val_data"] = data_fingerprint(val_shards) if val_shards is not None else ""
    return ident


def identity_diff(state: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose recorded value (in a checkpoint's state) differs from `current`. A checkpoint written before
    identities were recorded is compared on the config fields its portable config holds."""
    recorded = state.get("identity")
    if recorded is None:
        cfg = state.get("config", {})
        recorded = {k: cfg[k] for k in COMPARED if k in cfg}
        current = {k: v for k, v in current.items() if k in recorded}
        log.warning("checkpoint without a recorded identity: compared on %s only", sorted(recorded))
    return diff_fields(recorded, current)


def check_same_run(out: Path, state: dict[str, Any], current: dict[str, Any], on_change: str) -> bool:
    """True when `out`'s newest checkpoint belongs to the run `current` describes. Otherwise raise
    RunMismatchError naming the differing fields, or (on_change="restart") return False: the caller moves the
    old run aside (`move_run_aside`) and trains from scratch."""
    diff = identity_diff(state, current)
    if not diff:
        return True
    what = describe_diff(diff)
    if on_change == "restart":
        log.warning("%s holds another run (%s): it is moved aside and training starts over", out, what)
        return False
    raise RunMismatchError(
        f"{out} holds checkpoints of a different run ({what}); not resumed and not returned as finished. Use a "
        f"new output_dir / checkpoint_uri, or set on_config_change='restart' to move the old run aside")


def move_run_aside(out: Path) -> Path:
    """Move `checkpoints/` and `metrics.jsonl` of `out` to `out/superseded/<UTC time>/` (kept, never mixed)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = out / SUPERSEDED / stamp
    dest.mkdir(parents=True)
    for name in ("checkpoints", "metrics.jsonl"):
        if (out / name).exists():
            os.replace(out / name, dest / name)
    (out / "checkpoints").mkdir()
    log.info("previous run moved to %s", dest)
    return dest


__all__ = ["RunMismatchError", "check_same_run", "identity_diff", "move_run_aside", "run_identity"]
