"""Embed task: WDS shards -> per-shard image/text embeddings + the embed ledger, on a Ray cluster.

The Ray cluster shape (head + one GPU worker group) comes from the production preset
(`siglip2_embed_config()`): one worker pod per actor, `num_gpus` GPUs each. For another shape use
`embed_shards.with_overrides(task_config=ray_job_config(cfg))` in a workflow. Locally, flytekit starts a
local Ray (`ray.init()`), and the actors reserve `num_gpus` from the chosen preset (0 for `tiny`).
"""

from __future__ import annotations

import logging
from typing import Optional

from flytekit import Deck, Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

from core.steps.embed.config import EmbedConfig, siglip2_embed_config, tiny_embed_config
from tasks.cache import task_version
from tasks.decks import DECK_FIELDS, save_decks
from tasks.images import GPU_IMAGE
from tasks.paths import resume_key, step_url
from tasks.resources import overrides, ray_node
from tasks.steplog import step_finished, step_started
from tasks.types import StepOut, passing

log = logging.getLogger(__name__)


def ray_job_config(cfg: EmbedConfig, worker_mem: str = "64Gi") -> RayJobConfig:
    """Ray cluster for a config: a CPU head (the driver) and `num_actors` worker pods, each with the
    actor's GPUs and CPUs (+2 CPUs for Ray itself). Depends only on the config, never on this machine."""
    import math

    gpus = math.ceil(cfg.num_gpus)  # a pod holds whole GPUs; fractional actors share one
    res = Resources(cpu=str(cfg.cpus_per_actor + 2), mem=worker_mem, gpu=str(gpus) if gpus else None)
    return RayJobConfig(
        head_node_config=HeadNodeConfig(requests=Resources(cpu="4", mem="16Gi")),
        worker_node_config=[WorkerNodeConfig(group_name="embed-workers", replicas=cfg.num_actors,
                                             requests=res, limits=res)],
        shutdown_after_job_finishes=True,
        ttl_seconds_after_finished=600,
    )


_EMBED_OPTS = dict(container_image=GPU_IMAGE, enable_deck=True, deck_fields=DECK_FIELDS, cache=True,
                   cache_version=task_version(__name__))


@task(task_config=ray_job_config(siglip2_embed_config()), requests=Resources(cpu="2", mem="8Gi"), **_EMBED_OPTS)
def embed_shards(
    shards: FlyteDirectory,
    prev: Optional[StepOut] = None,
    config: EmbedConfig = tiny_embed_config(),
    out_url: Optional[str] = None,
) -> StepOut:
    """Embed the images and conversation text of WDS shards with an open_clip model on Ray actors.

    Writes `embed/<shard>.parquet` (sample_id, source, n_images, image_emb, image_embs, image_norm,
    text_emb, text_norm; L2-normalised) and `ledger/embed/part-<shard>.parquet` (keep, or quarantine with a
    reason such as corrupt_image / decompression_bomb / missing_from_shard). Shards already done under
    `out_url` are skipped, so re-running after a failure resumes.

    :param shards: Folder of `*.tar` WDS shards, or a run folder holding `shards/` (e.g. ingest's output).
    :param prev: The previous step's output (ingest, image_filter, ...); only its kept/modified ids are embedded;
        None: every sample of the shards.
    :param config: EmbedConfig: model, device, batch size, actors, GPUs per actor, text view, what, output dtype
        (presets: `tiny_embed_config()` on CPU, `siglip2_embed_config()` on GPU; the CLI takes JSON merged onto the
        tiny preset, `{"preset": "siglip2", ...}` for another base).
    :param out_url: Persistent folder (path or s3://) to write into and resume from; default: this call's step
        folder under $MMCURATE_RESUME_ROOT (tasks/paths.py `step_url`), so a retry resumes too.
    :return: StepOut "embed": a folder with `embed/` and `ledger/embed/`.
    """
    t0 = step_started("embed", model=config.model_name, prev_step=prev.step if prev else "")
    from core.foundation.ledger import read_ledger
    from core.foundation.step import shards_of
    from core.steps.embed import embed_shards as run_embed
    from core.steps.embed.report import embed_report_html

    cfg = config
    # actors read shards themselves: give them the remote URL when there is one (multi-node clusters)
    src = shards.remote_source or shards.download()
    urls = shards_of(src)
    # default: the persistent step folder of this call (path or URL; embed writes URLs itself, shard by shard)
    run_dir = out_url or step_url("embed", resume_key("embed_shards", task_version(__name__), shards=shards, prev=prev,
                                                      config=config))
    log.info("embed: %d shards from %s -> %s with %s", len(urls), src, run_dir, cfg)
    summary = run_embed(urls, f"{run_dir.rstrip('/')}/embed", cfg, prev=passing(prev))
    log.info("embed: %s", summary.as_dict())
    ledger = read_ledger(f"{run_dir}/ledger/embed") if "://" not in run_dir else None
    Deck("embed", embed_report_html(f"{run_dir}/embed", summary.as_dict(), summary.shards, ledger))
    save_decks(run_dir, "embed")
    step_finished("embed", t0, run_dir, shards=len(urls))
    return StepOut("embed", FlyteDirectory(run_dir))


def embed_node(config: EmbedConfig, **inputs):
    """An `embed_shards` node (inside a workflow) with the Ray cluster and profile `config` asks for
    (`tasks.resources.ray_node`: a shallow copy of the task per node)."""
    return ray_node(embed_shards, embed_overrides(config), config=config, **inputs)


def embed_overrides(config: EmbedConfig) -> dict:
    """`.with_overrides(...)` arguments of an `embed_shards` node for a config: the Ray cluster shaped by the config
    (`ray_job_config`: no GPU worker for the tiny preset) and the driver's profile (core/runs/steps.py)."""
    from core.runs.steps import run_uses_gpu

    return overrides("embed", config, run_uses_gpu(config), task_config=ray_job_config(config))
