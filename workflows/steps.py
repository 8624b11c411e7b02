"""The launcher of every step of the table (core/runs/steps.py): how one step's nodes are created inside a
`@dynamic` workflow, with the step's resource profile applied (`.with_overrides`, tasks/resources.py).

A launcher is `launch(run: RunNodes, prev: StepOut | None) -> StepOut`: it reads the run's configs and the earlier
steps' outputs from `run` and returns its own output (a promise of a `StepOut`). `curate` calls them in table
order; `ablate` and the one-step workflows (`semdedup`, `decontam`, `embedding`) call the ones they need, so a
step is wired in exactly one place. Wiring only: no logic beyond choosing nodes and profiles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from flytekit import dynamic, map_task
from flytekit.types.file import FlyteFile

from core.runs.steps import BY_NAME, STEP_NAMES, run_uses_gpu
from core.steps.dedup.config import SemDedupConfig
from core.steps.export import default_export_config
from core.steps.filters import config_json, filter_class
from tasks.dedup import cluster_embeddings, decide_semdedup, decontam, ingest_eval_sets, prune_cluster_group
from tasks.embed import embed_node
from tasks.export import export_dataset
from tasks.filters import filter_samples
from tasks.images import CPU_IMAGE
from tasks.ingest import fingerprint_source, ingest_dataset
from tasks.perplexity import score_perplexity, slice_by_perplexity, train_reference_lm
from tasks.rephrase import rephrase_samples
from tasks.resources import fanout_node, overrides
from tasks.types import StepOut


@dataclass
class RunNodes:
    """What the launchers of one run share while a `@dynamic` body wires it (Python values and promises).

    :param config: The run's config (CurateConfig, or AblateConfig for the steps ablate shares).
    :param gpu: Whether the run is a GPU run (None: decided by `config.embed_config`, core/runs/steps.py).
    :param outs: Step name -> that step's output (a promise), filled as the steps are launched.
    """

    config: Any
    source: str = ""
    image_root: str = ""
    format: str = "auto"
    eval_cache: str = ""
    benchmarks: Optional[list] = None
    reference_source: str = ""
    reference_image_root: str = ""
    reference_ids: Optional[FlyteFile] = None
    gpu: Optional[bool] = None
    outs: dict = field(default_factory=dict)
    lm: Any = None  # the reference LM (a promise), trained once per run by the first step that needs it

    @property
    def run_gpu(self) -> bool:
        """A GPU run: as `gpu` says when set (one-step workflows), else as the run's embed config says."""
        return self.gpu if self.gpu is not None else run_uses_gpu(self.config.embed_config)

    def cfg(self, name: str, default: Any = None) -> Any:
        return getattr(self.config, name, default)


@dynamic(container_image=CPU_IMAGE)
def prune_groups(groups: list[FlyteFile], config: SemDedupConfig, gpu: bool = True) -> list[FlyteFile]:
    """SemDeDup's pairwise pass over every cluster group, at most config.max_parallel_groups at a time.

    :param groups: Group files from cluster_embeddings.
    :param config: SemDedupConfig (max_parallel_groups caps the map task's concurrency).
    :param gpu: The run's profile: GPU workers (production) or CPU ones (tiny presets), by core/runs/steps.py.
    """
    mapped = map_task(functools.partial(prune_cluster_group, config=config), concurrency=config.max_parallel_groups)
    return mapped(group=groups).with_overrides(**overrides("prune", config, gpu))


# ---- one launcher per step ------------------------------------------------------------------------------
def launch_ingest(run: RunNodes, prev: Optional[StepOut] = None) -> StepOut:
    # the fingerprint (sizes, mtimes) joins the cache key: a re-run after the files changed re-ingests
    fp = fingerprint_source(source=run.source, image_root=run.image_root)
    cfg = run.config.ingest_config
    return ingest_dataset(source=run.source, image_root=run.image_root, config=cfg, source_fingerprint=fp,
                          format=run.format).with_overrides(**overrides("ingest", cfg, run.run_gpu))  # the fan-out's pod


def launch_filter(run: RunNodes, prev: Optional[StepOut], name: str) -> StepOut:
    # every per-sample filter (core/steps/filters) runs through the one generic task, found by its step name
    cfg = getattr(run.config, BY_NAME[name].config)
    return filter_samples(run=run.outs["ingest"], step=name, prev=prev, config_json=config_json(cfg)).with_overrides(
        **overrides("filter", cfg, run.run_gpu))


def _is_filter(name: str) -> bool:
    try:
        filter_class(name)
    except ValueError:
        return False
    return True


