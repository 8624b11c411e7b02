"""SemDeDup over a run directory, split into the three steps the Flyte workflow runs.

1. `cluster_embeddings`: read embeddings, quarantine invalid rows, k-means + assignment (GPU worker),
   write one file per balanced cluster group, plus the removal-vs-number-of-clusters sweep.
2. `prune_cluster_group`: M and nearest earlier neighbour for one group (map task, any number in
   parallel; a finished group is skipped on re-run).
3. `decide_semdedup`: one global threshold (eps or exact target) over all groups' M, ledger + summary.

Files under `<run>/semdedup/`: plan.json, side.parquet (quarantined / skipped rows), groups/group-*.npz,
scores/group-*.parquet, sweep.parquet, removed_pairs.parquet, summary.json. Ledger:
`<run>/ledger/semdedup/part-*.parquet`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.foundation.ledger import LedgerWriter, step_dir
from core.foundation.step import Passing, write_json_atomic, write_parquet_atomic
from core.steps.dedup.config import SemDedupConfig
from core.steps.dedup.embeddings import invalid_rows, normalize_rows, read_embeddings
from core.steps.dedup.semdedup import (
    ClusterScores,
    balance_groups,
    cluster_rows,
    decide,
    removal_curve,
    resolve_device,
    score_clusters,
)

log = logging.getLogger(__name__)
STEP = "semdedup"


def work_dir(run_dir: str | os.PathLike) -> Path:
    """`<run>/semdedup`: the step's artifacts."""
    return Path(run_dir) / STEP


@dataclass
class ClusterPlan:
    """What `cluster_embeddings` produced (also saved as plan.json)."""

    run_dir: str
    kind: str
    n_input: int
    n_deduped: int
    dim: int
    n_clusters: int
    device: str
    group_files: list[str]
    cluster_sizes: list[int]
    kmeans_seconds: float
    n_quarantined: int
    n_skipped: int
    config: dict = field(default_factory=dict)

    def save(self) -> Path:
        p = work_dir(self.run_dir) / "plan.json"
        write_json_atomic(asdict(self), p, indent=1)
        return p

    @staticmethod
    def load(path: str | os.PathLike) -> ClusterPlan:
        return ClusterPlan(**json.loads(Path(path).read_text()))


