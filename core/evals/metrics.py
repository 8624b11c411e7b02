"""Per-sample metrics. Each follows lmms-eval where lmms-eval defines it; deviations are named here and in
docs/evals.md.

- `anls`: DocVQA ANLS (lmms-eval `anls`): both strings lowercased, stripped, whitespace collapsed;
  NL = Levenshtein(gt, pred) / max(len(gt), len(pred)); similarity 1 - NL, best over all reference
  answers, set to 0 when below the 0.5 threshold (lmms-eval keeps exactly 0.5; so do we). Deviation:
  lengths are taken of the normalized strings (lmms-eval takes raw lengths, which makes trailing spaces
  count as free characters).
- `relaxed_correctness`: ChartQA (lmms-eval / Methani et al.): numeric answers correct within 5% relative
  change of the target, otherwise case-insensitive exact match. Deviations: "1,000" parses as 1000; a
  percent sign on only one side is ignored ("45%" vs "45"), since the unit is in the question (lmms-eval
  divides the '%' side by 100, which makes such pairs wrong); a zero target needs an exact numeric 0
  (lmms-eval falls back to string equality there).
- `count_correct`: CountBench exact integer match (lmms-eval `acc`).
- `point_scores`: PixMo-Points: one-to-one matching of predicted points to ground-truth masks with
  `scipy.optimize.linear_sum_assignment`; a point is a true positive only when it lies inside the mask it
  is matched to. Points outside the image are false positives. No target expected: (1, 1, 1) when the
  model predicts no point, else (0, 1, 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.evals.text import normalize_ws, parse_number

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


def anls(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against its reference answers (max over references), in [0, 1]."""
    from rapidfuzz.distance import Levenshtein

    pred = normalize_ws(prediction)
    best = 0.0
    for ref in references:
        gt = normalize_ws(ref)
        length = max(len(gt), len(pred))
        nl = 0.0 if length == 0 else Levenshtein.distance(gt, pred) / length
        best = max(best, 1.0 - nl)
    return 0.0 if best < threshold else best


def relaxed_correctness(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA relaxed accuracy for one answer: within `tolerance` relative change if both are numbers,
    otherwise case-insensitive exact match (after whitespace normalization)."""
    p, t = parse_number(prediction), parse_number(target)
    if p is not None and t is not None:
        if t.value == 0:
            return p.value == 0
        return abs(p.value - t.value) / abs(t.value) <= tolerance
    return normalize_ws(prediction) == normalize_ws(target)


def count_correct(prediction: int | None, target: int) -> bool:
    """CountBench: exact integer match; an unparsed prediction (None) is wrong."""
    return prediction is not None and int(prediction) == int(target)


@dataclass(frozen=True)
class PointScore:
    """Pointing result of one sample (see `point_scores`)."""

    precision: float
    recall: float
    f1: float
    n_pred: int
    n_gt: int
    n_tp: int
    n_outside: int


def point_scores(
    points_px: Sequence[tuple[float, float]], masks: Sequence[np.ndarray], image_size: tuple[int, int]
) -> PointScore:
    """Precision / recall / F1 of predicted pixel points (x, y) against ground-truth masks (H x W bool
    arrays, one per target object; all-False masks are ignored) on an image of `image_size` (W, H).

    Matching is one-to-one: each mask can be claimed by at most one point, and the assignment maximizes the
    number of points inside their masks. Points outside the image are counted (`n_outside`) and are false
    positives."""
    from scipy.optimize import linear_sum_assignment

    w, h = image_size
    targets = [m for m in (np.asarray(m, dtype=bool) for m in masks) if m.any()]
    n_pred, n_gt = len(points_px), len(targets)
    inside = np.zeros((n_pred, n_gt), dtype=bool)
    n_outside = 0
    for i, (x, y) in enumerate(points_px):
        if not (0 <= x < w and 0 <= y < h):
            n_outside += 1
            continue
        col, row = int(x), int(y)
        for j, m in enumerate(targets):
            if row < m.shape[0] and col < m.shape[1]:
                inside[i, j] = m[row, col]
    if n_gt == 0:
        if n_pred == 0:
            return PointScore(1.0, 1.0, 1.0, 0, 0, 0, 0)
        return PointScore(0.0, 1.0, 0.0, n_pred, 0, 0, n_outside)
    if n_pred == 0:
        return PointScore(0.0, 0.0, 0.0, 0, n_gt, 0, 0)
    rows, cols = linear_sum_assignment(-inside.astype(np.float64))
    tp = int(inside[rows, cols].sum())
    precision, recall = tp / n_pred, tp / n_gt
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return PointScore(precision, recall, f1, n_pred, n_gt, tp, n_outside)
