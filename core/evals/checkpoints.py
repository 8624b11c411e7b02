"""Checkpoints as the evaluation sees them: names, where they sit in training (step, epoch, variant), listing
them under a prefix, and `CheckpointStore`, which holds one local copy per worker."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def checkpoint_name(uri: str) -> str:
    """The checkpoint's last path component ('s3://b/run/epoch_3/' -> 'epoch_3')."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


_STEP_RE = re.compile(r"(?:^|[-_])(?:step|checkpoint|global_step|iter)[-_]?(\d+)$", re.IGNORECASE)
_EPOCH_RE = re.compile(r"(?:^|[-_])(?:epoch|ep)[-_]?(\d+)$", re.IGNORECASE)
STATE_FILE = "trainer_state.json"  # written by core/train next to every checkpoint


@dataclass(frozen=True)
class CheckpointPosition:
    """Where a checkpoint sits in training: global step, epoch (fractional mid-epoch) and its variant."""

    step: int | None
    epoch: float | None
    variant: str


def checkpoint_variant(uri: str) -> str:
    """The training run a checkpoint belongs to: the directory holding it, skipping a `checkpoints/` level
    (`s3://b/runs/dedup10/checkpoints/epoch-0002` -> `dedup10`)."""
    parts = [p for p in uri.rstrip("/").split("/") if p]
    parents = parts[:-1]
    if parents and parents[-1] == "checkpoints":
        parents = parents[:-1]
    return parents[-1] if parents else ""


def _read_state(uri: str) -> dict[str, Any] | None:
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(uri)
        with fs.open(path.rstrip("/") + "/" + STATE_FILE, "r") as f:
            state = json.load(f)
        return state if isinstance(state, dict) else None
    except (FileNotFoundError, ValueError):
        return None
    except Exception as e:  # unreachable store, no credentials, ...: the name still gives step or epoch
        log.warning("cannot read %s of %s (%s: %s); step/epoch come from its name", STATE_FILE, uri,
                    type(e).__name__, e)  # fmt: skip
        return None


_POSITIONS: dict[str, CheckpointPosition] = {}


def checkpoint_position(uri: str) -> CheckpointPosition:
    """Step and epoch of a checkpoint: from its `trainer_state.json` when present (global_step; epoch =
    completed epochs + step_in_epoch / steps_per_epoch, or the float epoch of a transformers Trainer
    state), else from its name: `step-00000030`,
    `checkpoint-300`, `global_step300` are steps, `epoch-0003`, `epoch_3`, `ep3` are epochs; other names
    give neither. Cached per URI (read once per run)."""
    if uri in _POSITIONS:
        return _POSITIONS[uri]
    step: int | None = None
    epoch: float | None = None
    state = _read_state(uri) if uri else None
    if state is not None and isinstance(state.get("global_step"), int):
        step = state["global_step"]
        spe = (state.get("data") or {}).get("steps_per_epoch")
        ep, sie = state.get("epoch"), state.get("step_in_epoch")
        if isinstance(ep, (int, float)) and not isinstance(ep, bool):  # HF Trainer's state: a float epoch
            epoch = float(ep) + (sie / spe if isinstance(sie, int) and spe else 0.0)
    else:
        name = checkpoint_name(uri)
        if m := _STEP_RE.search(name):
            step = int(m.group(1))
        elif m := _EPOCH_RE.search(name):
            epoch = float(m.group(1))
    run_name = state.get("run_name") if state is not None else None
    variant = run_name if isinstance(run_name, str) and run_name else checkpoint_variant(uri)
    pos = CheckpointPosition(step, epoch, variant)
    _POSITIONS[uri] = pos
    return pos


def checkpoint_epoch(uri: str) -> float | None:
    """The checkpoint's epoch (see `checkpoint_position`); None for a step-named checkpoint without state."""
    return checkpoint_position(uri).epoch


def checkpoint_step(uri: str) -> int | None:
    """The checkpoint's global step (see `checkpoint_position`)."""
    return checkpoint_position(uri).step


def position_fields(checkpoint: str) -> dict[str, Any]:
    """The checkpoint columns of a record or summary row: URI, name, variant, step, epoch."""
    pos = checkpoint_position(checkpoint) if checkpoint else CheckpointPosition(None, None, "")
    return {"checkpoint": checkpoint, "checkpoint_name": checkpoint_name(checkpoint) if checkpoint else "",
            "variant": pos.variant, "step": pos.step, "epoch": pos.epoch}  # fmt: skip


def list_checkpoints(prefix: str, pattern: str = "*") -> list[str]:
    """Checkpoint directories directly under `prefix` (local path or fsspec URL) whose name matches
    `pattern`, sorted by step (or epoch) then name."""
    import fnmatch

    from fsspec.core import url_to_fs

    fs, path = url_to_fs(prefix)
    proto = prefix.split("://", 1)[0] + "://" if "://" in prefix else ""
    out = []
    for info in fs.ls(path, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "directory" and fnmatch.fnmatch(name, pattern):
            full = info["name"]
            out.append(proto + full if proto and not full.startswith(proto) else full)

    def order(u: str) -> tuple:
        p = checkpoint_position(u)
        return (p.step is None and p.epoch is None, p.step if p.step is not None else -1, p.epoch or 0.0, u)

    return sorted(out, key=order)


class CheckpointStore:
    """Downloads a checkpoint directory to a local temp dir (fsspec `get`) and deletes it afterwards. The
    runner calls `fetch` once per worker and `release` in a `finally`."""

    def __init__(self, local_dir: str = ""):
        self.local_dir = local_dir or None

    def fetch(self, uri: str) -> str:
        """Copy `uri` (directory, local path or URL) to a fresh local directory; return its path."""
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(uri)
        if not fs.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {uri}")
        dest = tempfile.mkdtemp(prefix="ckpt-", dir=self.local_dir)
        target = os.path.join(dest, checkpoint_name(uri))
        fs.get(path.rstrip("/") + "/", target + "/", recursive=True)
        return target

    def release(self, local_path: str) -> None:
        """Delete the local copy made by `fetch`."""
        shutil.rmtree(os.path.dirname(local_path), ignore_errors=True)
