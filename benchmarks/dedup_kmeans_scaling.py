"""Flat vs hierarchical k-means in SemDeDup: time exponent and planted-pair recall on the same data.

For each N (mean cluster size fixed at --cluster-size, so k grows with N as in the paper's presets):
random-but-clustered vectors with 1% exact and 1% noisy planted copies; for flat (kmeans_branching=0)
and hierarchical (branching --branching) k-means on the SAME vectors: k-means+assignment time, pairwise
(M) time (process CPU time, summed over threads, so that other load on a shared machine does not bend
the exponent; wall time printed too), and recall/precision of the planted pairs when exactly as many samples as were planted are
removed (target mode). Then the fitted time exponent (least squares on log t vs log N) of each, the
per-item costs used by docs/dedup.md's 12M arithmetic, and this machine's float32 matmul rate.

    PYTHONPATH=. python benchmarks/dedup_kmeans_scaling.py [--sizes 20000,40000,80000,160000] [--dim 384]

Last line: `ratio: R` = flat total time / hierarchical total time at the largest N.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def fit_exponent(ns: list[int], ts: list[float]) -> float:
    """Slope of log(t) over log(N) (least squares)."""
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def run(n: int, d: int, cluster_size: int, niter: int, branching: int, seed: int = 0) -> list[dict]:
    from core.demo.embeddings import clustered_embeddings, plant_duplicates
    from core.steps.dedup.config import SemDedupConfig
    from core.steps.dedup.embeddings import normalize_rows
    from core.steps.dedup.semdedup import cluster_rows, decide_target, score_clusters

    base = clustered_embeddings(int(n * 0.98), d, max(1, n // cluster_size), seed=seed, spread=0.7)
    x, ids, planted = plant_duplicates(base, n_exact=n // 100, n_noisy=n - len(base) - n // 100, noise=0.05,
                                       seed=seed + 1)
    ids = np.asarray(ids)
    x = normalize_rows(list(ids), x, inplace=True)
    k = max(1, len(ids) // cluster_size)
    members = set(planted) | set(planted.values())
    out = []
    for b in (0, branching):
        cfg = SemDedupConfig(n_clusters=k, target_removal=0.1, kmeans_iters=niter, device="cpu", seed=seed,
                             kmeans_branching=b)
        w0, t0 = time.perf_counter(), time.process_time()
        _, labels, sims = cluster_rows(x, cfg, "cpu")
        t_km = time.process_time() - t0
        t1 = time.process_time()
        sc = score_clusters(x, ids, labels, sims, cfg, "cpu")
        t_pw = time.process_time() - t1
        wall = time.perf_counter() - w0
        removed = set(sc.sample_id[decide_target(sc.m, sc.sample_id, len(planted) / len(ids)).removed])
        recall = sum(1 for c, s in planted.items() if c in removed or s in removed) / len(planted)
        precision = len(removed & members) / max(len(removed), 1)
        sizes = np.bincount(labels)
        out.append({"n": len(ids), "k": k, "kmeans": "flat" if b == 0 else f"hier b={b}", "t_kmeans": t_km,
                    "t_pairwise": t_pw, "t_total": t_km + t_pw, "wall": wall, "recall": recall, "precision": precision,
                    "max_cluster": int(sizes.max()), "pair_flops": float(2 * d * (sizes.astype(float) ** 2).sum() / 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,40000,80000,160000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--cluster-size", type=int, default=100)
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--branching", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import faiss
    import pandas as pd
    import torch

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    m = torch.randn(4096, a.dim)
    m @ m.T
    t0 = time.perf_counter()
    for _ in range(3):
        m @ m.T
    mm = 3 * 2 * 4096 * 4096 * a.dim / (time.perf_counter() - t0) / 1e9
    print(f"matmul float32 4096x{a.dim}x4096: {mm:.1f} GFLOP/s ({a.threads} threads)", flush=True)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        for r in run(n, a.dim, a.cluster_size, a.niter, a.branching):
            rows.append(r)
            print(f"N={r['n']:>8} k={r['k']:>5} {r['kmeans']:<10} CPU time: k-means+assign {r['t_kmeans']:7.2f}s "
                  f"pairwise {r['t_pairwise']:6.2f}s (wall {r['wall']:.1f}s)  planted pairs recall {r['recall']:.3f} "
                  f"precision {r['precision']:.3f}  largest cluster {r['max_cluster']}", flush=True)
    t = pd.DataFrame(rows)
    print("CPU seconds (process time, all threads: robust to other load on a shared machine):")
    print(t[["n", "k", "kmeans", "t_kmeans", "t_pairwise", "t_total", "wall", "recall", "precision"]].round(3)
          .to_string(index=False))
    for kind, g in t.groupby("kmeans"):
        ns = g.n.tolist()
        print(f"{kind}: time exponent end to end N^{fit_exponent(ns, g.t_total.tolist()):.2f}, k-means+assign "
              f"N^{fit_exponent(ns, g.t_kmeans.tolist()):.2f}, pairwise N^{fit_exponent(ns, g.t_pairwise.tolist()):.2f}; "
              f"per item at N={ns[-1]}: k-means+assign {g.t_kmeans.iloc[-1] / ns[-1] * 1e6:.1f} us, "
              f"pairwise {g.t_pairwise.iloc[-1] / ns[-1] * 1e6:.1f} us (d={a.dim}, {a.threads} threads)")
    last = t[t.n == t.n.max()]
    ratio = float(last[last.kmeans == "flat"].t_total.iloc[0] / last[last.kmeans != "flat"].t_total.iloc[0])
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