def launch_embed(run: RunNodes, prev: Optional[StepOut]) -> StepOut:
    c = run.config.embed_config
    return embed_node(c, shards=run.outs["ingest"].dir, prev=prev)


def launch_decontam(run: RunNodes, prev: Optional[StepOut]) -> StepOut:
    # the eval sets are ingested and embedded with the same model as the training data
    c = run.config
    ev_run = ingest_eval_sets(cache_dir=run.eval_cache, benchmarks=run.benchmarks or c.decontam_benchmarks,
                              source_fingerprint=fingerprint_source(source=run.eval_cache))
    ev_emb = embed_node(c.embed_config, shards=ev_run.dir, prev=ev_run)
    return decontam(embeddings=run.outs["embed"], evals=ev_emb, config=c.decontam_config, prev=prev,
                    run=run.outs["ingest"], eval_run=ev_run).with_overrides(
        **overrides("decontam", c.decontam_config, run.run_gpu))


def launch_semdedup(run: RunNodes, prev: Optional[StepOut]) -> StepOut:
    cfg = run.config.semdedup_config
    c = cluster_embeddings(embeddings=run.outs["embed"], config=cfg, prev=prev).with_overrides(
        **overrides("cluster", cfg, run.run_gpu))
    scores = prune_groups(groups=c.groups, config=cfg, gpu=run.run_gpu)
    return decide_semdedup(work=c.work, scores=scores, config=cfg, run=run.outs["ingest"])


def reference_lm(run: RunNodes):
    """The reference LM of perplexity scoring (trained once per run, on the reference set or the run itself)."""
    if run.lm is None:
        ref = run.outs["ingest"]
        if run.reference_source:
            ref = ingest_dataset(source=run.reference_source, image_root=run.reference_image_root,
                                 config=run.config.ingest_config,
                                 source_fingerprint=fingerprint_source(source=run.reference_source,
                                                                       image_root=run.reference_image_root))
        run.lm = train_reference_lm(run=ref, reference_ids=run.reference_ids, steps=run.cfg("lm_steps"))
    return run.lm


def launch_perplexity(run: RunNodes, prev: Optional[StepOut]) -> StepOut:
    cfg = run.cfg("perplexity_config")
    inputs = dict(run=run.outs["ingest"], model=reference_lm(run), prev=prev)
    if cfg is None:  # ablate scores with the task's default config (its decorator's Ray cluster)
        return score_perplexity(**inputs).with_overrides(**overrides("perplexity", cfg, run.run_gpu))
    return fanout_node(score_perplexity, "perplexity", cfg, run.run_gpu, **inputs)


def launch_ppl_filter(run: RunNodes, prev: Optional[StepOut]) -> StepOut:
    return slice_by_perplexity(scores=run.outs["perplexity"], config=run.config.ppl_filter_config)


def launch_rephrase(run: RunNodes, prev: Optional[StepOut]) -> StepOut:
    cfg = run.config.rephrase_config
    return fanout_node(rephrase_samples, "rephrase", cfg, run.run_gpu, run=run.outs["ingest"], prev=prev).out


def launch_export(run: RunNodes, prev: Optional[StepOut]) -> StepOut:
    later = [out for name, out in run.outs.items() if name not in ("ingest", "export")]
    cfg = run.cfg("export_config", default_export_config())
    return export_dataset(run=run.outs["ingest"], steps=later, rephrased=run.outs.get("rephrase"),
                          config=cfg).with_overrides(**overrides("export", cfg, run.run_gpu))  # the fan-out's pod


LAUNCHERS: dict[str, Callable[[RunNodes, Optional[StepOut]], StepOut]] = {
    "ingest": launch_ingest,
    # a table row whose name is a registered SampleFilter needs no launcher of its own
    **{name: functools.partial(launch_filter, name=name) for name in STEP_NAMES if _is_filter(name)},
    "embed": launch_embed,
    "decontam": launch_decontam,
    "semdedup": launch_semdedup,
    "perplexity": launch_perplexity,
    "ppl_filter": launch_ppl_filter,
    "rephrase": launch_rephrase,
    "export": launch_export,
}
missing = set(STEP_NAMES) ^ set(LAUNCHERS)
if missing:  # the table and the launchers name the same steps (checked at import: a package build fails)
    raise RuntimeError(f"steps without a launcher or launchers without a step: {sorted(missing)}")


def launch(run: RunNodes, steps) -> StepOut | None:
    """Launch `steps` (rows of the table) in order, each fed the previous one's output; returns the last."""
    prev = None
    for step in steps:
        prev = LAUNCHERS[step.name](run, prev)
        run.outs[step.name] = prev
    return prev
