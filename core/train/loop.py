"""The training loop of the built-in trainer: DDP (gloo on CPU, nccl on GPU), validation every N steps on a
fixed held-out set, a checkpoint every epoch and every K steps, metrics to JSONL (+ W&B: an active run, or one
started when asked), and resume from the newest checkpoint with the same data order.

Data order is a pure function of (seed, epoch) (`data.epoch_order`), and a checkpoint records
(epoch, step_in_epoch), so a resumed run trains on exactly the batches the killed run had not done yet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.log import progress
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
from core.train.mini_llava import MiniLlava, build_mini_llava, load_mini_llava, resolve_device

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


@dataclass
class TrainResult:
    """Epoch checkpoints (in order; plus the stop checkpoint when `max_steps` ended the run early)."""

    checkpoints: list[str]
    metrics_path: str
    global_step: int
    resumed_from: str | None


# ---- distributed helpers -------------------------------------------------------------------------
def _dist_setup(device: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun / torch elastic; (rank, world, local_rank)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, local


def _all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---- checkpoints ----------------------------------------------------------------------------------
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


# ---- metrics --------------------------------------------------------------------------------------
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

    :param data: a directory of exported `*.tar` shards or a list of shard paths.
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

    ckpts = list_checkpoints(out)
    resume = ckpts[-1][1] if ckpts else None
    state = json.loads((resume / STATE_FILE).read_text()) if resume else None
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
    entries = build_index(list_tar_shards(data))
    if val_data is not None:
        train_idx = torch.arange(len(entries)).numpy()
        val_entries = build_index(list_tar_shards(val_data))[: cfg.val_size]
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


def _finished_list(out: Path) -> list[str]:
    """Epoch checkpoints in order, plus a final step checkpoint if the run stopped mid-epoch."""
    ck = list_checkpoints(out)
    epochs = [str(d) for _, d in ck if d.name.startswith("epoch-")]
    if ck and ck[-1][1].name.startswith("step-"):
        if json.loads((ck[-1][1] / STATE_FILE).read_text()).get("done"):
            epochs.append(str(ck[-1][1]))
    return epochs


class _BatchLoader:
    """Index list -> collated batch (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, ds: ConversationDataset, collate: Collator):
        self.ds, self.collate = ds, collate

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        return self.collate([self.ds[i] for i in idx])
