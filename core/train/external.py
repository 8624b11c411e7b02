"""External trainer: the team's own training stack, launched from a container image + command template.

The template is split into argv words first (shlex), then `{placeholders}` are filled in each word,
so a path with spaces or shell metacharacters stays one argument and is never interpreted by a shell.
Placeholders: {data_dir}, {ckpt_dir}, {nnodes}, {nproc}, {nproc_per_node}, {epochs}, {batch_size}, {lr},
{seed}, {val_every_n_steps}, {run_name} plus any `extra` key. Literal braces are written `{{` `}}`.
"""

from __future__ import annotations

import logging
import os
import shlex
import string
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ExternalTrainerConfig:
    """An external trainer: `image` runs `command` (a template) with the data/checkpoint paths filled in.

    Checkpoints are the directories under {ckpt_dir} that match `checkpoint_glob` (sorted by name).
    """

    image: str
    command: str
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # more placeholder values
    checkpoint_glob: str = "*"
    workdir: str | None = None


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def render_command(template: str, values: Mapping[str, Any]) -> list[str]:
    """argv of a command template; each word is formatted on its own (no shell, no re-splitting).

    Raises KeyError naming the placeholders the template uses but `values` lacks.
    """
    words = shlex.split(template)
    missing = sorted({f for w in words for f in _fields(w)} - set(values))
    if missing:
        raise KeyError(f"command template uses unknown placeholders {missing}; known: {sorted(values)}")
    return [w.format_map({k: str(v) for k, v in values.items()}) for w in words]


def placeholder_values(cfg: ExternalTrainerConfig, data_dir: str, ckpt_dir: str, nnodes: int = 1,
                       nproc_per_node: int = 1, **train: Any) -> dict[str, Any]:
    """Values for the template: paths, world shape, training knobs (`train`) and `cfg.extra`."""
    vals: dict[str, Any] = {"data_dir": data_dir, "ckpt_dir": ckpt_dir, "nnodes": nnodes,
                            "nproc": nproc_per_node, "nproc_per_node": nproc_per_node}
    vals.update(train)
    vals.update(cfg.extra)
    return vals


def run_external(cfg: ExternalTrainerConfig, values: Mapping[str, Any]) -> list[str]:
    """Render and run the trainer command, stream its output to the log, return the checkpoint dirs.

    A non-zero exit raises `subprocess.CalledProcessError` (the task fails, it never looks green).
    """
    argv = render_command(cfg.command, values)
    ckpt_dir = Path(str(values["ckpt_dir"]))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log.info("external trainer: %s", shlex.join(argv))
    env = {**os.environ, **{k: str(v) for k, v in cfg.env.items()}}
    with subprocess.Popen(argv, env=env, cwd=cfg.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as p:
        assert p.stdout is not None
        for line in p.stdout:
            log.info("[trainer] %s", line.rstrip())
        rc = p.wait()
    if rc != 0:
        raise subprocess.CalledProcessError(rc, argv)
    return sorted(str(d) for d in ckpt_dir.glob(cfg.checkpoint_glob) if d.is_dir())


@dataclass
class ExternalTrainer:
    """External trainer: `train` values (epochs, lr, ...) fill the matching template placeholders."""

    cfg: ExternalTrainerConfig
    nnodes: int = 1
    nproc_per_node: int = 1
    train: dict[str, Any] = field(default_factory=dict)

    def fit(self, data_dir: str, ckpt_dir: str) -> list[str]:
        """Run the trainer on training-schema WDS shards in `data_dir`; return the checkpoint dirs under `ckpt_dir`."""
        vals = placeholder_values(self.cfg, data_dir, ckpt_dir, self.nnodes, self.nproc_per_node, **self.train)
        return run_external(self.cfg, vals)
