"""SemDeDup (Abbas et al. 2023, arXiv:2303.09540) on in-memory arrays.

1. L2-normalize; spherical k-means (faiss, or torch where faiss is absent); assign every sample to its most similar centroid.
2. Order each cluster by cosine similarity to its centroid according to the keep policy. The paper
   (and its reference code, `keep_hard=True`) sorts by *distance* to the centroid in descending order,
   so the member least similar to the centroid comes first and, being first, is the one kept from
   each duplicate group: `keep="hard"`. `keep="easy"` keeps the most prototypical member,
   `keep="random"` a seeded random one.
3. M_j = max cosine similarity of j to any EARLIER member of its cluster order (the column max of the
   strict upper triangle); the first member of a cluster has M = -inf and is never removed.
4. Eps mode: remove j iff M_j > 1 - eps. Target mode: remove the round(f * N) largest M (ties broken by
   sample id) and report the eps that does it. M is computed once; every eps/target is a threshold.

Unlike the reference code (which zeroes the lower triangle, so M >= 0), M here is the exact max, which
only differs for eps >= 1. M is clipped to [-1, 1] so rounding never makes an exact copy exceed 1.

Modules: `device` (device, precision), `kmeans` (step 1), `scores` (step 2 and per-cluster scores),
`similarity` (step 3, three M variants), `decisions` (step 4). This module runs them end to end
(`semdedup_arrays`) and re-exports their public names, so `from core.steps.dedup.semdedup import ...` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.steps.dedup.config import SemDedupConfig
from core.steps.dedup.decisions import Decision, decide, decide_eps, decide_target, removal_curve, round_half_up
from core.steps.dedup.device import resolve_device
from core.steps.dedup.embeddings import normalize_rows
from core.steps.dedup.kmeans import (
    assign_clusters,
    cluster_rows,
    effective_branching,
    hierarchical_kmeans,
    kmeans_backend,
    spherical_kmeans,
    torch_spherical_kmeans,
)
from core.steps.dedup.scores import ClusterScores, balance_groups, keep_order, score_clusters
from core.steps.dedup.similarity import (
    batched_max_earlier_similarity,
    dense_max_earlier_similarity,
    max_earlier_similarity,
)

__all__ = [
    "ClusterScores",
    "Decision",
    "SemDedupResult",
    "assign_clusters",
    "balance_groups",
    "batched_max_earlier_similarity",
    "cluster_rows",
    "decide",
    "decide_eps",
    "decide_target",
    "dense_max_earlier_similarity",
    "effective_branching",
    "hierarchical_kmeans",
    "keep_order",
    "kmeans_backend",
    "max_earlier_similarity",
    "removal_curve",
    "resolve_device",
    "round_half_up",
    "score_clusters",
    "semdedup_arrays",
    "spherical_kmeans",
    "torch_spherical_kmeans",
]


@dataclass
class SemDedupResult:
    """Everything SemDeDup decided about in-memory arrays (scores sorted by cluster, then keep rank)."""

    scores: ClusterScores
    decision: Decision
    centroids: np.ndarray
    n_clusters: int
    device: str

    @property
    def removed_ids(self) -> set[str]:
        return set(self.scores.sample_id[self.decision.removed].tolist())



def semdedup_arrays(
    ids: list[str] | np.ndarray, matrix: np.ndarray, cfg: SemDedupConfig, reference: bool = False
) -> SemDedupResult:
    """Run SemDeDup end to end on a matrix (rows aligned with ids). NaN/inf/zero-norm rows raise ValueError."""
    ids = np.asarray(ids).astype(str)
    if len(ids) != matrix.shape[0]:
        raise ValueError(f"{len(ids)} ids for {matrix.shape[0]} rows")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("duplicate sample ids")
    device = resolve_device(cfg.device)
    x = normalize_rows(list(ids), matrix)
    if len(ids) == 0:
        empty = ClusterScores.concat([])
        return SemDedupResult(empty, decide(empty, cfg), np.zeros((0, matrix.shape[1]), np.float32), 0, device)
    cent, labels, sims = cluster_rows(x, cfg, device)
    scores = score_clusters(x, ids, labels, sims, cfg, device, reference=reference)
    return SemDedupResult(scores, decide(scores, cfg), cent, int(cent.shape[0]), device)
