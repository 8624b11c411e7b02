"""Spherical k-means for SemDeDup: faiss (GPU when device=cuda), or torch where faiss is absent or has no GPU
support; flat or hierarchical (top-down) by the number of clusters; assignment by max inner product."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np

from core.steps.dedup.config import AUTO_BRANCHING, AUTO_HIERARCHICAL_MIN_CLUSTERS, KMEANS_AUTO, SemDedupConfig
from core.steps.dedup.device import _fp32_highest

log = logging.getLogger(__name__)


_SMALL_WORK = 2e8  # multiply-adds below which a CPU call runs single-threaded


@contextmanager
def _single_thread_if_small(work: float, device: str):
    """Run small CPU problems on one thread: an OpenMP barrier costs more than the work itself
    (measured 27 ms vs 350-650 ms for a 1200 x 8 k-means on a busy 2-core machine)."""
    if device != "cpu" or work >= _SMALL_WORK:
        yield
        return
    import torch

    faiss = _faiss()
    f_prev, t_prev = faiss.omp_get_max_threads() if faiss else 0, torch.get_num_threads()
    if faiss:
        faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if faiss:
            faiss.omp_set_num_threads(f_prev)
        torch.set_num_threads(t_prev)


def _faiss():
    """The faiss module, or None where it is not installed (e.g. a bare GPU machine: the torch path runs)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def kmeans_backend(device: str) -> str:
    """`faiss` when faiss can run k-means on `device` (CPU, or a faiss-gpu build on cuda), else `torch`."""
    faiss = _faiss()
    if faiss is None:
        return "torch"
    if device == "cuda" and faiss.get_num_gpus() == 0:
        return "torch"
    return "faiss"


def _kmeans_pp(xt, k: int, gen: np.random.Generator, pool: int = 10_000):
    """k-means++ seeding (D^2 sampling with D = 1 - cosine) on a seeded pool of max(pool, 16k) rows of `xt`
    (a torch tensor of unit rows): k rows, spread over the data, on xt's device."""
    import torch

    m = xt.shape[0]
    rows = torch.from_numpy(np.sort(gen.choice(m, size=min(m, max(pool, 16 * k)), replace=False))).to(xt.device)
    p = xt[rows]
    first = int(gen.integers(p.shape[0]))
    chosen = [first]
    best = p @ p[first]
    u = torch.from_numpy(gen.random(k)).to(xt.device)
    for i in range(1, k):
        w = (1 - best).clamp_min(0).double()
        total = w.sum()
        if total <= 0:  # fewer distinct rows than k: any unused row
            nxt = next(j for j in range(p.shape[0]) if j not in set(chosen))
        else:
            nxt = int(torch.searchsorted(torch.cumsum(w, 0), (u[i] * total).reshape(1)).clamp_max(p.shape[0] - 1))
        chosen.append(nxt)
        best = torch.maximum(best, p @ p[nxt])
    return p[torch.tensor(chosen, device=xt.device)].clone()


def torch_spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int, device: str = "cpu",
                           max_points_per_centroid: int = 256, block: int = 65_536) -> np.ndarray:
    """Unit-norm centroids (k, d) of spherical k-means in torch (GPU when device=cuda).

    Lloyd iterations like faiss.Kmeans(spherical=True): trains on a seeded subsample of at most
    k * max_points_per_centroid rows, starts from k-means++ seeds (`_kmeans_pp`), assigns by max inner product
    in row blocks (memory block x k), re-normalises the summed members; an empty cluster is re-seeded with
    the training row least similar to its own centroid. Used where faiss is absent or has no GPU support.
    """
    import torch

    n, d = x.shape
    gen = np.random.default_rng(seed)
    train_rows = np.sort(gen.choice(n, size=min(n, k * max_points_per_centroid), replace=False))
    with torch.inference_mode(), _fp32_highest():
        xt = torch.from_numpy(np.ascontiguousarray(x[train_rows], dtype=np.float32)).to(device)
        m = xt.shape[0]
        c = _kmeans_pp(xt, k, gen)
        for _ in range(niter):
            labels = torch.empty(m, dtype=torch.int64, device=xt.device)
            sims = torch.empty(m, dtype=torch.float32, device=xt.device)
            for s in range(0, m, block):
                v, i = (xt[s : s + block] @ c.T).max(dim=1)
                labels[s : s + block], sims[s : s + block] = i, v
            sums = torch.zeros_like(c).index_add_(0, labels, xt)
            counts = torch.bincount(labels, minlength=k)
            empty = torch.nonzero(counts == 0).flatten()
            if len(empty):  # re-seed with the worst-fitting rows (deterministic)
                far = torch.argsort(sims)[: len(empty)]
                sums[empty] = xt[far]
            c = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return c.float().cpu().numpy()


