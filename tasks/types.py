"""The one value a step task takes from its predecessor and returns: `StepOut(step, dir)`.

`step` is the step's one name (core/runs/steps.py: its ledger folder `ledger/<step>/` inside `dir`); `dir` is the
step's output folder. It replaces the (directory, step-name string) pairs the tasks used to take, so a step's
identity cannot be separated from its output on the way between tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from tasks.images import CPU_IMAGE


@dataclass
class StepOut:
    """A step's output folder and the step's name (the ledger it holds: `ledger/<step>/`)."""

    step: str
    dir: FlyteDirectory


def passing(prev: Optional[StepOut]):
    """The ids the previous step let through (`core.foundation.step.Passing`), fetching only its ledger from a
    remote output; None when there is no previous step (the step then takes every sample)."""
    from core.foundation.step import Passing
    from tasks.paths import local_ledger_root

    if prev is None:
        return None
    return Passing.read(local_ledger_root(prev.dir, prev.step), prev.step)


def local(out: Optional[StepOut]) -> Optional[str]:
    """The output folder as a local path (downloaded when remote); None for None."""
    return None if out is None else out.dir.download()



@task(container_image=CPU_IMAGE, requests=Resources(cpu="1", mem="1Gi"))
def step_out(dir: FlyteDirectory, step: str) -> StepOut:
    """Name a folder as a step's output (a folder given on the command line, e.g. an earlier run's ingest).

    :param dir: The step's output folder (holds `ledger/<step>/`).
    :param step: The step's name (core/runs/steps.py).
    """
    if not step:
        raise ValueError("step_out needs the step's name")
    return StepOut(step, dir)
