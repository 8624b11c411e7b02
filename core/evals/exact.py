"""Reference scoring: the answer extraction and metrics of lmms-eval (DocVQA, ChartQA, CountBench,
RealWorldQA) and of Molmo's `PointingEval` (PixMo-Points), reimplemented here with their quirks so a score
from mmcurate can be put next to a published one. This is the default scoring; the lenient parsers of
`core.evals.parsing` / `core.evals.metrics` are opt-in (`EvalConfig.scoring = "lenient"`) and reported
beside these numbers, never instead.

What each function reproduces (lmms-eval 0.7.3; tests/unit/test_evals_exact.py checks several hundred adversarial
strings per metric against vectors computed by lmms-eval's own installed functions):
- `lmms_anls`: `lmms_eval.api.metrics.anls`: case/whitespace-normalised Levenshtein, but divided by the
  *raw* lengths of `answer.upper()` / `prediction.upper()`; 0 below 0.5.
- `lmms_relaxed_correctness`: `tasks/chartqa/utils.relaxed_correctness`: `float()` of the raw strings
  (a trailing '%' divides by 100), 5% relative tolerance when the target parses to a non-zero number,
  else case-insensitive equality of the raw strings.
- `lmms_count_answer`: `tasks/countbench/utils._normalize_count_answer` (strip, lower, number words up
  to twenty -> digits); accuracy is string equality with the normalised target.
- `extract_mcq_answer`: `tasks/_task_utils/mcq_extract.extract_mcq_answer`; `realworldqa_score`:
  `tasks/realworldqa/utils.realworldqa_process_results`.
- `molmo_*`: Molmo's `olmo/util.extract_points`, `olmo/eval/evaluators.is_valid_format`,
  `is_point_in_region` (Python `round`) and `PointingEval` (Hungarian assignment on Euclidean distance to
  the ground-truth points, a hit when the rounded point lies in that point's mask, F1 with eps 1e-10).
  Molmo is not a package; this follows its public source and is tested on hand-derived cases.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# ---- DocVQA: ANLS -------------------------------------------------------------------------------------


def lmms_anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction exactly as lmms-eval computes it (see module docstring)."""
    from rapidfuzz.distance import Levenshtein

    pred_norm = " ".join(prediction.strip().lower().split())
    pred_len = len(prediction.upper())
    worst = []
    for ref in references:
        length = max(len(ref.upper()), pred_len)
        dist = Levenshtein.distance(" ".join(ref.strip().lower().split()), pred_norm)
        worst.append(0.0 if length == 0 else float(dist) / float(length))
    score = 1 - min(worst)
    return 0 if score < threshold else score


# ---- ChartQA: relaxed accuracy ------------------------------------------------------------------------


def _lmms_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def lmms_relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness exactly as lmms-eval computes it (see module docstring)."""
    p, t = _lmms_float(prediction), _lmms_float(target)
    if p is None or not t:  # a target of 0 (or unparsable) falls back to string equality
        return prediction.lower() == target.lower()
    return abs(p - t) / abs(t) <= max_relative_change


# ---- CountBench ---------------------------------------------------------------------------------------

_COUNT_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}  # fmt: skip
_COUNT_WORDS["none"] = "0"


def lmms_count_answer(answer: Any) -> str:
    """lmms-eval's normalised count answer: the stripped, lowercased text, number words -> digits."""
    text = str(answer).strip().lower()
    return _COUNT_WORDS.get(text, text)


# ---- RealWorldQA: multiple choice ---------------------------------------------------------------------

_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
# (format, priority, marker template): a later occurrence of a higher-priority format wins
_MCQ_MARKERS = (("parentheses", 6, "({})"), ("period", 5, "{}."), ("colon", 4, "{}:"), ("right_paren", 3, "{})"),
                ("space", 2, "{} "))  # fmt: skip
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str] | None = None) -> str:
    """The choice letter lmms-eval's `extract_mcq_answer` returns ("" when none): candidates from several
    formats, the highest-priority format wins, then the later position."""
    if not response or not response.strip():
        return ""
    letters = list(choices or "ABCDEFGH")
    body = response.strip()
    for ch in ",.!?;:'\"":  # one pass per character, in this order (not a set strip)
        body = body.strip(ch)
    text = f" {body} "
    best: tuple[int, int, str] | None = None  # (priority, position, letter)

    def offer(priority: int, position: int, letter: str) -> None:
        nonlocal best
        if best is None or (priority, position) > best[:2]:
            best = (priority, position, letter)

    for _, priority, marker in _MCQ_MARKERS:
        for ch in letters:
            pos = text.rfind(marker.format(ch))
            if pos >= 0:
                offer(priority, pos, ch)
    lowered = text.lower()  # phrase positions come from the lowercased text, letters from the original
    for phrase in _MCQ_PHRASES:
        at = lowered.find(phrase)
        if at >= 0:
            for ch in letters:
                pos = text.find(ch, at + len(phrase))
                if pos >= 0:
                    offer(_MCQ_PRIORITY["phrase"], pos, ch)
    core = text.strip()
    for ch in letters:
        if core.startswith(ch) and (len(core) == 1 or not core[1].isalpha()):
            offer(_MCQ_PRIORITY["start"], 0, ch)
        if core.endswith(ch) and (len(core) == 1 or not core[-2].isalpha()):
            offer(_MCQ_PRIORITY["end"], len(text) - 1, ch)
    if best is None:
        for ch in letters:
            pos = text.rfind(ch)
            if pos >= 0:
                offer(_MCQ_PRIORITY["fallback"], pos, ch)
    return best[2] if best else ""


