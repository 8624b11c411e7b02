"""Compute plans: equal compute per expert (steps x batch), mixtures with the same total compute."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class ExpertPlan:
    """One training: its domains, samples, and (epochs, max_steps) that give `steps` optimizer steps."""

    name: str
    domains: list[str]
    n_samples: int
    steps: int
    epochs: int
    batch_size: int

    @property
    def samples_seen(self) -> int:
        return self.steps * self.batch_size


def steps_per_epoch(n_samples: int, batch_size: int, val_size: int) -> int:
    """The built-in trainer's steps per epoch (it holds `val_size` samples out, drops the last partial batch)."""
    return max(0, (n_samples - min(val_size, n_samples)) // batch_size)


def expert_budget(sizes: Mapping[str, int], batch_size: int, val_size: int, epochs: int = 1,
                  budget_steps: int = 0) -> int:
    """Steps per expert: `budget_steps` when given, else the largest domain's (its steps per epoch x epochs)."""
    if budget_steps > 0:
        return budget_steps
    return max(steps_per_epoch(n, batch_size, val_size) for n in sizes.values()) * epochs


def plan_training(name: str, domains: Sequence[str], sizes: Mapping[str, int], steps: int, batch_size: int,
                  val_size: int) -> ExpertPlan:
    """Epochs so that `steps` fit (a small domain is repeated), capped by max_steps = steps."""
    n = sum(sizes[d] for d in domains)
    spe = steps_per_epoch(n, batch_size, val_size)
    if spe == 0:
        raise ValueError(f"{name}: {n} samples (minus {val_size} held out) < one batch of {batch_size}")
    return ExpertPlan(name, list(domains), n, steps, math.ceil(steps / spe), batch_size)
