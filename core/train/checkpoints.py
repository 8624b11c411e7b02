"""Checkpoint I/O of the built-in trainer: atomic `checkpoints/<name>` dirs (model, optimizer + scheduler + RNG,
`trainer_state.json` with the resume position and a portable config), listing, pruning of mid-epoch
checkpoints, mirroring to `mirror_uri`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from core.train.config import TrainConfig
from core.train.mini_llava import MiniLlava

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


ASIDE = ".old"  # a checkpoint being replaced waits under `<name>.old` until its successor is in place


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(global_step, dir) of complete checkpoints (state file present), oldest first.

    A checkpoint that a crash left under `<name>.old` (its replacement never arrived) counts under that
    path until `recover_checkpoints` renames it back; one whose replacement did arrive is ignored."""
    root = Path(output_dir) / "checkpoints"
    out = []
    for d in root.glob("*") if root.is_dir() else []:
        f = d / STATE_FILE
        if not d.is_dir() or d.name.endswith(".tmp") or not f.is_file():
            continue
        if d.name.endswith(ASIDE) and (root / d.name[: -len(ASIDE)]).exists():
            continue
        out.append((json.loads(f.read_text())["global_step"], d))
    return sorted(out, key=lambda x: (x[0], _base_name(x[1]).startswith("epoch")))


def _base_name(d: Path) -> str:
    return d.name[: -len(ASIDE)] if d.name.endswith(ASIDE) else d.name


def recover_checkpoints(output_dir: str | Path) -> None:
    """Finish a publish that a crash interrupted: `<name>.old` goes back to `<name>` when the new one never
    arrived, and is deleted when it did; unfinished `*.tmp` directories are removed."""
    root = Path(output_dir) / "checkpoints"
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if d.name.endswith(ASIDE):
            final = root / d.name[: -len(ASIDE)]
            if (final / STATE_FILE).is_file():
                shutil.rmtree(d, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(d, final)
        elif d.name.endswith(".tmp"):
            shutil.rmtree(d, ignore_errors=True)


def _save_checkpoint(model: MiniLlava, opt: Any, sched: Any, cfg: TrainConfig, name: str,
                     state: dict[str, Any]) -> Path:
    """Write `checkpoints/<name>` atomically: a crash never leaves a half checkpoint, nor a moment without one.

    The checkpoint is written into a fresh temporary sibling (`mkdtemp`: two writers never share one), then
    renamed into place. When `<name>` already exists it is first renamed aside to `<name>.old`, the new one
    renamed in, and only then is the old one deleted: at every instant a complete checkpoint is on disk
    (`recover_checkpoints` finishes the swap after a crash between the two renames)."""
    root = Path(cfg.output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, aside = root / name, root / (name + ASIDE)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", suffix=".tmp", dir=root))
    try:
        model.save(tmp)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / OPTIM_FILE)
        state = {**state, "config": portable_config(cfg, final), "run_name": cfg.run_name}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final, aside)
    return final


def publish_dir(tmp: Path, final: Path, aside: Path) -> None:
    """Move the finished directory `tmp` to `final`, replacing what is there without a gap (see above)."""
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def portable_config(cfg: TrainConfig, ckpt_dir: Path) -> dict[str, Any]:
    """The config as recorded in a checkpoint: local paths relative to the checkpoint dir (a checkpoint holds no
    absolute path, so a moved run directory still reads right); URLs and model names stay as they are."""
    out = cfg.to_dict()
    for key in ("output_dir", "lm_path", "init_from", "vision_model", "vision_pretrained"):
        v = out.get(key)
        if not isinstance(v, str):
            continue
        prefix = "local-dir:" if v.startswith("local-dir:") else ""
        path = v[len(prefix):]
        if "://" not in path and os.path.isabs(path):
            out[key] = prefix + os.path.relpath(path, ckpt_dir)
    return out


def _publish(cfg: TrainConfig, ckpt: Path) -> None:
    """Prune old mid-epoch checkpoints, then mirror the new one when `mirror_uri` is set."""
    _prune_step_checkpoints(cfg)
    if cfg.mirror_uri:
        from core.train.storage import push

        push(ckpt, cfg.output_dir, cfg.mirror_uri)


def _prune_step_checkpoints(cfg: TrainConfig) -> None:
    """Drop mid-epoch checkpoints older than the newest epoch checkpoint, then all but the newest K."""
    ck = list_checkpoints(cfg.output_dir)
    last_epoch = max((s for s, d in ck if d.name.startswith("epoch-")), default=-1)
    steps = [d for s, d in ck if d.name.startswith("step-")]
    stale = [d for s, d in ck if d.name.startswith("step-") and s <= last_epoch]
    fresh = [d for d in steps if d not in stale]
    for d in stale + fresh[: max(0, len(fresh) - cfg.keep_step_checkpoints)]:
        shutil.rmtree(d, ignore_errors=True)



def _finished_list(out: Path) -> list[str]:
    """Epoch checkpoints in order, plus a final step checkpoint if the run stopped mid-epoch."""
    ck = list_checkpoints(out)
    epochs = [str(d) for _, d in ck if d.name.startswith("epoch-")]
    if ck and ck[-1][1].name.startswith("step-"):
        if json.loads((ck[-1][1] / STATE_FILE).read_text()).get("done"):
            epochs.append(str(ck[-1][1]))
    return epochs