def cluster_embeddings(
    embeddings_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: SemDedupConfig,
    prev: Passing | None = None,
    groups_dir: str | os.PathLike | None = None,
) -> ClusterPlan:
    """Step 1: k-means + assignment; writes balanced cluster-group files for the pairwise map task.

    Decides about exactly the ids of `prev`, the previous step's passing ids (all embedded ids when None).
    Group files go to `groups_dir` (default `<run>/semdedup/groups`). Rows with
    NaN/inf/zero-norm vectors are quarantined (or raise, with on_invalid="error"); samples without an
    embedding of cfg.kind (text-only samples for kind=image) are kept unchanged with a reason; ids that
    passed the previous step but are absent from the embeddings are quarantined as `missing_embedding`.
    """
    t0 = time.perf_counter()
    wd = work_dir(run_dir)
    include = None if prev is None else set(prev.ids)
    es = read_embeddings(embeddings_dir, cfg.kind, include)
    log.info("read %d %s embeddings (%d without one) in %.1fs", len(es.ids), cfg.kind, len(es.missing),
             time.perf_counter() - t0)
    side = {"sample_id": [], "shard": [], "decision": [], "reason": []}

    def add_side(sid, shard, decision, reason):
        side["sample_id"].append(sid)
        side["shard"].append(shard)
        side["decision"].append(decision)
        side["reason"].append(reason)

    for sid, sh in zip(es.missing, es.missing_shards):
        add_side(sid, sh, "keep", f"semdedup_skipped:no_{cfg.kind}_embedding")
    if include is not None:
        for sid in sorted(include - set(es.ids) - set(es.missing)):
            add_side(sid, "", "quarantine", "missing_embedding")
    n_input = len(es.ids) + len(side["sample_id"])
    bad = invalid_rows(es.ids, es.matrix)
    if bad:
        if cfg.on_invalid == "error":
            normalize_rows(es.ids, es.matrix)  # raises, naming the ids
        keep_rows = np.array([i not in bad for i in es.ids], bool)
        for sid, sh, ok in zip(es.ids, es.shards, keep_rows):
            if not ok:
                add_side(sid, sh, "quarantine", bad[sid])
        ids = np.asarray(es.ids, dtype=object)[keep_rows].astype(str)
        shards = np.asarray(es.shards, dtype=object)[keep_rows].astype(str)
        x = es.matrix[keep_rows]
    else:
        ids = np.asarray(es.ids).astype(str)
        shards = np.asarray(es.shards).astype(str)
        x = es.matrix
    del es
    x = normalize_rows(list(ids), x, inplace=True) if len(ids) else x
    write_parquet_atomic(pa.table({k: pa.array(v, pa.string()) for k, v in side.items()}), wd / "side.parquet")

    device = resolve_device(cfg.device)
    n, d = (x.shape[0], x.shape[1]) if len(ids) else (0, 0)
    tk = time.perf_counter()
    if n:
        cent, labels, sims = cluster_rows(x, cfg, device)
    else:
        cent, labels, sims = np.zeros((0, d), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    kmeans_s = time.perf_counter() - tk
    log.info("k-means (%d clusters, %d iters) + assignment of %d x %d on %s: %.1fs", cent.shape[0],
             cfg.kmeans_iters, n, d, device, kmeans_s)
    sizes = np.bincount(labels, minlength=cent.shape[0]) if n else np.zeros(cent.shape[0], np.int64)
    groups = balance_groups(sizes, cfg.cluster_groups)
    gdir = Path(groups_dir) if groups_dir else wd / "groups"
    gdir.mkdir(parents=True, exist_ok=True)
    for old in gdir.glob("group-*.npz"):
        old.unlink()
    files = []
    for g, members in enumerate(groups):
        rows = np.flatnonzero(np.isin(labels, members))
        path = gdir / f"group-{g:05d}.npz"
        tmp = gdir / f"group-{g:05d}.tmp.npz"  # streamed, not write_atomic: a group holds GBs of vectors at scale
        np.savez(tmp, ids=ids[rows], shards=shards[rows], labels=labels[rows], sims=sims[rows], x=x[rows])
        os.replace(tmp, path)
        files.append(str(path))
    # stale scores from an earlier clustering must not be mixed with these groups
    for old in (wd / "scores").glob("group-*.parquet") if (wd / "scores").exists() else []:
        old.unlink()
    if cfg.sweep_subsample and n:
        _cluster_sweep(x, ids, cfg, device, wd)
    plan = ClusterPlan(
        str(run_dir), cfg.kind, n_input, n, d, int(cent.shape[0]), device, files, sizes.tolist(), kmeans_s,
        side["decision"].count("quarantine"), side["decision"].count("keep"), asdict(cfg),
    )
    plan.save()
    return plan


def _cluster_sweep(x: np.ndarray, ids: np.ndarray, cfg: SemDedupConfig, device: str, wd: Path) -> None:
    """M on a seeded subsample for several cluster counts (same mean cluster size x multiplier)."""
    n = x.shape[0]
    rng = np.random.default_rng(cfg.seed)
    sub = np.sort(rng.choice(n, size=min(n, cfg.sweep_subsample), replace=False))
    xs, ids_s = x[sub], ids[sub]
    base = cfg.n_clusters * len(sub) / n
    ks = sorted({max(1, min(len(sub), round(base * mult))) for mult in cfg.sweep_multipliers})
    rows_k, rows_m = [], []
    for k in ks:
        _, labels, sims = cluster_rows(xs, cfg, device, k)
        sc = score_clusters(xs, ids_s, labels, sims, cfg, device)
        rows_k.append(np.full(len(sc.m), k, np.int64))
        rows_m.append(sc.m)
    write_parquet_atomic(pa.table({"k": np.concatenate(rows_k), "m": np.concatenate(rows_m)}), wd / "sweep.parquet")


def prune_cluster_group(
    group_file: str | os.PathLike, cfg: SemDedupConfig, out_dir: str | os.PathLike | None = None
) -> str:
    """Step 2: M and nearest earlier neighbour for every sample of one cluster group.

    Writes `<out_dir>/<group>.parquet` (default `<run>/semdedup/scores/`) atomically; an existing one
    is reused (resume). Memory: the group's rows + chunk_size^2 floats.
    """
    gf = Path(group_file)
    out = (Path(out_dir) if out_dir else gf.parent.parent / "scores") / (gf.name.removesuffix(".npz") + ".parquet")
    if out.exists():
        log.info("%s exists: skipping (resume)", out)
        return str(out)
    t0 = time.perf_counter()
    z = np.load(gf, allow_pickle=False)
    ids, shards, labels, sims, x = z["ids"], z["shards"], z["labels"], z["sims"], z["x"]
    device = resolve_device(cfg.device)
    sc = score_clusters(x, ids, labels, sims, cfg, device)
    shard_of = dict(zip(ids.tolist(), shards.tolist()))
    table = pa.table(
        {
            "sample_id": pa.array(sc.sample_id.tolist(), pa.string()),
            "shard": pa.array([shard_of[s] for s in sc.sample_id.tolist()], pa.string()),
            "cluster": sc.cluster,
            "rank": sc.rank,
            "sim_to_centroid": sc.sim_to_centroid.astype(np.float32),
            "m": sc.m.astype(np.float32),
            "neighbour_id": pa.array(sc.neighbour_id.tolist(), pa.string()),
        }
    )
    write_parquet_atomic(table, out)
    log.info("%s: %d samples in %d clusters scored in %.1fs on %s", gf.name, len(ids), len(np.unique(labels)),
             time.perf_counter() - t0, device)
    return str(out)


def load_scores(score_files: list[str]) -> tuple[ClusterScores, np.ndarray]:
    """All groups' scores (concatenated in file order) and the shard of each sample."""
    if not score_files:
        return ClusterScores.concat([]), np.zeros(0, dtype=str)
    t = pa.concat_tables([pq.read_table(f) for f in sorted(score_files)])
    sc = ClusterScores(
        np.asarray(t.column("sample_id").to_pylist(), dtype=object).astype(str),
        t.column("cluster").to_numpy(),
        t.column("rank").to_numpy(),
        t.column("sim_to_centroid").to_numpy(),
        t.column("m").to_numpy(),
        np.asarray(t.column("neighbour_id").to_pylist(), dtype=object).astype(str),
    )
    return sc, np.asarray(t.column("shard").to_pylist(), dtype=object).astype(str)


def decide_semdedup(run_dir: str | os.PathLike, cfg: SemDedupConfig, score_files: list[str] | None = None) -> dict:
    """Step 3: one global eps/target decision over all groups; writes the ledger and summary.json.

    Returns the summary dict (counts, eps, curves, per-cluster removal, sweep, removed-pair extremes).
    """
    wd = work_dir(run_dir)
    plan = ClusterPlan.load(wd / "plan.json")
    if score_files is None:
        score_files = [str(wd / "scores" / (Path(g).name.removesuffix(".npz") + ".parquet")) for g in plan.group_files]
    missing = [f for f in score_files if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} cluster groups have no scores yet, e.g. {missing[:3]}")
    sc, shards = load_scores(score_files)
    if len(sc.m) != plan.n_deduped:
        raise ValueError(f"scores cover {len(sc.m)} samples, clustering had {plan.n_deduped}")
    dec = decide(sc, cfg)
    reason = "semdedup_eps" if dec.mode == "eps" else "semdedup"

    ldir = step_dir(run_dir, STEP)
    if ldir.exists():  # the ledger is fully derived from scores: replace, never append
        for old in ldir.glob("part-*.parquet"):
            old.unlink()
    side = pq.read_table(wd / "side.parquet").to_pylist()
    with LedgerWriter(ldir / "part-side.parquet", STEP) as led:
        for r in side:
            led.add(r["sample_id"], r["decision"], r["reason"], None, r["shard"])
    with LedgerWriter(ldir / "part-scores.parquet", STEP) as led:
        for i in range(len(sc.m)):
            mi = float(sc.m[i])
            led.add(
                sc.sample_id[i],
                "drop" if dec.removed[i] else "keep",
                reason if dec.removed[i] else "",
                mi if np.isfinite(mi) else None,
                shards[i],
                cluster=int(sc.cluster[i]),
                neighbour_id=sc.neighbour_id[i],
                rank=int(sc.rank[i]),
            )

    rem = dec.removed
    pairs = pa.table(
        {
            "sample_id": sc.sample_id[rem].tolist(),
            "neighbour_id": sc.neighbour_id[rem].tolist(),
            "m": sc.m[rem],
            "cluster": sc.cluster[rem],
        }
    )
    write_parquet_atomic(pairs, wd / "removed_pairs.parquet")
    summary = summarize(sc, dec, plan, cfg, wd)
    write_json_atomic(summary, wd / "summary.json", indent=1)
    log.info("semdedup: removed %d of %d (%.3f%%) at eps=%.5f", summary["n_removed"], summary["n_deduped"],
             100 * summary["removed_fraction"], summary["eps"])
    return summary


def summarize(sc: ClusterScores, dec, plan: ClusterPlan, cfg: SemDedupConfig, wd: Path, n_pairs: int = 8) -> dict:
    """Numbers behind the report: counts, eps curve, cluster sizes, per-cluster removal, sweep, pairs."""
    n = len(sc.m)
    rem = dec.removed
    eps_grid, frac = removal_curve(sc.m)
    k = plan.n_clusters
    size = np.bincount(sc.cluster, minlength=k) if n else np.zeros(k, np.int64)
    removed_per = np.bincount(sc.cluster[rem], minlength=k) if n else np.zeros(k, np.int64)
    order = np.lexsort((sc.sample_id[rem], -sc.m[rem].astype(np.float64)))
    rids, rnb, rm, rc = sc.sample_id[rem][order], sc.neighbour_id[rem][order], sc.m[rem][order], sc.cluster[rem][order]

    def pair(i):
        return {"sample_id": str(rids[i]), "neighbour_id": str(rnb[i]), "m": float(rm[i]), "cluster": int(rc[i])}

    sweep = []
    sp = wd / "sweep.parquet"
    if sp.exists():
        t = pq.read_table(sp)
        ks, ms = t.column("k").to_numpy(), t.column("m").to_numpy().astype(np.float64)
        for kk in np.unique(ks):
            mk = ms[ks == kk]
            sweep.append({"k": int(kk), "removed_fraction": float((mk > dec.threshold).mean())})
    return {
        "mode": dec.mode,
        "n_input": plan.n_input,
        "n_deduped": n,
        "n_removed": int(rem.sum()),
        "removed_fraction": float(rem.mean()) if n else 0.0,
        "target_removal": cfg.target_removal,
        "n_target": dec.n_target,
        "n_asked": dec.n_asked,
        "min_similarity": dec.min_similarity,
        "eps": float(dec.eps),
        "threshold": float(dec.threshold),
        "eps_exact": bool(dec.eps_exact),
        "notes": dec.notes,
        "n_quarantined": plan.n_quarantined,
        "n_skipped": plan.n_skipped,
        "n_clusters": k,
        "kind": plan.kind,
        "keep": cfg.keep,
        "device": plan.device,
        "kmeans_seconds": plan.kmeans_seconds,
        "curve": {"eps": eps_grid.tolist(), "removed_fraction": frac.tolist()},
        "cluster_sizes": size.tolist(),
        "cluster_removed": removed_per.tolist(),
        "sweep": sweep,
        "most_similar_pairs": [pair(i) for i in range(min(n_pairs, len(rids)))],
        "least_similar_pairs": [pair(i) for i in range(len(rids) - 1, max(len(rids) - 1 - n_pairs, -1), -1)],
    }


def run_semdedup(
    embeddings_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: SemDedupConfig,
    prev: Passing | None = None,
) -> dict:
    """All three steps in one process (local runs, tests); `prev` as in `cluster_embeddings`. Returns the summary."""
    plan = cluster_embeddings(embeddings_dir, run_dir, cfg, prev)
    files = [prune_cluster_group(g, cfg) for g in plan.group_files]
    return decide_semdedup(run_dir, cfg, files)
