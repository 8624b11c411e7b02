"""One interface, two trainers: `fit(data_dir, ckpt_dir) -> checkpoint dirs`.

- `MiniLlavaTrainer`: the built-in minimal LLaVA trainer (runs inside each torch-elastic worker).
- `ExternalTrainer`: the team's own stack, a command template run as a subprocess (it owns its launcher).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from core.train.config import TrainConfig
from core.train.external import ExternalTrainerConfig, placeholder_values, run_external


class Trainer(Protocol):
    def fit(self, data_dir: str, ckpt_dir: str) -> list[str]:
        """Train on training-schema WDS shards in `data_dir`; write checkpoints under `ckpt_dir`; return them."""
        ...


@dataclass
class MiniLlavaTrainer:
    """Built-in trainer; `cfg.output_dir` is replaced by `ckpt_dir` (checkpoints/ and metrics.jsonl go there)."""

    cfg: TrainConfig
    val_dir: str | None = None

    def fit(self, data_dir: str, ckpt_dir: str) -> list[str]:
        from core.configs import override
        from core.train.loop import train

        return train(data_dir, override(self.cfg, output_dir=ckpt_dir), val_data=self.val_dir).checkpoints


@dataclass
class ExternalTrainer:
    """External trainer: `train` values (epochs, lr, ...) fill the matching template placeholders."""

    cfg: ExternalTrainerConfig
    nnodes: int = 1
    nproc_per_node: int = 1
    train: dict[str, Any] = dataclasses.field(default_factory=dict)

    def fit(self, data_dir: str, ckpt_dir: str) -> list[str]:
        vals = placeholder_values(self.cfg, data_dir, ckpt_dir, self.nnodes, self.nproc_per_node, **self.train)
        return run_external(self.cfg, vals)
