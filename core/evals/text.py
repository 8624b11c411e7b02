"""Text normalization shared by the answer parsers: whitespace/case folding, numbers and number words.

Choices (documented in docs/evals.md):
- Number words: a small table (zero..twenty, the tens, hundred/thousand/million, "none"/"no" -> 0 only
  where a count is expected), the same table lmms-eval's CountBench task uses (zero..twenty, "none") plus
  compounds such as "twenty-one" and "one hundred". No extra dependency for a 30-word table.
- Numbers: "1,000" -> 1000 (thousands separators), "12.5" -> 12.5, "45%" keeps a percent flag; a number
  is a token, so "v2" or "3D" are not numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
NUMBER_WORDS = {**_UNITS, **_TENS}

# A numeric token: optional sign, digits with optional thousands separators, optional decimals, optional %.
_NUM_RE = re.compile(r"(?<![\w.])([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)\s*(%?)(?![\w])")
_WORD_RE = re.compile(r"[a-z]+(?:-[a-z]+)?")


def normalize_ws(text: str) -> str:
    """Lowercase, strip and collapse internal whitespace (the ANLS / lmms-eval normalization)."""
    return " ".join(str(text).strip().lower().split())


def strip_answer(text: str) -> str:
    """The short answer inside a model reply: first non-empty line, without an `Answer:` prefix, wrapping
    quotes or trailing sentence punctuation ('.', '!', ';'; '%' stays)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:：]?\s*", "", lines[0], flags=re.IGNORECASE)
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s.rstrip(".!;").strip()


@dataclass(frozen=True)
class Number:
    """A parsed number; `percent` is True when it was written with a trailing '%'."""

    value: float
    percent: bool = False


def parse_number(text: str) -> Number | None:
    """The whole string as one number ("1,000", "12.5", "45%", "-3"); None if it is not just a number."""
    s = str(text).strip().replace(" ", "")
    m = re.fullmatch(r"([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(%?)", s)
    if not m:
        return None
    return Number(float(m.group(1).replace(",", "")), percent=bool(m.group(2)))


def words_to_int(words: list[str]) -> int | None:
    """'twenty-one' / 'one hundred five' as an int; None if any word is not a number word."""
    total, current, seen = 0, 0, False
    for w in words:
        for part in w.split("-"):
            if part in _UNITS:
                current += _UNITS[part]
            elif part in _TENS:
                current += _TENS[part]
            elif part == "hundred":
                current = max(current, 1) * 100
            elif part in ("thousand", "million"):
                total += max(current, 1) * _SCALES[part]
                current = 0
            elif part == "and" and seen:
                continue
            else:
                return None
            seen = True
    return total + current if seen else None


def first_count(text: str, allow_none_word: bool = True) -> int | None:
    """The first count in free text: a digit token ("1,000" -> 1000) or a run of number words
    ("twenty one"); "none"/"no" -> 0 when `allow_none_word` and nothing else matches. Non-integers -> None."""
    s = str(text).lower()
    best: tuple[int, int] | None = None  # (position, value)
    m = _NUM_RE.search(s)
    if m and not m.group(2):
        v = float(m.group(1).replace(",", ""))
        if v.is_integer() and v >= 0:
            best = (m.start(), int(v))
    # number words: the earliest maximal run of consecutive number words ("twenty one", "one hundred")
    tokens = [(t.start(), t.group(0)) for t in _WORD_RE.finditer(s)]
    for i, (pos, tok) in enumerate(tokens):
        if words_to_int([tok]) is None or tok in _SCALES:
            continue
        j = i + 1
        while j < len(tokens) and words_to_int([tokens[j][1]]) is not None:
            j += 1
        val = words_to_int([w for _, w in tokens[i:j]])
        if val is not None and (best is None or pos < best[0]):
            best = (pos, val)
        break
    if best is not None:
        return best[1]
    if allow_none_word and re.search(r"\b(none|no|zero|nothing)\b", s):
        return 0
    return None
