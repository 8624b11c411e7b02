"""`embed_shards`: spread WDS shards over Ray actors (or one in-process worker), write per-shard
embeddings and ledger parts atomically, skip shards already done.

Resume contract (docs/architecture.md): a shard is done when both `<out_dir>/<shard>.parquet` and
`<ledger_dir>/part-<shard>.parquet` exist. The driver writes the embeddings first and the ledger part
last, each via tmp + rename, so a crash at any point leaves the shard either done or absent, never half.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.embed.config import EmbedConfig
from core.embed.model import as_ray_actor
from core.embed.worker import STEP, ShardEmbedWorker, ShardResult
from core.log import progress

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


def output_paths(shard: str, out_dir: str, ledger_dir: str) -> tuple[str, str]:
    """(embedding file, ledger part) of a shard name."""
    return f"{str(out_dir).rstrip('/')}/{shard}.parquet", f"{str(ledger_dir).rstrip('/')}/part-{shard}.parquet"


def _write_atomic(path: str, data: bytes) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{p}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    else:  # object stores publish a whole object on close
        with fs.open(p, "wb") as f:
            f.write(data)


def _is_done(shard: str, out_dir: str, ledger_dir: str) -> bool:
    return all(fs.exists(p) for fs, p in (fsspec.core.url_to_fs(u) for u in output_paths(shard, out_dir, ledger_dir)))


def _publish(res: ShardResult, out_dir: str, ledger_dir: str) -> None:
    emb, led = output_paths(res.shard, out_dir, ledger_dir)
    _write_atomic(emb, res.embeddings)
    _write_atomic(led, res.ledger)  # last: its existence marks the shard done


def default_ledger_dir(out_dir: str) -> str:
    """`<run>/embed` -> `<run>/ledger/embed` (the run-directory layout)."""
    parent = str(out_dir).rstrip("/").rsplit("/", 1)[0] if "/" in str(out_dir).rstrip("/") else "."
    return f"{parent}/ledger/{STEP}"


def embed_shards(
    shard_urls: list[str],
    out_dir: str,
    cfg: EmbedConfig,
    include_ids: Mapping[str, Collection[str]] | Collection[str] | None = None,
    ledger_dir: str | None = None,
    use_ray: bool = True,
    actor_prefix: str = ACTOR_PREFIX,
) -> EmbedSummary:
    """Embed WDS shards into `<out_dir>/<shard>.parquet` plus `<ledger_dir>/part-<shard>.parquet`.

    include_ids: the step's inputs. A mapping shard name -> ids (as in an upstream ledger's `shard`
    column) restricts each shard and quarantines expected ids the shard lacks (`missing_from_shard`);
    a plain collection only restricts; None embeds every sample.
    use_ray: spread shards over `cfg.num_actors` Ray actors (`ray.init()` locally if Ray is not yet
    initialised); False runs one in-process worker (tests, benchmarks).
    Raises `EmbedIncomplete` when shards failed (actor died more than `cfg.max_shard_retries` times, or
    a shard raised); the shards that finished are published, so a re-run resumes.
    """
    t0 = time.perf_counter()
    ledger_dir = ledger_dir or default_ledger_dir(out_dir)
    from core.wds import shard_name

    names = {shard_name(u): u for u in shard_urls}
    if len(names) != len(shard_urls):
        raise ValueError("two shard URLs share a shard name; outputs would collide")
    summary = EmbedSummary(n_shards=len(shard_urls))
    if not shard_urls:  # a degenerate run (empty source, all quarantined): the step still writes its ledger
        import io

        import pyarrow.parquet as pq

        from core.ledger import SCHEMA

        buf = io.BytesIO()
        pq.write_table(SCHEMA.empty_table(), buf)
        _write_atomic(f"{ledger_dir.rstrip('/')}/part-empty.parquet", buf.getvalue())
        fs, p = fsspec.core.url_to_fs(out_dir)
        fs.makedirs(p, exist_ok=True)  # an empty embeddings folder: downstream steps read zero rows
        log.warning("embed: no shards to embed (the source is empty or every record was quarantined)")
    todo = []
    for name, url in names.items():
        (summary.skipped if _is_done(name, out_dir, ledger_dir) else todo).append(url)
    if summary.skipped:
        log.info("embed: %d/%d shards already done, skipping them", len(summary.skipped), len(shard_urls))

    def shard_args(url: str) -> tuple[Collection[str] | None, bool]:
        if isinstance(include_ids, Mapping):
            return include_ids.get(shard_name(url), ()), True
        return include_ids, False

    failed: dict[str, str] = {}
    bar = progress(desc="embed", total=len(todo), unit="shard")
    with bar:
        if todo and not use_ray:
            worker = ShardEmbedWorker(cfg)
            summary.n_actors = 1
            for i, url in enumerate(todo):
                ids, expected = shard_args(url)
                nxt = todo[i + 1] if i + 1 < len(todo) else None  # read + decoded while this shard finishes
                res = worker.embed_shard(url, ids, expected, prefetch=(nxt, shard_args(nxt)[0]) if nxt else None)
                _publish(res, out_dir, ledger_dir)
                _log_shard(res, summary, bar)
        elif todo:
            failed = _run_ray(todo, out_dir, ledger_dir, cfg, shard_args, summary, actor_prefix, bar)
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


def _run_ray(todo, out_dir, ledger_dir, cfg, shard_args, summary, actor_prefix, bar=None) -> dict[str, str]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from core.wds import shard_name

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
        inflight: dict[Any, tuple[Any, str]] = {}
        while queue_ or inflight:
            while idle and queue_:
                actor, url = idle.pop(), queue_.popleft()
                ids, expected = shard_args(url)
                inflight[actor.embed_shard.remote(url, ids, expected)] = (actor, url)
            if not inflight:  # work left, no live actor
                for url in queue_:
                    failed[shard_name(url)] = "no live embed actor left"
                break
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor, url = inflight.pop(done[0])
            try:
                res = ray.get(done[0])
            except RayActorError as e:  # the actor (process/node) died: retry the shard elsewhere
                attempts[url] = attempts.get(url, 0) + 1
                log.error("embed: actor died on %s (attempt %d): %s", url, attempts[url], str(e)[:300])
                if attempts[url] <= cfg.max_shard_retries:
                    queue_.append(url)
                else:
                    failed[shard_name(url)] = f"actor died: {type(e).__name__}"
                continue
            except RayTaskError as e:  # the shard raised (e.g. unreadable storage): actor is fine
                log.error("embed: shard %s failed: %s", url, str(e)[:1000])
                failed[shard_name(url)] = str(e.cause if hasattr(e, "cause") else e)[:300]
                idle.append(actor)
                continue
            _publish(res, out_dir, ledger_dir)
            _log_shard(res, summary, bar)
            idle.append(actor)
    finally:
        for a in actors:
            ray.kill(a)
        if owns_ray:
            ray.shutdown()
    return failed
