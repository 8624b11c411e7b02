"""The statistic of the proof of the proxy: Spearman rank correlation between soup scores and trained-mixture
scores over mixtures, with a bootstrap interval over mixtures. One function, used by the `prove_proxy` task
(through `spearman_by_benchmark`) and by `benchmarks/mixing_proxy.py`, so both report the same number."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def spearman_interval(x: Sequence[float], y: Sequence[float], n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = 0) -> dict[str, Any]:
    """Spearman's rho of the paired scores (`scipy.stats.spearmanr`) and a percentile bootstrap interval that
    resamples the pairs (mixtures) with replacement (`scipy.stats.bootstrap`, `paired=True`).

    Percentile rather than BCa: when every resample gives the same rho (a perfect ranking gives rho = 1 in
    every resample) BCa is undefined, and near +-1 the sampling distribution is skewed, which the percentile
    interval follows without a normal approximation. Resamples where one side is constant have no rank
    correlation; they are dropped and counted (`n_boot_valid`).

    :param x: the proxy's scores (soups), one per mixture.
    :param y: the reference scores (trained mixtures), aligned with `x`.
    :return: {rho, lo, hi, n, n_boot, n_boot_valid, level, p_value}; NaN rho and interval when there are fewer
        than 3 finite pairs or one side is constant.
    """
    from scipy.stats import bootstrap, spearmanr

    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-d and aligned, got shapes {xa.shape} and {ya.shape}")
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(len(xa))
    out: dict[str, Any] = {"rho": math.nan, "lo": math.nan, "hi": math.nan, "n": n, "n_boot": int(n_boot),
                           "n_boot_valid": 0, "level": float(level), "p_value": math.nan}
    if n < 3 or np.unique(xa).size < 2 or np.unique(ya).size < 2:
        return out
    res = spearmanr(xa, ya)
    out["rho"], out["p_value"] = float(res.statistic), float(res.pvalue)

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        if np.unique(a).size < 2 or np.unique(b).size < 2:
            return math.nan  # a constant resample has no ranking to compare
        return float(spearmanr(a, b).statistic)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about the NaN resamples, which are counted below
        boot = bootstrap((xa, ya), rho, paired=True, vectorized=False, n_resamples=n_boot, confidence_level=level,
                         method="percentile", random_state=np.random.default_rng(seed))
    dist = np.asarray(boot.bootstrap_distribution, dtype=float)
    valid = dist[np.isfinite(dist)]
    out["n_boot_valid"] = int(valid.size)
    if valid.size:  # percentiles of the valid resamples (scipy's own would be NaN if any resample were NaN)
        alpha = (1.0 - level) / 2.0
        out["lo"], out["hi"] = (float(v) for v in np.quantile(valid, [alpha, 1.0 - alpha]))
    return out
