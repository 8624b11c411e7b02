"""How close SemDeDup runs to this machine's float32 matmul limit, and what memory it needs.

Measured in one run on the same random-but-clustered data (mean cluster size ~100, plus 1% exact and
1% noisy planted copies):
  * end to end (normalize, faiss spherical k-means, assignment, chunked M, decisions) per size:
    wall time, peak RSS over the input matrix, achieved GFLOP/s of k-means + assignment + pairwise
    work / GFLOP/s of one large float32 matmul (best of torch/MKL and numpy) measured in this run;
  * time exponent across sizes (fixed mean cluster size);
  * removal sets of the chunked pass == dense per-cluster reference (same assignment);
  * |removed fraction - target| for 5%, 10%, 30%;
  * skewed case: one big cluster, peak memory of the chunked pass vs the dense reference (each in
    its own process), identical M.
Last line: `ratio: X` = end-to-end achieved GFLOP/s / matmul GFLOP/s at the largest size.

    PYTHONPATH=. .venv/bin/python benchmarks/dedup_scale.py [--sizes 30000,100000] [--skew 20000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples RSS every few ms in a thread (faiss and torch allocations are invisible to tracemalloc)."""

    def __enter__(self):
        self.peak = rss_bytes()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def matmul_gflops(n: int = 4096, d: int = 768, reps: int = 3) -> dict[str, float]:
    """Best-of-reps GFLOP/s of an (n x d) @ (d x n) float32 product, torch (MKL) and numpy."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, d), dtype=np.float32)
    b = rng.standard_normal((d, n), dtype=np.float32)
    out = {}
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for name, fn in (("torch", lambda: ta @ tb), ("numpy", lambda: a @ b)):
        fn()
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n * n * d / best / 1e9
    return out


def pairwise_flops(sizes: np.ndarray, chunk: int, d: int) -> float:
    """FLOPs the chunked pass performs: upper-triangle blocks (row block <= column block), 2d per entry."""
    total = 0.0
    for n in sizes[sizes > 1]:
        nb = math.ceil(n / chunk)
        for cb in range(nb):
            c0, c1 = cb * chunk, min(n, (cb + 1) * chunk)
            total += c1 * (c1 - c0)  # rows 0..c1 (all row blocks up to and including the diagonal one)
    return 2.0 * d * total


def run_size(n: int, d: int, niter: int, chunk: int, seed: int, branching: int = 0) -> dict:
    from core.demo.embeddings import clustered_embeddings, plant_duplicates
    from core.steps.dedup.config import SemDedupConfig
    from core.steps.dedup.embeddings import normalize_rows
    from core.steps.dedup.semdedup import cluster_rows, decide_eps, decide_target, score_clusters

    rss0 = rss_bytes()
    base = clustered_embeddings(int(n * 0.98), d, max(1, n // 100), seed=seed, spread=0.7)
    x, ids, planted = plant_duplicates(base, n_exact=n // 100, n_noisy=n - len(base) - n // 100, noise=0.05, seed=seed + 1)
    del base
    ids = np.asarray(ids)
    n = len(ids)
    k = max(1, n // 100)
    cfg = SemDedupConfig(n_clusters=k, target_removal=0.10, kmeans_iters=niter, chunk_size=chunk, device="cpu",
                         seed=seed, kmeans_branching=branching)
    matrix_bytes = x.nbytes
    t = {}
    rss_start = rss_bytes()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        x = normalize_rows(list(ids), x, inplace=True)
        t["normalize"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        cent, labels, sims = cluster_rows(x, cfg, "cpu")
        t["kmeans"] = time.perf_counter() - t1  # training + assignment
        t1 = time.perf_counter()
        sc = score_clusters(x, ids, labels, sims, cfg, "cpu")
        t["pairwise"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        dec = decide_target(sc.m, sc.sample_id, 0.10)
        t["decide"] = time.perf_counter() - t1
        t["total"] = time.perf_counter() - t0
    k = cent.shape[0]
    sizes = np.bincount(labels, minlength=k)
    fl_km = kmeans_flops(n, k, d, niter, branching)
    fl_pw = pairwise_flops(sizes, chunk, d)
    removed_planted = set(sc.sample_id[decide_target(sc.m, sc.sample_id, len(planted) / n).removed])
    members = set(planted) | set(planted.values())
    pair_recall = sum(1 for c, s in planted.items() if c in removed_planted or s in removed_planted) / len(planted)
    pair_precision = len(removed_planted & members) / max(len(removed_planted), 1)
    ref = score_clusters(x, ids, labels, sims, cfg, "cpu", reference=True)
    same_m = bool(np.array_equal(ref.m, sc.m) and np.array_equal(ref.sample_id, sc.sample_id))
    ref_dec = decide_target(ref.m, ref.sample_id, 0.10)
    same_target = set(sc.sample_id[dec.removed]) == set(ref.sample_id[ref_dec.removed])
    same_eps = set(sc.sample_id[decide_eps(sc.m, 0.05).removed]) == set(ref.sample_id[decide_eps(ref.m, 0.05).removed])
    hits = {}
    for f in (0.05, 0.10, 0.30):
        r = decide_target(sc.m, sc.sample_id, f)
        hits[f] = abs(r.removed.mean() - f) * 100  # percentage points
    return {
        "n": n, "d": d, "k": k, "niter": niter, "times": t, "matrix_mb": matrix_bytes / 2**20,
        "peak_over_matrix": (mem.peak - rss_start + matrix_bytes) / matrix_bytes,
        "peak_over_matrix_incl_datagen": (mem.peak - rss0) / matrix_bytes,
        "flops": {"kmeans": fl_km, "pairwise": fl_pw},
        "pair_precision": pair_precision, "pair_recall": pair_recall,
        "max_cluster": int(sizes.max()), "same_m": same_m, "same_target_set": same_target, "same_eps_set": same_eps,
        "target_miss_pp": hits, "eps_for_10pct": dec.eps,
    }


def skew_child(mode: str, n: int, d: int, chunk: int) -> None:
    """One big cluster's pairwise pass in a fresh process: prints JSON with the peak RSS over baseline."""
    from core.demo.embeddings import clustered_embeddings
    from core.steps.dedup.semdedup import dense_max_earlier_similarity, max_earlier_similarity

    x = clustered_embeddings(n, d, 1, seed=7, spread=0.7)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    import torch

    torch.ones(1) @ torch.ones(1)  # load torch's kernels before the baseline
    base = rss_bytes()
    with PeakRSS() as mem:
        t = time.perf_counter()
        m, a = (max_earlier_similarity(x, chunk) if mode == "chunked" else dense_max_earlier_similarity(x))
        dt = time.perf_counter() - t
    peak = mem.peak
    np.save(os.environ["DEDUP_BENCH_OUT"], m)
    print(json.dumps({"mode": mode, "extra_mb": (peak - base) / 2**20, "seconds": dt}))


