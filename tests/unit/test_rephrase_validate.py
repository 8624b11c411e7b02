"""Acceptance checks of rephrased samples: one crafted good case and bad cases for every reason."""

import pytest

from core.foundation.sample import Turn, strip_image_placeholders
from core.steps.rephrase.config import DEFAULT_KEEP_SUFFIXES, DEFAULT_REFUSAL_PATTERNS
from core.steps.rephrase.similarity import SimilarityScorer
from core.steps.rephrase.validate import REJECT_REASONS, numbers, protect, validate_rephrasing


@pytest.fixture(scope="module")
def scorer():
    return SimilarityScorer("minilm", device="cpu")

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


SCORER = None


@pytest.fixture(autouse=True)
def _scorer(scorer):
    global SCORER
    SCORER = scorer


def check(candidate, finish=None, *, original=ORIG, min_shortening=0.1, check_numbers=True, min_similarity=0.7):
    finish = finish if finish is not None else ["stop"] * len(candidate)
    changed = [(a, b) for a, b in zip(original, candidate) if a.value != b.value]
    sims = SCORER.similarity([strip_image_placeholders(a.value) for a, _ in changed],
                             [strip_image_placeholders(b.value) for _, b in changed])
    return validate_rephrasing(
        original,
        candidate,
        finish,
        words(original),
        words(candidate),
        min_shortening=min_shortening,
        check_numbers=check_numbers,
        refusal_patterns=DEFAULT_REFUSAL_PATTERNS,
        similarities=sims,
        min_similarity=min_similarity,
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
    "number_added": ([GOOD[0], Turn("gpt", "12 red cars are parked, out of 30, at 5 pm.")], None),
    # the model answered instead of rephrasing: structure, numbers and length are all fine
    "meaning_changed": ([Turn("human", "<image>\nThe parking lot is full."), GOOD[1]], None),
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
    for reason in ("number_lost", "number_added"):
        cand, _ = BAD[reason]
        assert check(cand, check_numbers=False) is None


def test_similarity_threshold_is_configurable():
    cand, _ = BAD["meaning_changed"]
    assert check(cand, min_similarity=0.0) is None


def test_keep_suffixes_stay_verbatim():
    text = "<image>\nWhat is the colour of the big bus?\nAnswer the question using a single word or phrase."
    p = protect(text, DEFAULT_KEEP_SUFFIXES)
    assert p.body == "What is the colour of the big bus?"
    assert p.restore("Bus colour?") == "<image>\nBus colour?\nAnswer the question using a single word or phrase."
    only = protect("Answer the question using a single word or phrase.", DEFAULT_KEEP_SUFFIXES)
    assert only.body == "Answer the question using a single word or phrase."  # nothing else: not cut


def test_numbers_are_normalized_and_compared_as_sets():
    assert numbers("1,000 people, 3.50 dollars, 45% and -2") .keys() == {"1000", "3.5", "45%", "-2"}
    orig = [Turn("human", "How many apples are there on the wooden table in total?"),
            Turn("gpt", "There are 3 apples on the table. So the final answer is 3.")]
    cand = [Turn("human", "How many apples are on the table?"), Turn("gpt", "There are 3 apples.")]
    assert check(cand, original=orig) is None
    # a bare "3" keeps the numbers but not the answer's form: the meaning check is conservative
    assert check([cand[0], Turn("gpt", "3")], original=orig) == "meaning_changed"


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
