"""Checkpoint I/O of the built-in trainer: atomic `checkpoints/<name>` dirs (model, optimizer + scheduler + RNG,
`trainer_state.json` with the resume position and a portable config), listing, pruning of mid-epoch
checkpoints, mirroring to `mirror_uri`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.train.config import TrainConfig
from core.train.mini_llava import MiniLlava

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(global_step, dir) of complete checkpoints (state file present), oldest first."""
    root = Path(output_dir) / "checkpoints"
    out = []
    for d in root.glob("*") if root.is_dir() else []:
        f = d / STATE_FILE
        if d.is_dir() and not d.name.endswith(".tmp") and f.is_file():
            out.append((json.loads(f.read_text())["global_step"], d))
    return sorted(out, key=lambda x: (x[0], x[1].name.startswith("epoch")))


def _save_checkpoint(model: MiniLlava, opt: Any, sched: Any, cfg: TrainConfig, name: str,
                     state: dict[str, Any]) -> Path:
    """Write `checkpoints/<name>` atomically (tmp dir, then rename): a crash never leaves a half checkpoint."""
    root = Path(cfg.output_dir) / "checkpoints"
    final, tmp = root / name, root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / OPTIM_FILE)
    state = {**state, "config": portable_config(cfg, final), "run_name": cfg.run_name}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


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
