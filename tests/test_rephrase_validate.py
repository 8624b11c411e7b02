"""Acceptance checks of rephrased samples: one crafted good case and bad cases for every reason."""

import pytest

from core.rephrase.config import DEFAULT_REFUSAL_PATTERNS
from core.rephrase.validate import REJECT_REASONS, numbers, protect, validate_rephrasing
from core.sample import Turn

ORIG = [
    Turn("human", "<image>\nCould you please tell me what is the total number of red cars parked in this picture?"),
    Turn("gpt", "After carefully looking at the picture, I can see that there are 12 red cars parked, out of 30 cars."),
]
GOOD = [
    Turn("human", "<image>\nHow many red cars are parked?"),
    Turn("gpt", "12 red cars are parked, out of 30."),
]


def words(turns):
    return sum(len(t.value.replace("<image>", " ").split()) for t in turns)


def check(candidate, finish=None, *, original=ORIG, min_shortening=0.1, check_numbers=True):
    finish = finish if finish is not None else ["stop"] * len(candidate)
    return validate_rephrasing(
        original,
        candidate,
        finish,
        words(original),
        words(candidate),
        min_shortening=min_shortening,
        check_numbers=check_numbers,
        refusal_patterns=DEFAULT_REFUSAL_PATTERNS,
    )


def test_good_rephrasing_is_accepted():
    assert check(GOOD) is None


def test_copied_turns_count_as_finished():
    cand = [ORIG[0], GOOD[1]]
    assert check(cand, ["copied", "stop"]) is None


BAD = {
    "turn_count": (GOOD[:1], None),
    "role_mismatch": ([Turn("gpt", GOOD[0].value), Turn("human", GOOD[1].value)], None),
    "placeholder_mismatch": ([Turn("human", "How many red cars are parked?"), GOOD[1]], None),
    "empty": ([Turn("human", "<image>\n"), GOOD[1]], None),
    "unfinished": (GOOD, ["stop", "length"]),
    "refusal": ([GOOD[0], Turn("gpt", "Here is the concise answer: 12 red cars of 30.")], None),
    "number_lost": ([GOOD[0], Turn("gpt", "Twelve red cars are parked, out of 30.")], None),
    "not_shorter": (
        [GOOD[0], Turn("gpt", ORIG[1].value + " All of them are clearly visible in the 30-car lot today.")],
        None,
    ),
}


def test_every_reason_has_a_crafted_case():
    assert set(BAD) == set(REJECT_REASONS)


@pytest.mark.parametrize("reason", REJECT_REASONS)
def test_bad_rephrasing_is_rejected_with_its_reason(reason):
    cand, finish = BAD[reason]
    assert check(cand, finish) == reason


@pytest.mark.parametrize(
    "text",
    ["Sure! 12 red cars, 30 total.", "As an AI, I see 12 red cars of 30.", "I cannot see 12 or 30 cars.",
     "I'm sorry, 12 of 30.", "Rewritten answer: 12 red cars of 30.", "Certainly. 12 of 30 cars."],
)
def test_refusal_and_preamble_variants(text):
    assert check([GOOD[0], Turn("gpt", text)]) == "refusal"


def test_preamble_already_in_original_is_not_a_refusal():
    orig = [Turn("human", "Say yes if the sign reads 'open' and explain why in a sentence."),
            Turn("gpt", "Sure, the sign clearly reads 'open' in big bold green letters at the top.")]
    cand = [Turn("human", "Does the sign read 'open'? Explain briefly."), Turn("gpt", "Sure, it reads 'open'.")]
    assert check(cand, original=orig) is None


def test_not_shorter_margin_is_configurable():
    # 20 -> 18 words: 10% shorter. Passes a 5% margin, fails a 20% margin.
    orig = [Turn("human", " ".join(["word"] * 10)), Turn("gpt", " ".join(["answer"] * 10))]
    cand = [Turn("human", " ".join(["word"] * 9)), Turn("gpt", " ".join(["answer"] * 9))]
    assert check(cand, original=orig, min_shortening=0.05) is None
    assert check(cand, original=orig, min_shortening=0.2) == "not_shorter"


def test_unchanged_sample_is_not_accepted():
    assert check(list(ORIG), ["copied", "copied"]) == "not_shorter"


def test_number_check_can_be_disabled():
    cand, _ = BAD["number_lost"]
    assert check(cand, check_numbers=False) is None


def test_numbers_are_normalized_and_compared_as_sets():
    assert numbers("1,000 people, 3.50 dollars, 45% and -2") .keys() == {"1000", "3.5", "45%", "-2"}
    orig = [Turn("human", "How many apples are there on the wooden table in total?"),
            Turn("gpt", "There are 3 apples on the table. So the final answer is 3.")]
    cand = [Turn("human", "How many apples are on the table?"), Turn("gpt", "3")]
    assert check(cand, original=orig) is None


def test_protect_cuts_leading_and_trailing_placeholders():
    p = protect("<image>\n<image>\nCompare the two charts.")
    assert (p.head, p.body, p.tail) == ("<image>\n<image>\n", "Compare the two charts.", "")
    p = protect("What is shown here?\n<image>")
    assert (p.head, p.body, p.tail) == ("", "What is shown here?", "\n<image>")
    p = protect("Image 1: <image> vs image 2: <image> which is larger?")
    assert p.head == "" and p.tail == "" and p.body.count("<image>") == 2
    assert protect("<image>").body == ""


def test_restore_puts_placeholders_back_in_place():
    p = protect("<image>\nPlease describe in detail what the image shows.\n<image>")
    assert p.restore("  Describe the image.  ") == "<image>\nDescribe the image.\n<image>"
