"""SemDeDup decisions from M: eps mode (remove iff M > 1 - eps), target mode (exactly round(f * N) removals,
ties by sample id, with the eps that does it and notes when fewer qualify), and the eps -> removal curve."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from core.steps.dedup.config import SemDedupConfig
from core.steps.dedup.scores import ClusterScores


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



def decide(scores: ClusterScores, cfg: SemDedupConfig) -> Decision:
    """Eps or target decision per the config."""
    if cfg.eps is not None:
        return decide_eps(scores.m, cfg.eps)
    return decide_target(scores.m, scores.sample_id, float(cfg.target_removal), cfg.min_similarity)