def spherical_kmeans(x: np.ndarray, n_clusters: int, niter: int, seed: int, device: str = "cpu") -> np.ndarray:
    """Unit-norm centroids (k, d) of spherical k-means on normalized rows `x` (faiss; GPU when device=cuda).

    k is capped at the number of rows. Deterministic for a given seed on CPU. Where faiss is not installed,
    or device=cuda and the faiss build has no GPU support, `torch_spherical_kmeans` runs on the device.
    """
    faiss = _faiss()
    n, d = x.shape
    k = min(n_clusters, n)
    if k < n_clusters:
        log.warning("n_clusters=%d > %d samples: using %d clusters", n_clusters, n, k)
    if k == 1:  # the spherical 1-means optimum is the normalized mean; faiss would do the same work
        c = x.astype(np.float64).sum(axis=0)
        nc = np.linalg.norm(c)
        return (c / nc if nc > 0 else x[0].astype(np.float64)).astype(np.float32)[None, :]
    if kmeans_backend(device) == "torch":
        with _single_thread_if_small(float(n) * k * d, device):
            return torch_spherical_kmeans(x, k, niter, seed, device)
    km = faiss.Kmeans(d, k, niter=niter, spherical=True, seed=seed, gpu=device == "cuda", verbose=False)
    with _single_thread_if_small(float(n) * k * d, device):
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    c = km.centroids.astype(np.float32)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-30)
    return c


def assign_clusters(
    x: np.ndarray, centroids: np.ndarray, device: str = "cpu", block: int = 16_384
) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64, cosine similarity to the assigned centroid float32) for normalized rows `x`.

    Row blocks on the torch device: memory is block x k floats beyond x itself.
    """
    import torch

    n = x.shape[0]
    labels = np.empty(n, np.int64)
    sims = np.empty(n, np.float32)
    with torch.inference_mode(), _fp32_highest(), _single_thread_if_small(float(n) * centroids.shape[0] * x.shape[1], device):
        c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
        for s in range(0, n, block):
            xb = torch.from_numpy(x[s : s + block]).to(device)
            v, i = (xb @ c.T).max(dim=1)
            labels[s : s + block] = i.cpu().numpy()
            sims[s : s + block] = v.cpu().numpy()
    return labels, sims


def hierarchical_kmeans(
    x: np.ndarray, n_clusters: int, niter: int, seed: int, device: str, branching: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-down spherical k-means: split into <= `branching` clusters, recurse into each with a share
    of n_clusters proportional to its size, until a node needs <= branching clusters (flat faiss there).

    Cost per k-means iteration is ~ N * branching * depth * d instead of N * k * d, i.e. N log N at a
    fixed mean cluster size. A sample is assigned to the nearest leaf of its branch (not the globally
    nearest centroid): two near-duplicates split at an upper level would not be compared.
    Returns (centroids, labels, similarity to own centroid).
    """
    n = x.shape[0]
    k = min(n_clusters, n)
    if k <= branching:
        cent = spherical_kmeans(x, k, niter, seed, device)
        labels, sims = assign_clusters(x, cent, device)
        return cent, labels, sims
    top = spherical_kmeans(x, branching, niter, seed, device)
    top_labels, _ = assign_clusters(x, top, device)
    sizes = np.bincount(top_labels, minlength=top.shape[0])
    quota = _apportion(sizes, k)
    cents, labels, sims = [], np.empty(n, np.int64), np.empty(n, np.float32)
    offset = 0
    for j in np.flatnonzero(sizes):
        rows = np.flatnonzero(top_labels == j)
        c, lab, sim = hierarchical_kmeans(x[rows], int(quota[j]), niter, seed + 7919 * (int(j) + 1), device, branching)
        labels[rows] = lab + offset
        sims[rows] = sim
        cents.append(c)
        offset += c.shape[0]
    return np.concatenate(cents), labels, sims


def _apportion(sizes: np.ndarray, k: int) -> np.ndarray:
    """Integer cluster quotas proportional to sizes, >= 1 per non-empty node, summing to ~k (largest remainder)."""
    nz = sizes > 0
    share = k * sizes / max(sizes.sum(), 1)
    q = np.where(nz, np.maximum(1, np.floor(share)), 0).astype(np.int64)
    rest = k - q.sum()
    if rest > 0:
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        for i in order[:rest]:
            if nz[i]:
                q[i] += 1
    return np.minimum(q, sizes)


def effective_branching(cfg: SemDedupConfig, n_clusters: int) -> int:
    """The branching `cluster_rows` uses for `n_clusters` clusters: cfg.kmeans_branching, or for auto (-1)
    flat (0) below AUTO_HIERARCHICAL_MIN_CLUSTERS clusters and AUTO_BRANCHING at or above."""
    if cfg.kmeans_branching != KMEANS_AUTO:
        return cfg.kmeans_branching
    return AUTO_BRANCHING if n_clusters >= AUTO_HIERARCHICAL_MIN_CLUSTERS else 0


def cluster_rows(x: np.ndarray, cfg: SemDedupConfig, device: str, n_clusters: int | None = None):
    """(centroids, labels, similarity to own centroid): flat k-means, or hierarchical when the effective
    branching (`effective_branching`: config, or automatic by the number of clusters) is > 1."""
    k = min(n_clusters or cfg.n_clusters, x.shape[0])
    b = effective_branching(cfg, k)
    if b > 1 and k > b:
        log.info("hierarchical k-means: %d rows, %d clusters, branching %d", x.shape[0], k, b)
        return hierarchical_kmeans(x, k, cfg.kmeans_iters, cfg.seed, device, b)
    cent = spherical_kmeans(x, k, cfg.kmeans_iters, cfg.seed, device)
    labels, sims = assign_clusters(x, cent, device)
    return cent, labels, sims
