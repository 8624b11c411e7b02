"""The embed step: `EmbedStep`, a `core.foundation.step.ShardStep` over WDS shards whose units run on Ray actors
(or one in-process worker); `embed_shards` is its entry point.

Outputs: `<out_dir>/<shard>.parquet` (embeddings) and `<run>/ledger/embed/part-<shard>.parquet`, `<run>`
being the parent of `out_dir`. A shard is done when both exist: the embeddings are published first and
the ledger part last (`core.foundation.step.write_atomic`), so a crash leaves each shard done or absent, never half.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.foundation.ledger import SCHEMA, LedgerWriter
from core.foundation.log import progress
from core.foundation.step import Passing, ShardStep, Unit, write_atomic, write_parquet_atomic
from core.steps.embed.config import EmbedConfig
from core.steps.embed.model import as_ray_actor
from core.steps.embed.worker import STEP, ShardEmbedWorker, ShardResult

log = logging.getLogger(__name__)

ACTOR_PREFIX = "mmcurate-embed"


class EmbedIncomplete(RuntimeError):
    """Some shards were not embedded (their actors died or they failed); re-run to resume them."""

    def __init__(self, failed: dict[str, str], summary: EmbedSummary):
        super().__init__(f"{len(failed)} shard(s) not embedded, re-run to resume: {failed}")
        self.failed = failed
        self.summary = summary


@dataclass
class EmbedSummary:
    """What one `embed_shards` call did; `shards` holds the per-shard stats of the shards it embedded."""

    n_shards: int
    skipped: list[str] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    n_actors: int = 0

    @property
    def n_kept(self) -> int:
        return sum(s["n_kept"] for s in self.shards)

    @property
    def n_quarantined(self) -> int:
        return sum(s["n_quarantined"] for s in self.shards)

    @property
    def n_images(self) -> int:
        return sum(s["n_images"] for s in self.shards)

    def throughput(self) -> dict[str, float]:
        """Images/s and samples/s over the wall time; model-busy share = forward / actor wall time."""
        fwd = sum(s["forward_s"] for s in self.shards)
        busy = sum(s["wall_s"] for s in self.shards)
        return {
            "images_per_s": self.n_images / self.wall_s if self.wall_s else 0.0,
            "samples_per_s": self.n_kept / self.wall_s if self.wall_s else 0.0,
            "model_busy_fraction": fwd / busy if busy else 0.0,
            "forward_images_per_s": self.n_images / fwd if fwd else 0.0,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"n_shards": self.n_shards, "embedded": len(self.shards), "skipped": len(self.skipped),
                "kept": self.n_kept, "quarantined": self.n_quarantined, "images": self.n_images,
                "actors": self.n_actors, "wall_s": round(self.wall_s, 2),
                **{k: round(v, 3) for k, v in self.throughput().items()}}


class EmbedStep(ShardStep):
    """The embed step over WDS shards. The work of a shard is `ShardEmbedWorker.embed_shard`: in this
    process through the base's `run` (`process` prefetches the next pending shard), or on Ray actors
    (`embed_shards`) whose `ShardResult`s are published here (`publish`) before the base's `finish`.

    :param out_dir: embeddings folder (`<run>/embed`); the ledger goes to `<run>/ledger/embed`. A path or
        fsspec URL (object stores: the in-process `run` needs a local folder; missing ids are then only
        quarantined per shard).
    :param prev: the previous step's passing ids. With shard names (a ledger's `shard` column) each shard
        embeds its own ids and quarantines those it lacks as `missing_from_shard`; without, every shard is
        restricted to all of them. Ids in no shard are quarantined by the base's `finish`.
    """

    name = STEP

    def __init__(self, out_dir: str, cfg: EmbedConfig, prev: Passing | None = None,
                 on_shard: Callable[[ShardResult], None] | None = None):
        self.emb_dir = str(out_dir).rstrip("/")
        self.run_url = self.emb_dir.rsplit("/", 1)[0] if "/" in self.emb_dir else "."
        super().__init__(self.run_url, prev)
        self.cfg = cfg
        self.on_shard = on_shard
        self.local = isinstance(fsspec.core.url_to_fs(self.run_url)[0], LocalFileSystem)
        self.worker: ShardEmbedWorker | None = None
        self._after: dict[str, Unit] = {}

    def emb_path(self, unit_name: str) -> str:
        return f"{self.emb_dir}/{unit_name}.parquet"

    def clear_outputs(self) -> None:
        """A recompute (another model, `on_mismatch="recompute"`) removes the embeddings with the ledger
        parts: no file of the old model stays for `load_embeddings` to mix in."""
        super().clear_outputs()
        fs, root = fsspec.core.url_to_fs(self.emb_dir)
        for f in fs.glob(f"{root}/*.parquet"):
            fs.rm(f)

    def done(self, unit: Unit) -> bool:
        """A shard is finished when its embeddings file and its ledger part both exist."""
        fs, p = fsspec.core.url_to_fs(self.emb_path(unit.name))
        return fs.exists(p) and self.is_done(unit.name)

    def shard_ids(self, unit: Unit) -> tuple[Collection[str] | None, bool]:
        """(ids the shard embeds, whether the ones it lacks are quarantined there); (None, False): all."""
        if self.prev is None:
            return None, False
        if set(self.prev.by_shard) <= {""}:  # ids without shard names
            return self.prev.ids, False  # shared, not copied per shard
        return self.prev.in_shard(unit.name), True

    def publish(self, res: ShardResult) -> None:
        """Publish a shard embedded elsewhere: embeddings first, the ledger part last (marks it done)."""
        write_atomic(self.emb_path(res.shard), res.embeddings)
        self.publish_part(res.shard, res.ledger)
        if self.on_shard is not None:
            self.on_shard(res)

    # ---- in-process: the base's run ----------------------------------------------------------------
    def run(self, urls: Sequence[str]) -> Any:
        todo, _ = self.pending(urls)
        if todo and not self.local:
            raise ValueError(f"embed in-process (use_ray=False) writes local folders only, not {self.run_url}")
        self._after = {a.name: b for a, b in zip(todo, todo[1:])}  # the shard to prefetch after each one
        return super().run(urls)

    def setup(self) -> None:
        self.worker = ShardEmbedWorker(self.cfg)

    def process(self, unit: Unit, led: LedgerWriter) -> dict[str, Any]:
        ids, expected = self.shard_ids(unit)
        nxt = self._after.get(unit.name)  # read + decoded while this shard finishes
        res = self.worker.embed_shard(unit.url, ids, expected, prefetch=(nxt.url, self.shard_ids(nxt)[0]) if nxt else None,
                                      led=led)
        write_atomic(self.emb_path(unit.name), res.embeddings)  # the base closes `led` (the ledger part) after
        if self.on_shard is not None:
            self.on_shard(res)
        return res.stats

    def finish(self, n_units: int) -> int:
        if n_units == 0:  # an empty embeddings folder: downstream steps read zero rows
            fs, p = fsspec.core.url_to_fs(self.emb_dir)
            fs.makedirs(p, exist_ok=True)
        if self.local:
            return super().finish(n_units)
        if n_units == 0:
            write_parquet_atomic(SCHEMA.empty_table(), self.part("empty"))
        return 0


def embed_shards(
    shard_urls: list[str],
    out_dir: str,
    cfg: EmbedConfig,
    prev: Passing | None = None,
    use_ray: bool = True,
    actor_prefix: str = ACTOR_PREFIX,
    on_mismatch: str = "refuse",
) -> EmbedSummary:
    """Embed WDS shards into `<out_dir>/<shard>.parquet` plus `<run>/ledger/embed/part-<shard>.parquet`
    (`<run>` = the parent of `out_dir`); shards already done are skipped.

    prev: the step's inputs, the previous step's passing ids (`core.foundation.step.Passing`); None embeds every
    sample. See `EmbedStep` for how ids with and without shard names are used.
    use_ray: spread shards over `cfg.num_actors` Ray actors (`ray.init()` locally if Ray is not yet
    initialised); False runs one in-process worker (tests, benchmarks).
    Raises `EmbedIncomplete` when shards failed (actor died more than `cfg.max_shard_retries` times, or
    a shard raised); the shards that finished are published, so a re-run resumes.
    A folder embedded with another model or config (its stamp, `core.foundation.step`) raises `StepMismatch` naming
    the differing fields; `on_mismatch="recompute"` clears it and embeds again. A second writer of the same
    folder raises `FolderBusy`.
    """
    step = EmbedStep(out_dir, cfg, prev)
    step.on_mismatch = on_mismatch
    with step.writing():
        return _embed_shards(step, shard_urls, use_ray, actor_prefix)


def _embed_shards(step: EmbedStep, shard_urls: list[str], use_ray: bool, actor_prefix: str) -> EmbedSummary:
    t0 = time.perf_counter()
    summary = EmbedSummary(n_shards=len(shard_urls))
    todo, done = step.pending(shard_urls)  # also refuses two URLs with one shard name
    summary.skipped = [u.url for u in done]
    if not shard_urls:  # a degenerate run (empty source, all quarantined): the step still writes its ledger
        log.warning("embed: no shards to embed (the source is empty or every record was quarantined)")
    failed: dict[str, str] = {}
    with progress(desc="embed", total=len(todo), unit="shard") as bar:
        step.on_shard = lambda res: _log_shard(res, summary, bar)
        if not use_ray:
            summary.n_actors = 1 if todo else 0
            step.run(shard_urls)
        else:
            if summary.skipped:
                log.info("embed: %d/%d shards already done, skipping them", len(summary.skipped), len(shard_urls))
            if todo:
                failed = _run_ray(step, todo, summary, actor_prefix)
            if not failed:  # a failed shard's ids are not missing: a re-run decides them
                step.finish(len(shard_urls))
    summary.wall_s = time.perf_counter() - t0
    if failed:
        raise EmbedIncomplete(failed, summary)
    return summary


def _log_shard(res: ShardResult, summary: EmbedSummary, bar: Any = None) -> None:
    summary.shards.append(res.stats)
    s = res.stats
    if bar is not None:
        bar.update(1)
        bar.set_postfix(kept=summary.n_kept, quarantined=summary.n_quarantined, refresh=False)
    log.info("embed: %s kept=%d quarantined=%d images=%d in %.1fs (forward %.1fs, waited %.1fs) [%d/%d]",
             res.shard, s["n_kept"], s["n_quarantined"], s["n_images"], s["wall_s"], s["forward_s"],
             s["wait_s"], len(summary.shards) + len(summary.skipped), summary.n_shards)


def _run_ray(step: EmbedStep, todo: list[Unit], summary: EmbedSummary, actor_prefix: str) -> dict[str, str]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    cfg = step.cfg
    owns_ray = not ray.is_initialized()
    if owns_ray:  # a Flyte Ray task has already called ray.init(); a plain call starts a local cluster
        ray.init(include_dashboard=False, log_to_driver=False)
    n_actors = min(cfg.num_actors, len(todo))
    need_gpu = cfg.num_gpus * n_actors
    have_gpu = ray.cluster_resources().get("GPU", 0.0)
    if need_gpu > have_gpu:
        log.warning("embed: %d actors need %.1f GPUs, the cluster has %.1f now; waiting for workers to join",
                    n_actors, need_gpu, have_gpu)
    actors = [as_ray_actor(ShardEmbedWorker, cfg, name=f"{actor_prefix}-{i}", max_restarts=0) for i in range(n_actors)]
    summary.n_actors = n_actors
    failed: dict[str, str] = {}
    try:
        refs = [a.ready.remote() for a in actors]
        ready_refs, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.actor_start_timeout_s)
        live = []
        for i, (a, ref) in enumerate(zip(actors, refs)):  # an actor that died while loading is dropped
            if ref not in ready_refs:
                log.error("embed: actor %d did not start within %ss", i, cfg.actor_start_timeout_s)
                continue
            try:
                live.append((a, ray.get(ref)))
            except RayActorError as e:
                log.error("embed: actor %d died while loading: %s", i, str(e)[:300])
        if not live:
            raise RuntimeError(
                f"no embed actor started within {cfg.actor_start_timeout_s}s: each needs {cfg.num_gpus} GPU and "
                f"{cfg.cpus_per_actor} CPU; cluster has {ray.cluster_resources()}"
            )
        log.info("embed: %d/%d actors ready (pids %s)", len(live), n_actors, [p for _, p in live])
        queue_ = deque(todo)
        attempts: dict[str, int] = {}
        idle = [a for a, _ in live]
        inflight: dict[Any, tuple[Any, Unit]] = {}
        while queue_ or inflight:
            while idle and queue_:
                actor, unit = idle.pop(), queue_.popleft()
                ids, expected = step.shard_ids(unit)
                inflight[actor.embed_shard.remote(unit.url, ids, expected)] = (actor, unit)
            if not inflight:  # work left, no live actor
                for unit in queue_:
                    failed[unit.name] = "no live embed actor left"
                break
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor, unit = inflight.pop(done[0])
            try:
                res = ray.get(done[0])
            except RayActorError as e:  # the actor (process/node) died: retry the shard elsewhere
                attempts[unit.name] = attempts.get(unit.name, 0) + 1
                log.error("embed: actor died on %s (attempt %d): %s", unit.url, attempts[unit.name], str(e)[:300])
                if attempts[unit.name] <= cfg.max_shard_retries:
                    queue_.append(unit)
                else:
                    failed[unit.name] = f"actor died: {type(e).__name__}"
                continue
            except RayTaskError as e:  # the shard raised (e.g. unreadable storage): actor is fine
                log.error("embed: shard %s failed: %s", unit.url, str(e)[:1000])
                failed[unit.name] = str(e.cause if hasattr(e, "cause") else e)[:300]
                idle.append(actor)
                continue
            step.publish(res)
            idle.append(actor)
    finally:
        for a in actors:
            ray.kill(a)
        if owns_ray:
            ray.shutdown()
    return failed
