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
"""

from __future__ import annotations

import heapq
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from core.dedup.config import AUTO_BRANCHING, AUTO_HIERARCHICAL_MIN_CLUSTERS, KMEANS_AUTO, SemDedupConfig
from core.dedup.embeddings import normalize_rows

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- devices
def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu`; `cuda` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU")
    return device


# ---------------------------------------------------------------------------------------- k-means
@contextmanager
def _fp32_highest():
    """Full float32 matmuls (no TF32 on GPU) so GPU and CPU decide alike; restored afterwards."""
    import torch

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


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


# ---------------------------------------------------------------------------------------- ordering
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


# ---------------------------------------------------------------------------------------- pairwise
def max_earlier_similarity(
    x: np.ndarray, chunk_size: int = 4096, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """M_j = max_{i<j} <x_i, x_j> and its argmax i (-1 for j=0), for rows `x` in keep order.

    Only upper-triangle blocks of chunk_size x chunk_size are formed, and a running max is kept per
    column block, so extra memory is O(chunk_size^2) whatever the cluster size (a 50k cluster never
    materializes 50k x 50k). Exact float32 products (TF32 is disabled on GPU).
    """
    import torch

    n = x.shape[0]
    a_out = np.full(n, -1, np.int64)
    if n < 2:
        return np.full(n, -np.inf, np.float32), a_out
    b = max(1, int(chunk_size))
    with torch.inference_mode():
        with _fp32_highest():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
            tri = None
            for c0 in range(0, n, b):
                c1 = min(n, c0 + b)
                cols = xt[c0:c1]
                best = torch.full((c1 - c0,), -math.inf, device=xt.device)
                barg = torch.full((c1 - c0,), -1, dtype=torch.int64, device=xt.device)
                for r0 in range(0, c1, b):
                    r1 = min(c1, r0 + b)
                    s = xt[r0:r1] @ cols.T
                    if r0 == c0:  # diagonal block: keep only i < j
                        if tri is None or tri.shape != s.shape:
                            tri = torch.ones(s.shape, dtype=torch.bool, device=xt.device).tril_()
                        s.masked_fill_(tri, -math.inf)
                    v, a = s.max(dim=0)
                    upd = v > best  # strict: on ties the earliest row block wins (argmax = first)
                    best = torch.where(upd, v, best)
                    barg = torch.where(upd, a + r0, barg)
                a_out[c0:c1] = barg.cpu().numpy()
    return _exact_m(x, a_out), a_out


def batched_max_earlier_similarity(
    x: np.ndarray, positions: list[np.ndarray], device: str = "cpu"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`max_earlier_similarity` for many small clusters (rows `x[pos]`, in keep order) at once.

    Thousands of ~100-member clusters would otherwise cost a few kernel launches each; here a batch
    of B clusters padded to the largest size n costs one (B, n, n) product. Padding rows are masked.
    """
    import torch

    if not positions:
        return []
    nmax = max(len(p) for p in positions)
    pad = np.zeros((len(positions), nmax, x.shape[1]), np.float32)
    lens = np.array([len(p) for p in positions])
    for b, p in enumerate(positions):
        pad[b, : len(p)] = x[p]
    with torch.inference_mode(), _fp32_highest():
        xt = torch.from_numpy(pad).to(device)
        s = torch.bmm(xt, xt.transpose(1, 2))  # (B, rows i, cols j)
        i = torch.arange(nmax, device=xt.device)
        invalid = (i[:, None] >= i[None, :])[None] | (i[None, :, None] >= torch.as_tensor(lens, device=xt.device)[:, None, None])
        s.masked_fill_(invalid, -math.inf)
        v, a = s.max(dim=1)
        a = a.cpu().numpy()
    out = []
    for b, p in enumerate(positions):
        ab = a[b, : len(p)].astype(np.int64)
        ab[0] = -1
        out.append((_exact_m(pad[b, : len(p)], ab), ab))
    return out


def _exact_m(x: np.ndarray, argmax: np.ndarray) -> np.ndarray:
    """M recomputed in float64 for the chosen neighbour, clipped to [-1, 1], as float32.

    A float32 GEMM entry depends (by ~1e-7) on the BLAS kernel chosen for the block shape, so two
    correct blockings can disagree on M near a threshold. Recomputing the winning pair exactly makes
    M independent of blocking unless two neighbours tie within float32 rounding (exact copies tie
    exactly, so they still agree).
    """
    m = np.full(len(argmax), -np.inf, np.float32)
    j_all = np.flatnonzero(argmax >= 0)
    for s in range(0, len(j_all), 4096):  # blockwise: float64 copies of a 50k cluster would be 600 MB
        j = j_all[s : s + 4096]
        dots = np.einsum("ij,ij->i", x[argmax[j]].astype(np.float64), x[j].astype(np.float64))
        m[j] = np.clip(dots, -1.0, 1.0).astype(np.float32)
    return m


