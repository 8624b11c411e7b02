"""Placeholder protection and the acceptance checks a rephrased sample must pass.

Placeholder policy: `<image>` placeholders at the start or end of a turn (LLaVA puts them there, with a
newline) are cut off before prompting and put back verbatim around the model's text, so the model
never sees them and cannot lose or move them. Placeholders in the middle of a turn (interleaved
multi-image text) stay in the prompt; the model must copy them, and `placeholder_mismatch` rejects a
sample whose turns do not carry the same number of placeholders as before.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from core.foundation.sample import IMAGE_TOKEN, Turn, strip_image_placeholders

# Rejection reasons, in the order they are checked. The ledger reason is `rephrase_rejected:<reason>`.
REJECT_REASONS = (
    "turn_count",
    "role_mismatch",
    "placeholder_mismatch",
    "unfinished",
    "empty",
    "refusal",
    "number_lost",
    "number_added",
    "not_shorter",
    "meaning_changed",  # needs a sentence encoder: checked last, by the caller passing `similarities`
)

_HEAD = re.compile(r"^(?:\s*<image>)+\s*")
_TAIL = re.compile(r"\s*(?:<image>\s*)+$")
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?%?")


@dataclass(frozen=True)
class Protected:
    """A turn split into the placeholder prefix/suffix kept verbatim and the body sent to the model."""

    head: str
    body: str
    tail: str

    def restore(self, new_body: str) -> str:
        """The rephrased turn: original prefix + the model's text (stripped) + original suffix."""
        return self.head + new_body.strip() + self.tail


def protect(text: str, keep_suffixes: Sequence[str] = ()) -> Protected:
    """Cut leading/trailing `<image>` placeholders (with their whitespace) off a turn, and a trailing
    answer-format instruction from `keep_suffixes` (with the whitespace before it)."""
    head = tail = ""
    m = _HEAD.match(text)
    if m:
        head, text = m.group(0), text[m.end() :]
    m = _TAIL.search(text)
    if m:
        tail, text = m.group(0), text[: m.start()]
    for suffix in keep_suffixes:
        body = text.rstrip()
        if suffix and body.endswith(suffix) and body[: -len(suffix)].strip():
            cut = len(body[: -len(suffix)].rstrip())
            tail, text = text[cut:] + tail, text[:cut]
            break
    return Protected(head, text, tail)


def numbers(text: str) -> Counter:
    """Numbers in a text, normalized (1,000 -> 1000, 3.50 -> 3.5), with counts.

    Validation compares the *sets* of numbers: "3 apples. The answer is 3." -> "3" keeps every number.
    """
    out: Counter = Counter()
    for tok in _NUMBER.findall(text):
        pct = tok.endswith("%")
        raw = tok.rstrip("%").replace(",", "").lstrip("+")
        try:
            norm = format(Decimal(raw).normalize(), "f")
        except InvalidOperation:
            norm = raw
        out[norm + ("%" if pct else "")] += 1
    return out


@functools.lru_cache(maxsize=16)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def is_refusal(new: str, original: str, patterns: Sequence[str]) -> bool:
    """True if the new text opens with a preamble/refusal pattern that the original did not have."""
    new, original = new.strip(), original.strip()
    return any(p.match(new) and not p.match(original) for p in _compiled(tuple(patterns)))


def validate_rephrasing(
    original: Sequence[Turn],
    candidate: Sequence[Turn],
    finish_reasons: Sequence[str],
    old_tokens: int,
    new_tokens: int,
    *,
    min_shortening: float,
    check_numbers: bool,
    refusal_patterns: Sequence[str],
    similarities: Sequence[float] | None = None,
    min_similarity: float = 0.0,
) -> str | None:
    """Return the first rejection reason (see `REJECT_REASONS`) or None when the rephrasing is accepted.

    `finish_reasons[i]` is the generator's reason for turn i: ``stop`` (finished), ``length`` (cut by
    max tokens) or ``copied`` (turn not sent to the model). `old_tokens`/`new_tokens` count the
    conversation's text tokens with the training tokenizer. `similarities`, when given, holds the
    original/new cosine similarity of each *changed* turn, in turn order (`meaning_changed` below
    `min_similarity`).
    """
    # unfinished comes before empty: a prompt that was not run (prompt_too_long) has empty text
    if len(candidate) != len(original) or len(finish_reasons) != len(original):
        return "turn_count"
    if any(a.role != b.role for a, b in zip(original, candidate)):
        return "role_mismatch"
    if any(a.value.count(IMAGE_TOKEN) != b.value.count(IMAGE_TOKEN) for a, b in zip(original, candidate)):
        return "placeholder_mismatch"
    if any(r not in ("stop", "copied") for r in finish_reasons):
        return "unfinished"
    if any(
        not strip_image_placeholders(b.value) and strip_image_placeholders(a.value) for a, b in zip(original, candidate)
    ):
        return "empty"
    changed = [(a, b) for a, b in zip(original, candidate) if a.value != b.value]
    if any(is_refusal(b.value, a.value, refusal_patterns) for a, b in changed):
        return "refusal"
    if check_numbers and any(numbers(a.value).keys() - numbers(b.value).keys() for a, b in changed):
        return "number_lost"
    if check_numbers and any(numbers(b.value).keys() - numbers(a.value).keys() for a, b in changed):
        return "number_added"
    if not changed or new_tokens > (1.0 - min_shortening) * old_tokens:
        return "not_shorter"
    if similarities is not None and any(x < min_similarity for x in similarities):
        return "meaning_changed"
    return None
