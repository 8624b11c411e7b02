"""Per-cluster SemDeDup scores: the keep order inside a cluster, M and the nearest earlier neighbour of every
sample (`score_clusters`, `ClusterScores`), and cost-balanced groups of clusters for parallel workers."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from core.steps.dedup.config import SemDedupConfig
from core.steps.dedup.similarity import (
    batched_max_earlier_similarity,
    dense_max_earlier_similarity,
    max_earlier_similarity,
)


def keep_order(
    ids: np.ndarray, sims: np.ndarray, keep: str, random_seed: int = 0, cluster_id: int = 0
) -> np.ndarray:
    """Positions of one cluster's members in keep order (first = kept from any duplicate group).

    hard: ascending similarity to the centroid (paper default); easy: descending; random: a permutation
    seeded by (random_seed, cluster_id). Ties and the random base order use sample ids, so the
    result does not depend on input row order.
    """
    by_id = np.argsort(ids, kind="stable")
    if keep == "random":
        rng = np.random.default_rng([random_seed, cluster_id])
        return by_id[rng.permutation(len(by_id))]
    key = sims[by_id].astype(np.float64)
    order = np.argsort(key if keep == "hard" else -key, kind="stable")
    return by_id[order]



def balance_groups(sizes: dict[int, int] | np.ndarray, n_groups: int) -> list[list[int]]:
    """Split cluster ids into <= n_groups groups of similar pairwise cost (n^2/2 + n), largest first.

    Greedy longest-processing-time: each cluster goes to the currently cheapest group. Empty groups
    are dropped; cluster ids inside a group are sorted.
    """
    items = sizes.items() if isinstance(sizes, dict) else enumerate(np.asarray(sizes).tolist())
    clusters = sorted(((int(n) * int(n) / 2 + int(n), int(c)) for c, n in items if n > 0), key=lambda t: (-t[0], t[1]))
    heap = [(0.0, g) for g in range(max(1, n_groups))]
    groups: list[list[int]] = [[] for _ in heap]
    for cost, c in clusters:
        load, g = heapq.heappop(heap)
        groups[g].append(c)
        heapq.heappush(heap, (load + cost, g))
    return [sorted(g) for g in groups if g]


@dataclass
class ClusterScores:
    """Per-sample pairwise results of some clusters (all arrays aligned)."""

    sample_id: np.ndarray  # str
    cluster: np.ndarray  # int64
    rank: np.ndarray  # position in keep order within its cluster
    sim_to_centroid: np.ndarray  # float32
    m: np.ndarray  # float32, -inf for the first of a cluster
    neighbour_id: np.ndarray  # str, "" when none

    @staticmethod
    def concat(parts: list[ClusterScores]) -> ClusterScores:
        if not parts:
            e = np.zeros(0)
            return ClusterScores(e.astype(str), e.astype(np.int64), e.astype(np.int64), e.astype(np.float32),
                                 e.astype(np.float32), e.astype(str))
        return ClusterScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in ClusterScores.__dataclass_fields__))


def score_clusters(
    x: np.ndarray,
    ids: np.ndarray,
    labels: np.ndarray,
    sims: np.ndarray,
    cfg: SemDedupConfig,
    device: str = "cpu",
    reference: bool = False,
) -> ClusterScores:
    """M and nearest earlier neighbour for every sample of the clusters present in `labels`.

    `x` are normalized rows aligned with ids/labels/sims. Clusters are independent, so any grouping of
    clusters gives the same result. `reference=True` uses the dense per-cluster pass (tests, benchmark).
    """
    ids = np.asarray(ids).astype(str)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    clusters = []  # (cluster id, rows in keep order)
    for rows in np.split(order, bounds) if len(order) else []:
        c = int(labels[rows[0]])
        clusters.append((c, rows[keep_order(ids[rows], sims[rows], cfg.keep, cfg.random_seed, c)]))
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if reference:
        for c, pos in clusters:
            results[c] = dense_max_earlier_similarity(x[pos], device)
    else:
        budget = max(1, cfg.chunk_size) ** 2  # floats per batch, for the similarity and for the padded input
        small = sorted((len(pos), c, pos) for c, pos in clusters if len(pos) <= cfg.chunk_size)
        batch: list[tuple[int, np.ndarray]] = []
        for n_c, c, pos in small:
            if batch and (len(batch) + 1) * n_c * max(n_c, x.shape[1]) > budget:
                for (cb, _), r in zip(batch, batched_max_earlier_similarity(x, [p for _, p in batch], device)):
                    results[cb] = r
                batch = []
            batch.append((c, pos))
        for (cb, _), r in zip(batch, batched_max_earlier_similarity(x, [p for _, p in batch], device)):
            results[cb] = r
        for c, pos in clusters:
            if len(pos) > cfg.chunk_size:
                results[c] = max_earlier_similarity(x[pos], cfg.chunk_size, device)
    parts = []
    for c, pos in clusters:
        m, a = results[c]
        nb = np.where(a >= 0, ids[pos][np.maximum(a, 0)], "")
        parts.append(
            ClusterScores(ids[pos], np.full(len(pos), c, np.int64), np.arange(len(pos)), sims[pos], m, nb)
        )
    return ClusterScores.concat(parts)
