"""The training loop of the built-in trainer: DDP (gloo on CPU, nccl on GPU), validation every N steps on a
fixed held-out set, a checkpoint every epoch and every K steps, metrics to JSONL (+ W&B: an active run, or one
started when asked), and resume from the newest checkpoint with the same data order.

Data order is a pure function of (seed, epoch) (`data.epoch_order`), and a checkpoint records
(epoch, step_in_epoch), so a resumed run trains on exactly the batches the killed run had not done yet.

Distributed helpers are in `core/train/distributed.py`, checkpoint I/O in `core/train/checkpoints.py`, metrics
in `core/train/metrics.py`; `STATE_FILE`, `OPTIM_FILE` and `list_checkpoints` stay importable from here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.foundation.log import progress
from core.train.checkpoints import (
    OPTIM_FILE,
    STATE_FILE,
    _finished_list,
    _publish,
    _save_checkpoint,
    list_checkpoints,
    recover_checkpoints,
)
from core.train.config import TrainConfig
from core.train.data import (
    Collator,
    ConversationDataset,
    build_index,
    epoch_order,
    list_tar_shards,
    rank_batches,
    split_train_val,
)
from core.train.distributed import _all_reduce_sum, _barrier, _dist_setup
from core.train.identity import check_same_run, move_run_aside, run_identity
from core.train.metrics import Metrics
from core.train.mini_llava import build_mini_llava, load_mini_llava, resolve_device

__all__ = ["OPTIM_FILE", "STATE_FILE", "TrainResult", "list_checkpoints", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Epoch checkpoints (in order; plus the stop checkpoint when `max_steps` ended the run early)."""

    checkpoints: list[str]
    metrics_path: str
    global_step: int
    resumed_from: str | None



