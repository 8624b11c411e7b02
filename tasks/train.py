"""Training tasks on exported shards.

- `train_mini_llava`: the built-in minimal LLaVA trainer under torch elastic (flytekitplugins-kfpytorch
  `Elastic`); locally it runs through torch elastic too (gloo on CPU, nccl on GPU).
- `train_external`: the team's own trainer: a command template run in its container image.

The world shape is fixed at decoration (`nnodes=1, nproc_per_node=1`); a workflow changes it per call with
`train_mini_llava(...).with_overrides(task_config=Elastic(nnodes=2, nproc_per_node=8))`.

W&B logging of `train_mini_llava` through flytekitplugins-wandb is optional and decided when this module is
imported: with `MMCURATE_WANDB_PROJECT` (+ `MMCURATE_WANDB_ENTITY`, optionally `MMCURATE_WANDB_SECRET_KEY` /
`MMCURATE_WANDB_SECRET_GROUP`) set, the task is wrapped in the plugin's `wandb_init` and requests the API-key
secret (tasks/wandb_logging.py); unset, the task is a plain task and nothing of W&B is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Dict, List, NamedTuple, Optional

from flytekit import Deck, Resources, Secret, current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekitplugins.kfpytorch import Elastic

from core.train.config import TrainConfig, default_train_config
from core.train.external import parse_secret_spec
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import TRAIN_IMAGE
from tasks.paths import source
from tasks.steplog import step_finished, step_started

log = logging.getLogger(__name__)

# Read once, at import: the plugin fixes project/entity at decoration. Empty: W&B logging through the plugin is off.
WANDB_ENV_VARS = ("MMCURATE_WANDB_PROJECT", "MMCURATE_WANDB_ENTITY", "MMCURATE_WANDB_SECRET_KEY",
                  "MMCURATE_WANDB_SECRET_GROUP")
WANDB_ENV = {k: os.environ[k] for k in WANDB_ENV_VARS if os.environ.get(k)}


def _train_task(**task_kwargs):
    """`@task(**task_kwargs)`, plus the W&B plugin and its secret request when MMCURATE_WANDB_PROJECT is set."""
    if not WANDB_ENV.get("MMCURATE_WANDB_PROJECT"):
        return task(**task_kwargs)
    from tasks.wandb_logging import wandb_task_options

    decorator, extra = wandb_task_options(WANDB_ENV)
    return lambda fn: task(**task_kwargs, **extra)(decorator(fn))


TrainOutputs = NamedTuple("TrainOutputs", [("checkpoints", List[FlyteDirectory]), ("metrics", FlyteFile)])


def _output_dir(checkpoint_uri: str, key: str) -> tuple[str, Optional[str]]:
    """(local output dir, mirror URI). A local/shared path is used directly; a URL is mirrored; with none,
    a pod-local dir that all local ranks of this execution agree on (elastic restarts still resume)."""
    if checkpoint_uri and "://" in checkpoint_uri and not checkpoint_uri.startswith("file://"):
        h = hashlib.sha1(checkpoint_uri.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "mmcurate-train", h), checkpoint_uri
    if checkpoint_uri:
        return checkpoint_uri.removeprefix("file://"), None
    return os.path.join(tempfile.gettempdir(), "mmcurate-train", key), None


_TRAIN_OPTS = dict(container_image=TRAIN_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, retries=2, shared_memory=True, cache=True,
                   cache_version=task_version(__name__),
                   task_config=Elastic(nnodes=1, nproc_per_node=1, increase_shared_mem=False))


def train_mini_llava(
    data: FlyteDirectory,
    vision_model: str,
    lm: FlyteDirectory,
    config: TrainConfig = default_train_config(),
    vision_dir: Optional[FlyteDirectory] = None,
    vision_pretrained: str = "",
    init_from: Optional[FlyteDirectory] = None,
    checkpoint_uri: str = "",
    wandb_project: str = "",
    run_name: str = "",
) -> TrainOutputs:
    """Train the built-in minimal LLaVA model (frozen open_clip tower -> MLP projector -> causal LM).

    Every rank runs this body; rank 0's return value is the task output. Preemption-safe when
    `checkpoint_uri` is durable: a relaunch resumes from the newest checkpoint with the same data order.

    :param data: Exported shards: an export output (with `shards/`) or a directory of `*.tar`.
    :param vision_model: open_clip model name (ignored when `vision_dir` is given).
    :param lm: Hugging Face causal-LM directory (model + tokenizer).
    :param config: TrainConfig (core/train/config.py): stage (`projector` = stage 1, `full` = stage 2), epochs,
        batch size per rank, lr, lr_schedule (`cosine` / `constant` after warmup), warmup_steps, max_seq_len
        (truncation never splits an image), max_steps (None = no cap; a checkpoint is written at the stop),
        val_size, val_every_n_steps, ckpt_every_n_steps (0 = only at epoch ends), seed, device (cpu/cuda/auto).
        Its run-time paths (output_dir, lm_path, vision_model, init_from, mirror_uri) and the world shape are
        filled here from the other inputs. Default: preset `default` (the field defaults); on the CLI a partial
        JSON merged onto it, e.g. `--config '{"epochs": 2, "lr": 2e-3}'` or `'{"preset": "llava_stage1"}'`.
    :param vision_dir: open_clip `local-dir` (open_clip_config.json + weights) for the vision tower.
    :param vision_pretrained: open_clip pretrained tag or weights file for `vision_model` (empty: the config's).
    :param init_from: A checkpoint to start from (stage 2 starts from stage 1's last epoch).
    :param checkpoint_uri: Durable location of the run's checkpoints (shared path or s3://...); re-using it resumes.
    :param wandb_project: Also log to this W&B project (a run started by the trainer); ignored when the task
        runs under the W&B plugin (MMCURATE_WANDB_PROJECT), whose run gets the metrics.
    :param lr_schedule: `cosine` (decay after warmup) or `constant` (after warmup).
    :param run_name: Label recorded in each checkpoint's trainer_state.json (e.g. the ablation variant); evaluation
        groups checkpoints by it (else by the folder holding them). Empty: the config's.
    :return: The epoch checkpoints (Hugging Face LLaVA folders: `LlavaForConditionalGeneration.from_pretrained`
        + `AutoProcessor.from_pretrained` load them; see docs/train.md) and metrics.jsonl.
    """
    t0 = step_started("train", stage=config.stage, epochs=config.epochs, max_steps=config.max_steps or 0)
    from core.foundation.configs import override
    from core.train.loop import train
    from core.train.report import train_report_html

    data_dir = data.download()
    if os.path.isdir(os.path.join(data_dir, "shards")):
        data_dir = os.path.join(data_dir, "shards")
    vm = f"local-dir:{vision_dir.download()}" if vision_dir is not None else vision_model
    c, run_name = config, run_name or config.run_name
    # The pod-local dir must differ between trainings of one execution (local runs share raw_output_prefix,
    # e.g. the variants of an ablation grid) but agree between elastic ranks/restarts of the same training.
    ident = [current_context().raw_output_prefix, os.environ.get("TORCHELASTIC_RUN_ID", ""),
             source(data), vm, source(lm), c.stage, c.epochs, c.batch_size, c.lr, c.seed, c.max_steps or 0,
             c.max_seq_len, c.lr_schedule, source(init_from) if init_from is not None else "", run_name]
    key = hashlib.sha1("|".join(map(str, ident)).encode())
    out, mirror = _output_dir(checkpoint_uri, key.hexdigest()[:16])
    cfg = override(
        config, output_dir=out, vision_model=vm, lm_path=lm.download(),
        vision_pretrained=vision_pretrained or config.vision_pretrained,
        init_from=init_from.download() if init_from is not None else config.init_from or None, mirror_uri=mirror,
        wandb_project=wandb_project or config.wandb_project, run_name=run_name,
        nnodes=int(os.environ.get("GROUP_WORLD_SIZE", "1")), nproc_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    res = train(data_dir, cfg)
    log.info("trained to step %d; checkpoints %s", res.global_step, res.checkpoints)
    step_finished("train", t0, steps=res.global_step, checkpoints=len(res.checkpoints))
    if int(os.environ.get("RANK", "0")) == 0:
        Deck("training", train_report_html(res.metrics_path, res.checkpoints))
        if res.checkpoints:  # the deck travels with the last checkpoint (the one an ablation compares)
            save_decks(res.checkpoints[-1], "train")
    return TrainOutputs([FlyteDirectory(c) for c in res.checkpoints], FlyteFile(res.metrics_path))


# The decorator states the production profile (core/runs/steps.py GPU_PROFILES["train"]: one GPU per
# single-process elastic worker); a workflow that knows the run gives the node its profile with
# `.with_overrides(**tasks.resources.overrides("train", config, run_gpu))` (the tiny presets: two CPUs, no GPU).
train_mini_llava = _train_task(requests=Resources(cpu="8", mem="64Gi", gpu="1"), limits=Resources(gpu="1"),
                               **_TRAIN_OPTS)(train_mini_llava)


# Flyte secrets for the external trainer, as environment variables of its process. Fixed when this module is
# imported (a task's secret requests are part of its registered definition), like the W&B settings above:
# MMCURATE_TRAIN_SECRETS="HF_TOKEN=hf/token,AWS_SECRET_ACCESS_KEY=aws/secret" (ENV=group/key, comma separated).
# The variable is also set in the task's container, so the pod builds the same task.
TRAIN_SECRETS_VAR = "MMCURATE_TRAIN_SECRETS"
TRAIN_SECRETS_SPEC = os.environ.get(TRAIN_SECRETS_VAR, "")
TRAIN_SECRETS = parse_secret_spec(TRAIN_SECRETS_SPEC)


@task(container_image=TRAIN_IMAGE, requests=Resources(cpu="2", mem="8Gi"), retries=2,
      secret_requests=[Secret(group=g, key=k) for g, k in TRAIN_SECRETS.values()],
      environment={TRAIN_SECRETS_VAR: TRAIN_SECRETS_SPEC} if TRAIN_SECRETS_SPEC else None)
def train_external(
    data: FlyteDirectory,
    command: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    epochs: int = 1,
    lr: float = 2e-5,
    extra: Optional[Dict[str, str]] = None,
    env: Optional[Dict[str, str]] = None,
    checkpoint_glob: str = "*",
) -> List[FlyteDirectory]:
    """Run the team's own trainer on exported shards (set its image with `.with_overrides(container_image=...)`).

    :param data: Exported shards (an export output or a directory of `*.tar`); filled in as {data_dir}.
    :param command: Command template, e.g. `torchrun --nproc_per_node {nproc} train.py --data {data_dir} --out {ckpt_dir}`;
        placeholders: data_dir, ckpt_dir, nnodes, nproc, nproc_per_node, epochs, lr and the `extra` keys.
    :param nnodes: Filled in as {nnodes}.
    :param nproc_per_node: Filled in as {nproc} / {nproc_per_node}.
    :param epochs: Filled in as {epochs}.
    :param lr: Filled in as {lr}.
    :param extra: More placeholder values (shown as `<extra:key>` in the logged command, masked in the output).
    :param env: Non-secret environment variables for the trainer process (task inputs are visible in the Flyte UI:
        a name that looks like a credential, e.g. `HF_TOKEN`, is refused). Secrets come from Flyte secrets named
        in `MMCURATE_TRAIN_SECRETS` at registration (docs/train.md).
    :param checkpoint_glob: Which directories under {ckpt_dir} are checkpoints.
    :return: The checkpoint directories the trainer wrote, sorted by name.
    """
    from core.train.external import ExternalTrainer, ExternalTrainerConfig, check_plain_env

    check_plain_env(env or {})
    secrets = {name: current_context().secrets.get(group=g, key=k) for name, (g, k) in TRAIN_SECRETS.items()}
    data_dir = data.download()
    if os.path.isdir(os.path.join(data_dir, "shards")):
        data_dir = os.path.join(data_dir, "shards")
    cfg = ExternalTrainerConfig(image="", command=command, env=dict(env or {}), extra=dict(extra or {}),
                                checkpoint_glob=checkpoint_glob)
    trainer = ExternalTrainer(cfg, nnodes, nproc_per_node, {"epochs": epochs, "lr": lr})
    ckpt_dir = os.path.join(current_context().working_directory, "checkpoints")
    return [FlyteDirectory(c) for c in trainer.fit(data_dir, ckpt_dir, secrets)]
