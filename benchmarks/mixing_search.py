"""Evaluations that greedy, beam and surrogate search need to reach the exhaustive optimum on synthetic
8-domain score tables (additive domain effects + pairwise interactions + noise), against the exhaustive
baseline of 255 soups measured in the same run.

    PYTHONPATH=. python benchmarks/mixing_search.py [--tables 20] [--noise 0.05]

Per strategy: how often it found the optimum, mean evaluations used, mean gap to the optimum. A strategy that
stops early without finding the optimum is charged its evaluations plus the rest of the power set it would
need (exhaustive fallback), so the ratio never flatters a strategy that gives up. Last line:
`ratio: <mean evaluations of the surrogate to reach the optimum / 255>`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.mixing.search import Oracle, beam, exhaustive, greedy, power_set, surrogate_search  # noqa: E402


def table(k: int, seed: int, noise: float) -> tuple[list[str], dict[frozenset[str], float]]:
    rng = np.random.default_rng(seed)
    doms = [f"d{i}" for i in range(k)]
    main = dict(zip(doms, rng.normal(0, 1, k)))
    pair = {p: rng.normal(0, 0.5) for p in itertools.combinations(doms, 2)}
    return doms, {s: sum(main[d] for d in s) + sum(pair[p] for p in itertools.combinations(sorted(s), 2))
                  + rng.normal(0, noise) for s in power_set(doms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, default=20)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.05)
    args = ap.parse_args()
    n_all = 2 ** args.k - 1
    strategies = {
        "exhaustive": lambda d, o, s: exhaustive(d, o),
        "greedy": lambda d, o, s: greedy(d, o),
        "beam3": lambda d, o, s: beam(d, o, 3),
        "surrogate": lambda d, o, s: surrogate_search(d, o, seed=s),
    }
    stats = {n: {"found": 0, "evals": [], "to_opt": [], "gap": []} for n in strategies}
    for seed in range(args.tables):
        doms, t = table(args.k, seed, args.noise)
        opt = max(t.values())
        for name, fn in strategies.items():
            r = fn(doms, Oracle.from_table(t), seed)
            reach = r.evals_to_reach(opt)
            st = stats[name]
            st["found"] += reach is not None
            st["evals"].append(r.n_evals)
            st["gap"].append(opt - r.score)
            st["to_opt"].append(reach if reach is not None else n_all)  # fallback: finish the power set
    print(f"{args.tables} synthetic tables, k={args.k} ({n_all} subsets), noise {args.noise}")
    print(f"{'strategy':<11} {'found':>7} {'evals':>7} {'to_opt':>7} {'gap':>7}")
    for name, st in stats.items():
        print(f"{name:<11} {st['found']:>4}/{args.tables:<2} {np.mean(st['evals']):>7.1f} {np.mean(st['to_opt']):>7.1f} "
              f"{np.mean(st['gap']):>7.3f}")
    for name in ("greedy", "beam3"):
        print(f"{name}: evals to optimum / {n_all} = {np.mean(stats[name]['to_opt']) / n_all:.3f}")
    print(f"ratio: {np.mean(stats['surrogate']['to_opt']) / n_all:.3f}")


if __name__ == "__main__":
    main()