def dense_max_earlier_similarity(x: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Reference: the full n x n similarity matrix at once, as the paper's code does. O(n^2) memory."""
    import torch

    n = x.shape[0]
    a_out = np.full(n, -1, np.int64)
    if n < 2:
        return np.full(n, -np.inf, np.float32), a_out
    with torch.inference_mode(), _fp32_highest():
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        s = xt @ xt.T
        # mask i >= j strip by strip so the reference's memory is the n x n matrix itself, not 1.25x
        strip = 1024
        for r0 in range(0, n, strip):
            r1 = min(n, r0 + strip)
            rows = torch.arange(r0, r1, device=xt.device)[:, None]
            s[r0:r1].masked_fill_(rows >= torch.arange(n, device=xt.device)[None, :], -math.inf)
        v, a = s.max(dim=0)
        del s
    a_out[1:] = a.cpu().numpy()[1:]
    return _exact_m(x, a_out), a_out


# ---------------------------------------------------------------------------------------- groups
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


# ---------------------------------------------------------------------------------------- decisions
@dataclass
class Decision:
    """Which samples to remove. `eps` reproduces the removal set in eps mode iff `eps_exact`."""

    removed: np.ndarray  # bool, aligned with the scores
    eps: float
    threshold: float  # remove iff M > threshold (= 1 - eps)
    eps_exact: bool
    mode: str  # "eps" | "target"
    n_target: int | None = None  # removals made in target mode (<= n_asked)
    notes: list[str] = field(default_factory=list)
    n_asked: int | None = None  # removals asked in target mode (round(target_removal * N))
    min_similarity: float | None = None  # target mode's floor: nothing with M <= floor is removed


def decide_eps(m: np.ndarray, eps: float) -> Decision:
    """Paper rule: remove j iff M_j > 1 - eps."""
    t = 1.0 - float(eps)
    return Decision(m.astype(np.float64) > t, float(eps), t, True, "eps")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def decide_target(m: np.ndarray, ids: np.ndarray, fraction: float, min_similarity: float | None = None) -> Decision:
    """Remove round(fraction * N) samples with the largest M (ties by sample id, ascending), but never one
    whose M is not above `min_similarity` (the floor): when fewer samples qualify, only those are removed
    and a note says "asked 10% (9 of 90), found only 3% (3) above the floor ...". Samples without M (the
    first member of every cluster) are never removed; when they are what limits the count, the note says
    that fewer clusters would let more pairs be compared.
    """
    n = len(m)
    n_asked = round_half_up(fraction * n)
    finite = np.isfinite(m)
    m64 = np.where(finite, m.astype(np.float64), -np.inf)
    eligible = finite if min_similarity is None else finite & (m64 > float(min_similarity))
    n_removable, n_eligible = int(finite.sum()), int(eligible.sum())
    notes = []
    n_target = n_asked
    if n_asked > n_eligible:
        n_target = n_eligible
        if n_asked > n_removable and n_eligible == n_removable:
            notes.append(
                f"asked {fraction:.0%} ({n_asked} of {n}), found only {n_removable / max(n, 1):.0%} ({n_removable}) "
                f"comparable: SemDeDup keeps the first member of each of the {n - n_removable} non-empty clusters; "
                f"removed {n_target}. Fewer clusters (lower n_clusters) would compare more pairs")
        else:
            notes.append(
                f"asked {fraction:.0%} ({n_asked} of {n}), found only {n_eligible / max(n, 1):.0%} ({n_eligible}) "
                f"above the floor min_similarity={min_similarity}: removed those {n_target}; the rest are less "
                f"similar than the floor, not duplicates")
    order = np.lexsort((np.asarray(ids).astype(str), -m64))
    removed = np.zeros(n, bool)
    removed[order[:n_target]] = True
    last = m64[order[n_target - 1]] if n_target > 0 else None
    nxt = m64[order[n_target]] if n_target < n else -np.inf
    if last is None:
        t = float(max(nxt, -1.0)) if np.isfinite(nxt) else 1.0
        exact = True
    elif not np.isfinite(nxt):
        t = max(last - 1e-6, -1.0 - 1e-6)
        exact = True
    elif last > nxt:
        t = 0.5 * (last + nxt)
        exact = True
    else:
        t = last
        exact = False
        n_tied = int((m64 == last).sum())
        notes.append(f"{n_tied} samples tie at M={last:.7f} across the cut; ties broken by sample id")
    return Decision(removed, float(1.0 - t), float(t), exact, "target", n_target, notes, n_asked, min_similarity)


def removal_curve(m: np.ndarray, eps_grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(eps values, removed fraction at each eps) from M, without recomputing anything."""
    if eps_grid is None:
        eps_grid = np.concatenate([np.linspace(0, 0.02, 21), np.linspace(0.025, 0.3, 56)])
    mm = np.sort(np.where(np.isfinite(m), m, -np.inf).astype(np.float64))
    n = max(len(mm), 1)
    removed = len(mm) - np.searchsorted(mm, 1.0 - eps_grid, side="right")
    return eps_grid, removed / n


# ---------------------------------------------------------------------------------------- in memory
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


def decide(scores: ClusterScores, cfg: SemDedupConfig) -> Decision:
    """Eps or target decision per the config."""
    if cfg.eps is not None:
        return decide_eps(scores.m, cfg.eps)
    return decide_target(scores.m, scores.sample_id, float(cfg.target_removal), cfg.min_similarity)


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
