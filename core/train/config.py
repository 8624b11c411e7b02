"""Training configuration: one dataclass plus presets (tiny CPU demo, LLaVA stage 1 and stage 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from core.foundation.configs import ConfigJSON, check_ranges, register_preset

STAGES = ("projector", "full")
LR_SCHEDULES = ("cosine", "constant")
ON_CONFIG_CHANGE = ("refuse", "restart")


@dataclass
class TrainConfig(ConfigJSON):
    """Configuration of the built-in minimal LLaVA-style trainer.

    `vision_model` is an open_clip model name (a registered config name, `local-dir:/path` or
    `hf-hub:org/repo`) with optional `vision_pretrained` weights; `lm_path` a Hugging Face causal-LM
    directory whose tokenizer has (or gets) an `<image>` special token. `stage="projector"` trains the
    projector only (stage 1, captions); `stage="full"` trains projector and LM (stage 2, conversations).
    The vision tower is always frozen. The presets leave the run-time paths (`output_dir`, `lm_path`, and
    `vision_model` / `init_from` where a task input gives them) "" for the training task to fill.
    """

    output_dir: str
    vision_model: str
    lm_path: str
    vision_pretrained: str | None = None
    stage: str = "full"
    init_from: str | None = None  # checkpoint dir to start from (e.g. stage 1's last epoch)
    epochs: int = 1
    batch_size: int = 8  # per rank
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    run_name: str = ""  # label of this training run (e.g. an ablation variant); evals group checkpoints by it
    lr_schedule: str = "cosine"  # cosine decay after warmup, or constant (soup experts stay near their start)
    max_seq_len: int = 512
    max_steps: int | None = None  # stop early (smoke runs); a checkpoint is written at the stop
    val_size: int = 16  # held out from the training shards once, by seed
    val_every_n_steps: int = 50
    ckpt_every_n_steps: int = 0  # mid-epoch checkpoints for preemption (0 = only at epoch ends)
    keep_step_checkpoints: int = 1  # mid-epoch checkpoints kept (epoch checkpoints are all kept)
    seed: int = 0
    device: str = "auto"  # cpu | cuda | auto
    num_workers: int = 0  # DataLoader workers per rank
    nnodes: int = 1
    nproc_per_node: int = 1
    log_every_n_steps: int = 1
    mirror_uri: str | None = None  # durable copy of checkpoints (s3://...) for preemption across pods
    wandb_project: str | None = None  # log to W&B too when set and wandb is installed
    wandb_run_name: str | None = None
    # output_dir holds another run (config or data differ): "refuse" (error naming the fields) or "restart"
    # (move the old checkpoints to output_dir/superseded/<time>/ and train from scratch)
    on_config_change: str = "refuse"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} not in {STAGES}")
        check_ranges(self, {"epochs": (1, None), "batch_size": (1, None), "lr": (0, None, {"lo_open": True}),
                            "weight_decay": (0, None), "warmup_steps": (0, None), "max_seq_len": (1, None),
                            "max_steps": (1, None, {"allow_none": True}), "val_size": (0, None),
                            "val_every_n_steps": (1, None), "ckpt_every_n_steps": (0, None),
                            "keep_step_checkpoints": (0, None), "num_workers": (0, None), "nnodes": (1, None),
                            "nproc_per_node": (1, None), "log_every_n_steps": (1, None)})
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} not in {LR_SCHEDULES}")
        if self.on_config_change not in ON_CONFIG_CHANGE:
            raise ValueError(f"on_config_change {self.on_config_change!r} not in {ON_CONFIG_CHANGE}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@register_preset(TrainConfig, "default", default=True)
def default_train_config() -> TrainConfig:
    """The field defaults: one epoch, batch 8, lr 1e-3 cosine, 512 tokens, no step cap, seed 0, device auto (what
    `train_mini_llava` trains with when given no config; a partial CLI JSON merges onto it)."""
    return TrainConfig(output_dir="", vision_model="", lm_path="")


@register_preset(TrainConfig, "tiny")
def tiny_train_config(output_dir: str = "", vision_model: str = "", lm_path: str = "", **overrides: Any) -> TrainConfig:
    """Embedded default: tiny models, trains for real on 2 CPU cores in a minute or two."""
    base = dict(
        epochs=2, batch_size=8, lr=2e-3, max_seq_len=256, val_size=16, val_every_n_steps=10,
        ckpt_every_n_steps=10, device="auto",
    )
    base.update(overrides)
    return TrainConfig(output_dir=output_dir, vision_model=vision_model, lm_path=lm_path, **base)


@register_preset(TrainConfig, "llava_stage1")
def llava_stage1_config(output_dir: str = "", vision_model: str = "", lm_path: str = "", **overrides: Any) -> TrainConfig:
    """Stage 1 (LLaVA-1.5 recipe): projector only, one epoch on a caption set, lr 1e-3."""
    base = dict(
        stage="projector", epochs=1, batch_size=32, lr=1e-3, warmup_steps=100, max_seq_len=2048,
        val_size=2000, val_every_n_steps=500, ckpt_every_n_steps=1000, device="cuda",
    )
    base.update(overrides)
    return TrainConfig(output_dir=output_dir, vision_model=vision_model, lm_path=lm_path, **base)


@register_preset(TrainConfig, "llava_stage2")
def llava_stage2_config(
    output_dir: str = "", vision_model: str = "", lm_path: str = "", init_from: str = "", **overrides: Any
) -> TrainConfig:
    """Stage 2: projector + LM on the instruction mixture, from a stage-1 checkpoint, lr 2e-5."""
    base = dict(
        stage="full", init_from=init_from, epochs=3, batch_size=16, lr=2e-5, warmup_steps=200,
        max_seq_len=4096, val_size=10_000, val_every_n_steps=1000, ckpt_every_n_steps=1000, device="cuda",
    )
    base.update(overrides)
    return TrainConfig(output_dir=output_dir, vision_model=vision_model, lm_path=lm_path, **base)