def kmeans_flops(n: int, k: int, d: int, niter: int, branching: int, max_points_per_centroid: int = 256) -> float:
    """Inner-product FLOPs of k-means training + final assignment, flat or per hierarchical level.

    faiss trains on at most k * max_points_per_centroid points (a subsample), then all n are assigned.
    """

    def flat(nn: float, kk: float) -> float:
        return 2.0 * d * kk * (min(nn, kk * max_points_per_centroid) * niter + nn)

    if branching <= 1 or k <= branching:
        return flat(n, k)
    levels = math.ceil(math.log(k) / math.log(branching) - 1e-9)
    total = 0.0
    for lvl in range(levels):
        nodes = branching**lvl
        kk = branching if lvl < levels - 1 else max(1.0, k / nodes)
        total += nodes * flat(n / nodes, kk)
    return total


def run_skew(n: int, d: int, chunk: int, tmp: str) -> dict:
    res = {}
    ms = {}
    for mode in ("chunked", "dense"):
        env = dict(os.environ, DEDUP_BENCH_OUT=os.path.join(tmp, f"m_{mode}.npy"))
        p = subprocess.run([sys.executable, __file__, "--skew-child", mode, "--skew", str(n), "--dim", str(d),
                            "--chunk", str(chunk)], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            res[mode] = {"error": p.stderr[-500:]}
            continue
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        ms[mode] = np.load(env["DEDUP_BENCH_OUT"])
    res["identical_m"] = bool(len(ms) == 2 and np.array_equal(ms["chunked"], ms["dense"]))
    res["dense_matrix_mb"] = n * n * 4 / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="30000,100000", help="comma-separated N (e.g. 100000,300000,1000000)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--skew", type=int, default=20000, help="size of the one big cluster (50000 needs ~10 GB dense)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--branching", type=int, default=0, help="0 = flat faiss k-means, b>1 = hierarchical")
    ap.add_argument("--skew-child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.skew_child:
        skew_child(args.skew_child, args.skew, args.dim, args.chunk)
        return

    peak = matmul_gflops(d=args.dim)
    ref = max(peak.values())
    print(f"matmul float32 4096x{args.dim}x4096: torch {peak['torch']:.1f} GFLOP/s, numpy {peak['numpy']:.1f} "
          f"GFLOP/s; reference = {ref:.1f}", flush=True)
    results = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        r = run_size(n, args.dim, args.niter, args.chunk, seed=0, branching=args.branching)
        t, fl = r["times"], r["flops"]
        work = fl["kmeans"] + fl["pairwise"]
        r["gflops_work"] = work / (t["kmeans"] + t["pairwise"]) / 1e9
        r["gflops_e2e"] = work / t["total"] / 1e9
        r["ratio"] = r["gflops_e2e"] / ref
        results.append(r)
        print(
            f"N={r['n']} d={r['d']} k={r['k']} niter={r['niter']} "
            f"{'flat' if args.branching <= 1 else f'hierarchical b={args.branching}'} k-means: total {t['total']:.1f}s "
            f"(k-means+assign {t['kmeans']:.1f}s {fl['kmeans'] / t['kmeans'] / 1e9:.0f} GFLOP/s, "
            f"pairwise {t['pairwise']:.2f}s {fl['pairwise'] / max(t['pairwise'], 1e-9) / 1e9:.0f} GFLOP/s, "
            f"decide {t['decide']:.3f}s); largest cluster {r['max_cluster']}", flush=True
        )
        print(f"  peak working set = {r['peak_over_matrix']:.2f} x the {r['matrix_mb']:.0f} MB matrix (incl. the "
              f"matrix; {r['peak_over_matrix_incl_datagen']:.2f} x counting data-generation leftovers); achieved "
              f"{r['gflops_e2e']:.1f} GFLOP/s end to end ({r['gflops_work']:.1f} in k-means+pairwise)"
              f" = {r['ratio']:.2f} of matmul", flush=True)
        print(f"  chunked == dense reference: M identical {r['same_m']}, target-10% set {r['same_target_set']}, "
              f"eps-0.05 set {r['same_eps_set']}; target miss (pp): "
              + ", ".join(f"{int(f * 100)}%: {v:.4f}" for f, v in r["target_miss_pp"].items())
              + f"; eps for 10% = {r['eps_for_10pct']:.5f}; planted pairs precision {r['pair_precision']:.3f} "
              f"recall {r['pair_recall']:.3f}", flush=True)
    if len(results) >= 2:
        a, b = results[0], results[-1]
        expo = math.log(b["times"]["total"] / a["times"]["total"]) / math.log(b["n"] / a["n"])
        km = math.log(b["times"]["kmeans"] / a["times"]["kmeans"]) / math.log(b["n"] / a["n"])
        rest = (b["times"]["total"] - b["times"]["kmeans"]) / max(a["times"]["total"] - a["times"]["kmeans"], 1e-9)
        print(f"time exponent N^{expo:.2f} end to end (k-means+assign alone N^{km:.2f}; flat k-means is O(N^2 d) "
              f"when k grows with N); everything after k-means: N^{math.log(rest) / math.log(b['n'] / a['n']):.2f}",
              flush=True)
    if args.skew:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            s = run_skew(args.skew, args.dim, args.chunk, tmp)
        c, dn = s.get("chunked", {}), s.get("dense", {})
        print(f"skewed cluster of {args.skew}: chunked pass +{c.get('extra_mb', float('nan')):.0f} MB in "
              f"{c.get('seconds', float('nan')):.1f}s, dense reference +{dn.get('extra_mb', float('nan')):.0f} MB "
              f"(n^2 matrix {s['dense_matrix_mb']:.0f} MB) in {dn.get('seconds', float('nan')):.1f}s; "
              f"identical M {s['identical_m']}" + (f"; dense failed: {dn['error']}" if "error" in dn else ""))
    print(f"ratio: {results[-1]['ratio']:.2f}")


if __name__ == "__main__":
    main()
