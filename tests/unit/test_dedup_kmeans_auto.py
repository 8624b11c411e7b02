"""SemDeDup k-means without faiss (the torch path a bare GPU machine runs) and the automatic choice between
flat and hierarchical k-means by the number of clusters."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from core.demo.embeddings import clustered_embeddings, plant_duplicates
from core.steps.dedup import kmeans
from core.steps.dedup import semdedup as sd
from core.steps.dedup.config import AUTO_BRANCHING, AUTO_HIERARCHICAL_MIN_CLUSTERS, KMEANS_AUTO, SemDedupConfig


def _cfg(**kw) -> SemDedupConfig:
    return SemDedupConfig(**({"n_clusters": 20, "eps": 0.01, "kmeans_iters": 10, "chunk_size": 256, "device": "cpu",
                              "sweep_subsample": 0} | kw))


@pytest.fixture
def no_faiss(monkeypatch):
    """Make `import faiss` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "faiss", None)


def _pairs(removed: set[str], planted: dict[str, str]) -> tuple[float, float]:
    members = set(planted) | set(planted.values())
    found = sum(1 for c, s in planted.items() if c in removed or s in removed)
    return len(removed & members) / max(len(removed), 1), found / len(planted)


def test_torch_kmeans_runs_without_faiss_and_finds_planted_pairs(no_faiss):
    assert sd.kmeans_backend("cpu") == "torch"
    x = clustered_embeddings(3000, 48, 20, seed=3, spread=0.6)
    x, ids, planted = plant_duplicates(x, n_exact=60, n_noisy=60, noise=0.03, seed=4)
    r = sd.semdedup_arrays(ids, x, _cfg())
    precision, recall = _pairs(r.removed_ids, planted)
    assert precision == 1.0 and recall == 1.0
    again = sd.semdedup_arrays(ids, x, _cfg())
    np.testing.assert_array_equal(r.scores.m, again.scores.m)  # seeded: deterministic


def test_torch_kmeans_recovers_well_separated_centres():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 32)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, 200, axis=0) + 0.05 * rng.standard_normal((1200, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = sd.torch_spherical_kmeans(x, 6, niter=20, seed=1)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
    # every true centre has a learned centroid at cosine > 0.99 (one cluster each)
    best = (centres @ c.T).max(axis=1)
    assert (best > 0.99).all(), best
    labels, _ = sd.assign_clusters(x, c)
    assert len(set(labels.tolist())) == 6


def test_auto_branching_by_clusters():
    c = _cfg()
    assert c.kmeans_branching == KMEANS_AUTO
    assert sd.effective_branching(c, AUTO_HIERARCHICAL_MIN_CLUSTERS - 1) == 0
    assert sd.effective_branching(c, AUTO_HIERARCHICAL_MIN_CLUSTERS) == AUTO_BRANCHING
    assert sd.effective_branching(_cfg(kmeans_branching=0), 10 * AUTO_HIERARCHICAL_MIN_CLUSTERS) == 0
    assert sd.effective_branching(_cfg(kmeans_branching=4), 10) == 4
    with pytest.raises(ValueError, match="kmeans_branching"):
        _cfg(kmeans_branching=-2)


def test_auto_goes_hierarchical_above_threshold(monkeypatch):
    """Above the (here lowered) cluster threshold, auto runs the hierarchical path: same result as asking for
    branching AUTO_BRANCHING explicitly, and a different clustering from flat."""
    x = clustered_embeddings(4000, 32, 80, seed=5, spread=0.6)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(kmeans, "AUTO_HIERARCHICAL_MIN_CLUSTERS", 64)  # read by kmeans.effective_branching
    auto = sd.cluster_rows(x, _cfg(n_clusters=80), "cpu")
    explicit = sd.cluster_rows(x, _cfg(n_clusters=80, kmeans_branching=AUTO_BRANCHING), "cpu")
    flat = sd.cluster_rows(x, _cfg(n_clusters=80, kmeans_branching=0), "cpu")
    np.testing.assert_array_equal(auto[1], explicit[1])
    assert not np.array_equal(auto[1], flat[1])
