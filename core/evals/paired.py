"""Paired comparison of two models on the same eval items: the mean per-item difference, a 95% interval, a
p-value and a `significant` flag.

The test is a sign-flip permutation test (Fisher's randomization test for paired data) on the mean difference:
under "no difference", each item's difference is as likely to have either sign, so the observed mean is compared
with the means of every sign pattern (all 2^n of them up to `exact_max_n` items, else `n_resamples` seeded random
patterns, the observed one counted in). The interval is that test inverted: the shifts d for which "the
differences minus d are symmetric around 0" is not rejected at 5%. Why not a paired bootstrap: the ablations this
serves have a few to a few hundred eval items, and at a handful of items the percentile bootstrap is
anti-conservative (with 4 items that all moved the same way every resample has the same sign, so it would call
4 items significant); the permutation test is exact at any n (with 5 items or fewer no pattern can reach 5%, and
the interval is unbounded, which is the honest answer). Interval and flag come from the same test, so a flag is
set exactly when the interval excludes 0. Flags are per cell; nothing corrects for the many cells of a grid:
the seed-to-seed noise floor (`core.runs.ablation_compare`) is the guard against reading noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class PairedDiff:
    """`b - a` over the n items both have: means, the mean difference, its 95% interval (lo, hi; infinite when
    n is too small for any pattern to reach 5%), the two-sided p-value and whether p <= alpha."""

    n: int
    mean_a: float
    mean_b: float
    delta: float
    lo: float
    hi: float
    p_value: float
    significant: bool
    method: str


def _sign_patterns(n: int, exact_max_n: int, n_resamples: int, seed: int) -> tuple[np.ndarray, bool]:
    """±1 sign patterns [P, n]: all 2^n when n <= exact_max_n (exact test), else seeded random draws."""
    if n <= exact_max_n:
        codes = np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)[None, :]
        return (1 - 2 * (codes & 1)).astype(np.float64), True
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1.0, 1.0]), size=(n_resamples, n)), False


def paired_test(a: Sequence[float], b: Sequence[float], *, alpha: float = ALPHA, n_resamples: int = 10_000,
                seed: int = 0, exact_max_n: int = 16) -> PairedDiff:
    """Sign-flip permutation test of mean(b - a) = 0 over paired items, with the interval by test inversion
    (module docstring). Pairs where either value is NaN are left out. Deterministic for a given seed."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    nan = float("nan")
    if n == 0:
        return PairedDiff(0, nan, nan, nan, nan, nan, nan, False, "no paired items")
    d = y - x
    signs, exact = _sign_patterns(n, exact_max_n, n_resamples, seed)
    method = f"sign-flip permutation, {'exact' if exact else f'{len(signs)} seeded draws'}"
    u, v = signs @ d, signs.sum(axis=1)  # pattern s on (d - t): sum = u_s - t * v_s, so any shift t costs O(P)
    total = float(d.sum())
    scale = max(float(np.abs(d).max()), 1e-12)

    def p_at(t: float) -> float:
        obs = abs(total - n * t)
        hits = int(np.count_nonzero(np.abs(u - t * v) >= obs - 1e-9 * scale * n))
        return hits / len(signs) if exact else (hits + 1) / (len(signs) + 1)

    p = p_at(0.0)
    delta = total / n
    lo, hi = _bound(p_at, delta, float(d.min()) - scale, alpha), _bound(p_at, delta, float(d.max()) + scale, alpha)
    return PairedDiff(n, float(x.mean()), float(y.mean()), delta, lo, hi, p, p <= alpha, method)


def _bound(p_at, inside: float, outside: float, alpha: float, iters: int = 60) -> float:
    """The interval's end between `inside` (the mean difference, p = 1) and `outside` (beyond every difference):
    bisection on "p > alpha"; +-inf when even `outside` is not rejected (too few items for any pattern to
    reach alpha)."""
    if p_at(outside) > alpha:
        return math.copysign(math.inf, outside - inside)
    for _ in range(iters):
        mid = (inside + outside) / 2
        if p_at(mid) > alpha:
            inside = mid
        else:
            outside = mid
    return inside
