"""External trainer: the team's own training stack, launched from a container image + command template.

The template is split into argv words first (shlex), then `{placeholders}` are filled in each word,
so a path with spaces or shell metacharacters stays one argument and is never interpreted by a shell.
Placeholders: {data_dir}, {ckpt_dir}, {nnodes}, {nproc}, {nproc_per_node}, {epochs}, {batch_size}, {lr},
{seed}, {val_every_n_steps}, {run_name} plus any `extra` key. Literal braces are written `{{` `}}`.

Secrets never travel as plain values: `env` holds non-secret variables only (a name that looks like a
credential is refused: task inputs are shown in the Flyte UI); secrets reach the trainer through `secrets`
(the task reads them from Flyte secrets). The logged command line shows `extra` values as `<extra:key>`, the
trainer's output lines and a failure's command have every secret and `extra` value masked.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import string
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Variable names that hold credentials: such a value belongs in a Flyte secret, never in a plain task input.
SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH|COOKIE|SESSION",
                            re.IGNORECASE)
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MASK = "***"
MIN_MASKED_LEN = 4  # shorter values ("1", "on") would mask ordinary output; the command line hides them anyway


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


def check_plain_env(env: Mapping[str, str]) -> None:
    """Refuse environment variables whose name looks like a credential (or is not a variable name): plain task
    inputs are stored and shown in the Flyte UI, so secrets must come through Flyte secrets."""
    for k in env:
        if not ENV_NAME_RE.fullmatch(k):
            raise ValueError(f"env: {k!r} is not an environment variable name")
        if SECRET_NAME_RE.search(k):
            raise ValueError(f"env: {k} looks like a secret; plain inputs are visible in the Flyte UI. Request it as a "
                             f"Flyte secret instead (MMCURATE_TRAIN_SECRETS='{k}=<group>/<key>', docs/train.md)")


def parse_secret_spec(spec: str) -> dict[str, tuple[str, str]]:
    """`"ENV=group/key,ENV2=group2/key2"` -> {ENV: (group, key)}: which Flyte secret fills which variable."""
    out: dict[str, tuple[str, str]] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, ref = item.partition("=")
        group, slash, key = ref.partition("/")
        if not (sep and slash and group and key and ENV_NAME_RE.fullmatch(name)):
            raise ValueError(f"secret spec {item!r}: expected ENV_NAME=group/key")
        out[name] = (group, key)
    return out


def redacted_command(template: str, values: Mapping[str, Any], hidden: Iterable[str]) -> list[str]:
    """The argv as it may be logged: the values of `hidden` placeholders shown as `<extra:name>`."""
    return render_command(template, {**values, **{k: f"<extra:{k}>" for k in hidden}})


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret value (of at least MIN_MASKED_LEN characters) replaced."""
    for v in sorted({str(x) for x in secrets if len(str(x)) >= MIN_MASKED_LEN}, key=len, reverse=True):
        text = text.replace(v, MASK)
    return text


def run_external(cfg: ExternalTrainerConfig, values: Mapping[str, Any],
                 secrets: Mapping[str, str] | None = None) -> list[str]:
    """Render and run the trainer command, stream its output to the log, return the checkpoint dirs.

    `secrets` ({variable: value}, from Flyte secrets) are added to the trainer's environment and masked in
    everything logged. A non-zero exit raises `subprocess.CalledProcessError` (the task fails, it never looks
    green) carrying the redacted command.
    """
    check_plain_env(cfg.env)
    secrets = dict(secrets or {})
    argv = render_command(cfg.command, values)
    shown = redacted_command(cfg.command, values, cfg.extra)
    hidden = list(secrets.values()) + [str(v) for v in cfg.extra.values()]
    ckpt_dir = Path(str(values["ckpt_dir"]))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log.info("external trainer: %s", shlex.join(shown))
    env = {**os.environ, **{k: str(v) for k, v in cfg.env.items()}, **secrets}
    with subprocess.Popen(argv, env=env, cwd=cfg.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as p:
        assert p.stdout is not None
        for line in p.stdout:
            log.info("[trainer] %s", mask(line.rstrip(), hidden))
        rc = p.wait()
    if rc != 0:
        raise subprocess.CalledProcessError(rc, shown)
    return sorted(str(d) for d in ckpt_dir.glob(cfg.checkpoint_glob) if d.is_dir())


@dataclass
class ExternalTrainer:
    """External trainer: `train` values (epochs, lr, ...) fill the matching template placeholders."""

    cfg: ExternalTrainerConfig
    nnodes: int = 1
    nproc_per_node: int = 1
    train: dict[str, Any] = field(default_factory=dict)

    def fit(self, data_dir: str, ckpt_dir: str, secrets: Mapping[str, str] | None = None) -> list[str]:
        """Run the trainer on training-schema WDS shards in `data_dir`; return the checkpoint dirs under `ckpt_dir`.
        `secrets` ({variable: value}) reach the trainer's environment only (see `run_external`)."""
        vals = placeholder_values(self.cfg, data_dir, ckpt_dir, self.nnodes, self.nproc_per_node, **self.train)
        return run_external(self.cfg, vals, secrets)