def realworldqa_score(prediction: str, answer: str) -> tuple[str, float]:
    """(what was compared, 0/1) as lmms-eval's RealWorldQA: letter answers A-D through
    `extract_mcq_answer`, other answers by lowercased equality after stripping the reply's final periods."""
    gt = answer.strip()
    if gt.upper() in ("A", "B", "C", "D"):
        letter = extract_mcq_answer(prediction, ["A", "B", "C", "D"])
        return letter, 1.0 if letter == gt.upper() else 0.0
    reply = prediction.lower().strip().rstrip(".")
    return reply, 1.0 if reply == gt.lower() else 0.0


# ---- PixMo-Points: Molmo's PointingEval ---------------------------------------------------------------

_MOLMO_POINT_PATTERNS = (  # (regex, divisor): coordinates in percent (or per mille for the p= form)
    (re.compile(r"Click\(([0-9]+\.[0-9]), ?([0-9]+\.[0-9])\)"), 1.0),
    (re.compile(r"\(([0-9]+\.[0-9]),? ?([0-9]+\.[0-9])\)"), 1.0),
    (re.compile(r'x\d*="\s*([0-9]+(?:\.[0-9]+)?)"\s+y\d*="\s*([0-9]+(?:\.[0-9]+)?)"'), 1.0),
    (re.compile(r"(?:\d+|p)\s*=\s*([0-9]{3})\s*,\s*([0-9]{3})"), 10.0),
)
_MOLMO_NUM = r"\d+(\.\d+)?"
_MOLMO_FORMAT = re.compile(
    rf"^(\(\s*-?{_MOLMO_NUM}\s*,\s*-?{_MOLMO_NUM}\s*\)\n?)+$|"
    rf'^<point\s+x="\s*{_MOLMO_NUM}"\s+y="\s*{_MOLMO_NUM}"\s+alt="[\s\S]*?">[\s\S]*?</point>$|'
    rf'^<points\s+(x\d+="\s*{_MOLMO_NUM}"\s+y\d+="\s*{_MOLMO_NUM}"\s+)+alt="[\s\S]*?">[\s\S]*?</points>$|'
    r'^<point\s+p=\s*\d{3}\s*,\s*\d{3}\s+alt="[\s\S]*?">[\s\S]*?</point>$|'
    r'^<points\s+(\d+=\s*\d{3}\s*,\s*\d{3}\s+)+alt="[\s\S]*?">[\s\S]*?</points>$'
)


def molmo_extract_points(text: str, image_w: float, image_h: float) -> list[np.ndarray]:
    """Pixel points in Molmo's order: every `Click(x.x, y.y)`, then every `(x.x, y.y)` (a Click is found
    twice), then `x="..." y="..."` / `x1=".." y1=".."` attributes, then `p=XXX,YYY` / `1=XXX,YYY` (per
    mille). A point with a coordinate above 100 (percent) is dropped."""
    out = []
    scale = np.array([image_w, image_h])
    for pattern, divisor in _MOLMO_POINT_PATTERNS:
        for m in pattern.finditer(text):
            if divisor == 1.0:
                pt = np.array([float(m.group(1)), float(m.group(2))])
            else:
                pt = np.array([int(m.group(1)) / divisor, int(m.group(2)) / divisor])
            if np.max(pt) > 100:
                continue
            pt /= 100.0
            out.append(pt * scale)
    return out


def molmo_valid_format(text: str) -> bool:
    """Molmo's `is_valid_format`: the whole (stripped) reply is point pairs, one `<point>` or one `<points>`
    element (with `alt` and a closing tag)."""
    return _MOLMO_FORMAT.fullmatch(text.strip()) is not None


def _molmo_hit(point: np.ndarray, mask: np.ndarray) -> bool:
    h, w = mask.shape
    x, y = int(round(point[0])), int(round(point[1]))
    return 0 <= x < w and 0 <= y < h and bool(mask[y, x])


def molmo_pointing(output: str, gt_points: Sequence[Sequence[float]], masks: Sequence[Any],
                   image_size: tuple[int, int]) -> dict[str, float] | None:
    """precision, recall, f1 of one reply as Molmo's `PointingEval` scores it, or None where Molmo's
    evaluator raises and leaves the sample out of its means (a valid-format reply whose points are all
    above 100, or fewer masks than matched points)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    pred = output.strip()
    w, h = image_size
    points = molmo_extract_points(pred, w, h)
    if len(gt_points) == 0:
        v = float(len(points) == 0)
        return {"precision": v, "recall": v, "f1": v}
    if not molmo_valid_format(pred):
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    try:
        preds = np.array(points)
        rows, cols = linear_sum_assignment(cdist(preds, gt_points))
        hits = sum(_molmo_hit(preds[i], np.asarray(masks[j])) for i, j in zip(rows, cols))
    except (ValueError, IndexError):
        return None
    precision, recall = hits / len(preds), hits / len(masks)
    f1 = 0.0 if precision == 0 or recall == 0 else 2 * (precision * recall) / (precision + recall + 1e-10)
    return {"precision": precision, "recall": recall, "f1": f1}


# ---- aggregation (lmms-eval's `mean` and `mean_stderr`) -----------------------------------------------


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """lmms-eval's aggregation for `mean` metrics: the mean and `mean_stderr` (sample standard deviation
    over sqrt(n)); stderr None ("N/A" in lmms-eval) for fewer than 2 values."""
    import math

    n = len(values)
    if n == 0:
        return float("nan"), None
    mu = sum(values) / n
    if n < 2:
        return mu, None
    var = sum((x - mu) ** 2 for x in values) / (n - 1)
    return mu, math.sqrt(var) / math.sqrt(n)