# ---- the loop -------------------------------------------------------------------------------------
def _lr_lambda(warmup: int, total: int, schedule: str = "cosine") -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(data: str | Sequence[str], cfg: TrainConfig, val_data: str | Sequence[str] | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train MiniLlava on training-schema WDS shards; resumes from `cfg.output_dir` when it holds checkpoints.

    :param data: an export folder (its manifest lists the shards), a directory of `*.tar` shards or a list of
        shard paths.
    :param cfg: the TrainConfig (its `output_dir` holds checkpoints/ and metrics.jsonl).
    :param val_data: optional separate validation shards; else `cfg.val_size` samples are held out by seed.
    :param on_step: called with the global step after each optimizer step (tests use it to kill a run).
    """
    device = resolve_device(cfg.device)
    rank, world, local = _dist_setup(device)
    if device == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    out = Path(cfg.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg.mirror_uri and local == 0:
        from core.train.storage import pull

        pull(cfg.mirror_uri, out)
    _barrier(world)

    if local == 0:
        recover_checkpoints(out)  # finish a checkpoint swap that a crash interrupted
    _barrier(world)

    shards = list_tar_shards(data)  # an export's manifest list: stale tars beside it are never trained on
    val_shards = list_tar_shards(val_data) if val_data is not None else None
    identity = run_identity(cfg, shards, val_shards)
    ckpts = list_checkpoints(out)
    resume = ckpts[-1][1] if ckpts else None
    state = json.loads((resume / STATE_FILE).read_text()) if resume else None
    # the checkpoints on disk must be this run's (config and data) before they are resumed or returned
    same = state is None or check_same_run(out, state, identity, cfg.on_config_change)
    _barrier(world)  # every rank has read the old state before it moves
    if not same:
        if local == 0:
            move_run_aside(out)
        _barrier(world)
        resume, state = None, None
    if state is not None and state.get("done"):
        log.info("run in %s already finished at step %d", out, state["global_step"])
        return TrainResult(_finished_list(out), str(out / "metrics.jsonl"), state["global_step"], str(resume))

    if resume is not None:
        model = load_mini_llava(resume, device=device)
    elif cfg.init_from:
        model = load_mini_llava(cfg.init_from, device=device)
    else:
        model = build_mini_llava(cfg.vision_model, cfg.lm_path, cfg.vision_pretrained, device, cfg.seed)
    model.set_stage(cfg.stage)
    model.train()

    # data: one index, a fixed held-out set, a per-epoch order that depends on (seed, epoch) only
    entries = build_index(shards)
    if val_shards is not None:
        train_idx = torch.arange(len(entries)).numpy()
        val_entries = build_index(val_shards)[: cfg.val_size]
    else:
        train_idx, val_idx = split_train_val(len(entries), cfg.val_size, cfg.seed)
        val_entries = [entries[i] for i in val_idx]
    steps_per_epoch = len(train_idx) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training samples < one global batch ({cfg.batch_size} x {world})")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    ds = ConversationDataset(entries, model.tokenizer, model.preprocess, model.image_token_id,
                             model.n_image_tokens, cfg.max_seq_len)
    collate = Collator(model.tokenizer.pad_token_id)
    val_ds = ConversationDataset(val_entries, model.tokenizer, model.preprocess, model.image_token_id,
                                 model.n_image_tokens, cfg.max_seq_len)
    mine = list(range(rank, len(val_ds), world))  # loaded once, kept in memory for every evaluation
    val_batches = [collate([val_ds[i] for i in mine[j: j + cfg.batch_size]])
                   for j in range(0, len(mine), cfg.batch_size)]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, total_steps, cfg.lr_schedule))
    start_epoch, start_step, global_step = 0, 0, 0
    if state is not None:
        blob = torch.load(resume / OPTIM_FILE, map_location=device, weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        log.info("resuming from %s: epoch %d step %d (global %d)", resume, start_epoch, start_step, global_step)
    else:
        torch.manual_seed(cfg.seed)

    net: Any = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[local] if device.startswith("cuda") else None)
    metrics = Metrics(cfg, rank, global_step if state is not None else None)

    def amp() -> Any:  # bf16 autocast on GPU; fp32 on CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()

    def validate() -> float:
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), amp():
            for b in val_batches:
                s, n = model(**_to(b, device))
                tot += torch.tensor([float(s), float(n)], dtype=torch.float64)
        model.train()
        tot = _all_reduce_sum(tot.to(device), world).cpu()
        return float(tot[0] / max(tot[1], 1))

    def state_at(epoch: int, step_in_epoch: int, done: bool = False) -> dict[str, Any]:
        # `epoch` + `step_in_epoch` are the resume position (epochs done, steps done in the next one);
        # `epochs_completed` is the same as a float (HF Trainer's `epoch`): what eval plots a score against.
        return {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch, "done": done,
                "identity": identity,
                "epochs_completed": round(epoch + step_in_epoch / steps_per_epoch, 6),
                "data": {"n_samples": len(entries), "n_train": len(train_idx), "n_val": len(val_entries),
                         "steps_per_epoch": steps_per_epoch, "world_size": world, "seed": cfg.seed}}

    stopped = False
    t0 = time.time()
    log.info("train: %d samples (%d train, %d val), %d steps/epoch, %d steps from step %d", len(entries),
             len(train_idx), len(val_entries), steps_per_epoch, total_steps, global_step)
    bar = progress(desc="train", total=total_steps, initial=global_step, unit="step", enabled=rank == 0)
    for epoch in range(start_epoch, cfg.epochs):
        batches = rank_batches(epoch_order(train_idx, cfg.seed, epoch), cfg.batch_size, world, rank)
        first = start_step if epoch == start_epoch else 0
        loader = torch.utils.data.DataLoader(
            [b.tolist() for b in batches[first:]], batch_size=None, num_workers=cfg.num_workers,
            collate_fn=_BatchLoader(ds, collate),
        )
        for step_in_epoch, batch in enumerate(loader, start=first):
            with amp():
                s, n = net(**_to(batch, device))
                loss = s / n.clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            global_step += 1
            bar.update(1)
            red = _all_reduce_sum(torch.stack([s.detach().double(), n.double()]), world)
            if global_step % cfg.log_every_n_steps == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(red[0] / max(red[1], 1)):.3f}", refresh=False)
                metrics.log({"step": global_step, "epoch": epoch, "loss": float(red[0] / max(red[1], 1)),
                             "lr": sched.get_last_lr()[0], "tokens": int(red[1]), "elapsed_s": time.time() - t0})
            if global_step % cfg.val_every_n_steps == 0:
                metrics.log({"step": global_step, "epoch": epoch, "val_loss": validate()})
            last_in_epoch = step_in_epoch + 1 == len(batches)
            stop = cfg.max_steps is not None and global_step >= cfg.max_steps
            if not last_in_epoch and (stop or (cfg.ckpt_every_n_steps and global_step % cfg.ckpt_every_n_steps == 0)):
                if rank == 0:
                    _publish(cfg, _save_checkpoint(model, opt, sched, cfg, f"step-{global_step:08d}",
                                                   state_at(epoch, step_in_epoch + 1, done=stop)))
                _barrier(world)
            if on_step is not None:
                on_step(global_step)
            if stop and not last_in_epoch:
                stopped = True
                break
        if stopped:
            break
        done = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and global_step >= cfg.max_steps)
        if rank == 0:
            _publish(cfg, _save_checkpoint(model, opt, sched, cfg, f"epoch-{epoch + 1:04d}",
                                           state_at(epoch + 1, 0, done=done)))
            log.info("epoch %d done at step %d", epoch + 1, global_step)
        _barrier(world)
        if done:
            break
    bar.close()
    metrics.close()
    log.info("train: done at step %d in %.1f s", global_step, time.time() - t0)
    return TrainResult(_finished_list(out), str(metrics.path), global_step, str(resume) if resume else None)


class _BatchLoader:
    """Index list -> collated batch (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, ds: ConversationDataset, collate: Collator):
        self.ds, self.collate = ds, collate

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        return self.collate([self.ds[i] for i in idx])
