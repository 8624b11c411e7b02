"""Answer parsers: raw model text -> the value a metric compares. Every parser is total: it returns a
`Parsed` with ok=False and a reason instead of raising.
"""

from __future__ import annotations

import re
import string

from core.evals.base import Parsed
from core.evals.text import NUMBER_WORDS, first_count, normalize_ws, strip_answer

# ---- counting ---------------------------------------------------------------------------------------


def parse_count(output: str) -> Parsed:
    """The first count in the reply: digits ("1,000" -> 1000) or number words ("seven", "twenty-one");
    "none"/"no"/"zero" -> 0. lmms-eval matches the whole reply against a number-word table; extracting the
    first count also accepts "There are 3 dogs." (documented deviation)."""
    if not str(output).strip():
        return Parsed(None, False, "empty_output")
    n = first_count(output)
    if n is None:
        return Parsed(None, False, "no_number")
    return Parsed(n, True)


# ---- short answers (DocVQA, ChartQA) ------------------------------------------------------------------


def parse_short_answer(output: str) -> Parsed:
    """The short answer: first non-empty line without an 'Answer:' prefix, quotes or trailing period."""
    s = strip_answer(output)
    if not s:
        return Parsed(None, False, "empty_output")
    return Parsed(s, True)


# ---- multiple choice (RealWorldQA) --------------------------------------------------------------------

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$", re.MULTILINE)
_PUNCT = str.maketrans("", "", string.punctuation)


def extract_options(question: str) -> dict[str, str]:
    """Options written one per line as 'A. text' or '(A) text' in the question (RealWorldQA's layout)."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question)}


def _clean(s: str) -> str:
    return normalize_ws(s.translate(_PUNCT))


def parse_choice(output: str, options: dict[str, str]) -> Parsed:
    """An option letter from the reply, in this order (lmms-eval's MultiChoiceRegexFilter idea):
    1. the reply is a letter: 'B', 'B.', '(B)', 'B) ...', 'Answer: B', 'B. <text>';
    2. the reply contains exactly one option's text (the longest match wins: 'dark red' over 'red');
    3. a parenthesized '(B)' or 'option B' / 'answer is B' anywhere in the reply.
    Letters must be among `options`. Without options (free-form questions) the normalized reply is the
    answer, with number words mapped to digits ("three" -> "3", as lmms-eval's NumberWordsToDigitsFilter)."""
    raw = str(output).strip()
    if not raw:
        return Parsed(None, False, "empty_output")
    if not options:
        ans = _clean(strip_answer(raw))
        ans = str(NUMBER_WORDS[ans]) if ans in NUMBER_WORDS else ans
        return Parsed(ans, bool(ans), "" if ans else "empty_output")
    letters = "".join(sorted(options))
    short = strip_answer(raw)
    m = re.fullmatch(rf"\(?([{letters}])\)?(?:[.):]\s*.*)?", short)
    if m:
        return Parsed(m.group(1), True)
    cleaned = f" {_clean(raw)} "
    hits = [(len(_clean(t)), k) for k, t in options.items() if _clean(t) and f" {_clean(t)} " in cleaned]
    if hits:
        hits.sort(reverse=True)
        if len(hits) == 1 or hits[0][0] > hits[1][0]:
            return Parsed(hits[0][1], True)
        return Parsed(None, False, "ambiguous_option_text")
    m = re.search(rf"\(([{letters}])\)|\b(?:option|answer is|answer:)\s*\(?([{letters}])\b", raw, re.IGNORECASE)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        if letter in options:
            return Parsed(letter, True)
    return Parsed(None, False, "no_option")


# ---- pointing (PixMo-Points) --------------------------------------------------------------------------

_POINT_TAG = re.compile(r"<point\s+[^>]*?x\s*=\s*\"?(-?[\d.]+)\"?\s+y\s*=\s*\"?(-?[\d.]+)\"?[^>]*>", re.IGNORECASE)
_POINTS_TAG = re.compile(r"<points\s+([^>]*)>", re.IGNORECASE)
_ATTR = re.compile(r"([xy])(\d+)\s*=\s*\"?(-?[\d.]+)\"?", re.IGNORECASE)
_PAIR = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
_NONE = re.compile(r"\b(there are none|none|no such|not (?:present|visible|in the image)|cannot find|no )", re.I)


def parse_points(output: str) -> Parsed:
    """Points as [[x, y], ...] in percent of the image (0-100; Molmo's convention): `<point x=".." y="..">`,
    `<points x1=".." y1=".." x2=..>`, or '(x, y)' pairs. A reply with no coordinates that says none
    ("There are none.") parses to [] (ok); any other reply without coordinates is a parse failure."""
    raw = str(output)
    if not raw.strip():
        return Parsed(None, False, "empty_output")
    pts = [[float(x), float(y)] for x, y in _POINT_TAG.findall(raw)]
    for attrs in _POINTS_TAG.findall(raw):
        coords: dict[tuple[str, str], float] = {}
        for axis, idx, val in _ATTR.findall(attrs):
            coords[(axis.lower(), idx)] = float(val)
        for idx in sorted({i for _, i in coords}, key=int):
            if ("x", idx) in coords and ("y", idx) in coords:
                pts.append([coords[("x", idx)], coords[("y", idx)]])
    if not pts:
        pts = [[float(x), float(y)] for x, y in _PAIR.findall(raw)]
    if pts:
        return Parsed(pts, True)
    if _NONE.search(raw):
        return Parsed([], True)
    return Parsed(None, False, "no_points")
