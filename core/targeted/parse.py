"""Generated text -> a LLaVA conversation, or the reason it is rejected.

The generator is asked for exactly two lines, `Question: ...` and `Answer: ...` (core/targeted/config.py).
`parse_generation` returns a `Parsed` with the training-schema conversation (one human turn starting with
the `<image>` placeholder and ending with the family's answer instruction, one gpt turn with the answer)
or a rejection reason from `REJECT_REASONS`, checked in that order, so every malformed output is counted
under exactly one reason. The answer check is stricter than the eval parsers (core/evals/parsing.py): a
training answer must *be* the canonical form (a bare integer, a letter, point tags), not contain it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.evals.parsing import extract_options
from core.foundation.sample import IMAGE_TOKEN, Sample, SampleError
from core.steps.rephrase.config import DEFAULT_REFUSAL_PATTERNS
from core.steps.rephrase.validate import is_refusal
from core.targeted.config import FamilyPrompt

REJECT_REASONS = (
    "unfinished",  # cut by max_new_tokens (or prompt too long): the pair may be incomplete
    "empty",
    "refusal",
    "no_question",  # no `Question:` line
    "no_answer",  # no `Answer:` line after the question
    "multiple_pairs",  # more than one question or answer
    "placeholder_in_output",  # the model wrote `<image>` itself
    "question_too_long",
    "copied_example",  # the question repeats an in-context example's question
    "answer_format",  # detail: not_a_number | too_long | not_a_letter | no_options | letter_not_an_option | not_points | point_out_of_range
    "structure",  # detail: the SampleError reason of the assembled record (roles, placeholders)
)

_Q = re.compile(r"^\s*(?:\*\*)?\s*question\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?", re.IGNORECASE | re.MULTILINE)
_A = re.compile(r"^\s*(?:\*\*)?\s*answer\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?", re.IGNORECASE | re.MULTILINE)
_INT = re.compile(r"^[0-9]{1,6}$")
_LETTER = re.compile(r"^\(?([A-Z])\)?\.?$")
_POINT = re.compile(r'<point x="(\d+(?:\.\d+)?)" y="(\d+(?:\.\d+)?)">')
_NONE_POINTS = "There are none."


@dataclass(frozen=True)
class Parsed:
    """`conversations` (LLaVA dicts) when ok, else `reason` (`REJECT_REASONS[i]` or `answer_format:<detail>`)."""

    conversations: list[dict[str, str]] | None
    reason: str = ""
    question: str = ""
    answer: str = ""

    @property
    def ok(self) -> bool:
        return self.conversations is not None


def _norm(q: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()


def check_answer(answer: str, question: str, prompt: FamilyPrompt) -> str:
    """'' when the answer has its family's format, else the `answer_format` detail."""
    fmt = prompt.answer_format
    if fmt == "number":
        return "" if _INT.match(answer) else "not_a_number"
    if fmt == "short":
        return "" if len(answer.split()) <= prompt.max_answer_words and "\n" not in answer else "too_long"
    if fmt == "letter":
        options = extract_options(question)
        if len(options) < 2:
            return "no_options"
        m = _LETTER.match(answer)
        if not m:
            return "not_a_letter"
        return "" if m.group(1) in options else "letter_not_an_option"
    if fmt == "points":
        if answer == _NONE_POINTS:
            return ""
        rest = _POINT.sub("", answer).strip()
        pts = _POINT.findall(answer)
        if not pts or rest:
            return "not_points"
        return "" if all(0 <= float(x) <= 100 and 0 <= float(y) <= 100 for x, y in pts) else "point_out_of_range"
    raise ValueError(f"unknown answer format {fmt!r}")


def parse_generation(
    text: str,
    finish_reason: str,
    prompt: FamilyPrompt,
    *,
    examples: Sequence[str] = (),
    max_question_words: int = 60,
    refusal_patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS,
) -> Parsed:
    """Parse one generation into a conversation with the `<image>` placeholder, or reject it.

    :param text: the model's reply.
    :param finish_reason: `stop` when the model ended the reply itself; anything else is `unfinished`.
    :param prompt: the family prompt (answer format, question suffix).
    :param examples: the in-context example questions (a copy of one is `copied_example`).
    """
    if finish_reason != "stop":
        return Parsed(None, "unfinished")
    body = text.strip()
    if not body:
        return Parsed(None, "empty")
    if is_refusal(body, "", refusal_patterns):
        return Parsed(None, "refusal")
    qs = list(_Q.finditer(body))
    if not qs:
        return Parsed(None, "no_question")
    ans = [m for m in _A.finditer(body) if m.start() > qs[0].start()]
    if not ans:
        return Parsed(None, "no_answer")
    if len(qs) > 1 or len(ans) > 1:
        return Parsed(None, "multiple_pairs")
    question = body[qs[0].end() : ans[0].start()].strip()
    answer = body[ans[0].end() :].strip()
    if not question:
        return Parsed(None, "no_question")
    if not answer:
        return Parsed(None, "no_answer")
    if IMAGE_TOKEN in question or IMAGE_TOKEN in answer:
        return Parsed(None, "placeholder_in_output")
    if len(question.split()) > max_question_words:
        return Parsed(None, "question_too_long")
    if _norm(question) in {_norm(e) for e in examples}:
        return Parsed(None, "copied_example")
    if prompt.answer_format != "points" and prompt.answer_format != "letter":
        answer = answer.rstrip(".").strip() if prompt.answer_format == "number" else answer
    bad = check_answer(answer, question, prompt)
    if bad:
        return Parsed(None, f"answer_format:{bad}", question, answer)
    human = f"{IMAGE_TOKEN}\n{question}" + (f"\n{prompt.question_suffix}" if prompt.question_suffix else "")
    convs = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    try:  # the same validation every ingested record gets (roles, placeholders = images, empty turns)
        Sample.from_record({"id": "check", "image": "img.jpg", "conversations": convs})
    except SampleError as e:
        return Parsed(None, f"structure:{e.reason}", question, answer)
    return Parsed(convs, "", question, answer)


def reason_code(reason: str) -> str:
    """The reason without its `:detail` suffix (for counting by kind)."""
    return reason.split(":", 1)[0]
