"""Metrics and parsers against hand-computed cases (docs/evals.md explains each convention)."""

from __future__ import annotations

import numpy as np
import pytest

from core.evals.metrics import anls, count_correct, point_scores, relaxed_correctness
from core.evals.parsing import extract_options, parse_choice, parse_count, parse_points, parse_short_answer
from core.evals.text import first_count, parse_number, strip_answer

# ---- ANLS ----------------------------------------------------------------------------------------------


def test_anls_exact_and_case_whitespace_insensitive():
    assert anls("  ACME   corp ", ["acme corp"]) == 1.0


def test_anls_partial_above_threshold():
    # "acme corq" vs "acme corp": distance 1, max length 9 -> 1 - 1/9
    assert anls("acme corq", ["acme corp"]) == pytest.approx(1 - 1 / 9)


def test_anls_below_threshold_is_zero():
    # "abc" vs "xyz": distance 3 / 3 -> similarity 0; "ab" vs "abcde": 3/5 -> 0.4 < 0.5 -> 0
    assert anls("xyz", ["abc"]) == 0.0
    assert anls("ab", ["abcde"]) == 0.0


def test_anls_exactly_half_is_kept_like_lmms_eval():
    # "ab" vs "abcd": distance 2 / 4 -> similarity 0.5, kept (lmms-eval zeroes only < 0.5)
    assert anls("ab", ["abcd"]) == 0.5


def test_anls_best_over_references():
    assert anls("42", ["forty two", "42.00", "42"]) == 1.0
    # vs "42.00": distance 3/5 -> 0.4 -> 0 ; vs "420": 1/3 -> 0.667
    assert anls("42", ["42.00", "420"]) == pytest.approx(2 / 3)


def test_anls_empty_output_scores_zero():
    assert anls("", ["1998"]) == 0.0


# ---- ChartQA relaxed accuracy ----------------------------------------------------------------------------


def test_relaxed_numeric_tolerance_5_percent():
    assert relaxed_correctness("104", "100")  # 4% off
    assert relaxed_correctness("105", "100")  # exactly 5%
    assert not relaxed_correctness("105.5", "100")  # 5.5%
    assert relaxed_correctness("-97", "-100")


def test_relaxed_thousands_separator():
    assert relaxed_correctness("1,000", "1000")
    assert relaxed_correctness("1,020", "1000")
    assert not relaxed_correctness("1,100", "1000")


def test_relaxed_percentages():
    assert relaxed_correctness("45%", "45")  # unit written by the model only
    assert relaxed_correctness("45%", "46%")
    assert not relaxed_correctness("0.45", "45")  # a fraction is a different number


def test_relaxed_text_exact_case_insensitive():
    assert relaxed_correctness("Green", "green")
    assert not relaxed_correctness("dark green", "green")


def test_relaxed_zero_target_needs_zero():
    assert relaxed_correctness("0", "0")
    assert not relaxed_correctness("0.01", "0")


def test_parse_short_answer_strips_prefix_and_period():
    assert parse_short_answer("Answer: 1,200.\nBecause the bar...").value == "1,200"
    assert parse_short_answer('"Green"').value == "Green"
    assert parse_short_answer("45%").value == "45%"
    p = parse_short_answer("   \n ")
    assert (p.ok, p.reason) == (False, "empty_output")


# ---- counting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("7", 7),
        ("7.", 7),
        ("There are 3 dogs.", 3),
        ("seven", 7),
        ("Seven apples", 7),
        ("twenty-one", 21),
        ("twenty one birds", 21),
        ("one hundred", 100),
        ("1,000", 1000),
        ("none", 0),
        ("There are no cats.", 0),
        ("I see two, maybe 3", 2),  # the first count wins
    ],
)
def test_parse_count(text, expected):
    p = parse_count(text)
    assert p.ok and p.value == expected


def test_parse_count_failures():
    assert parse_count("").reason == "empty_output"
    assert parse_count("many birds").reason == "no_number"
    assert first_count("2.5 apples") is None  # not a count


def test_count_correct():
    assert count_correct(3, 3)
    assert not count_correct(None, 3)
    assert not count_correct(4, 3)


def test_number_helpers():
    assert parse_number("1,000").value == 1000
    assert parse_number("12.5%").percent
    assert parse_number("v2") is None
    assert strip_answer("The answer is: Blue.") == "Blue"


# ---- multiple choice -------------------------------------------------------------------------------------

Q = "What color is the car?\nA. Dark red\nB. Red\nC. Blue\nPlease answer directly with only the letter."
OPTS = extract_options(Q)


def test_extract_options():
    assert OPTS == {"A": "Dark red", "B": "Red", "C": "Blue"}


@pytest.mark.parametrize(
    "out,letter",
    [
        ("B", "B"),
        ("b", None),  # a lowercase lone letter is not an option letter (could be a word)
        ("B.", "B"),
        ("(C)", "C"),
        ("Answer: C", "C"),
        ("C. Blue", "C"),
        ("Blue", "C"),  # option text instead of letter
        ("The car is dark red.", "A"),  # longest matching option text wins over "red"
        ("I think the answer is (B) because", "B"),
        ("The answer is B", "B"),
        ("D", None),  # not an option
        ("A dog", None),  # 'A' as an article is not a letter answer
        ("", None),
    ],
)
def test_parse_choice(out, letter):
    p = parse_choice(out, OPTS)
    assert p.value == letter and p.ok == (letter is not None)


def test_parse_choice_free_form_uses_number_words():
    assert parse_choice("Three.", {}).value == "3"
    assert parse_choice("2", {}).value == "2"


# ---- pointing ---------------------------------------------------------------------------------------------


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_parse_points_formats():
    assert parse_points('<point x="10.5" y="20" alt="cat">cat</point>').value == [[10.5, 20.0]]
    assert parse_points('<points x1="1" y1="2" x2="3" y2="4" alt="c">c</points>').value == [[1, 2], [3, 4]]
    assert parse_points("at (12, 34) and (56.5, 78)").value == [[12, 34], [56.5, 78]]
    assert parse_points("There are none.").value == []
    assert parse_points("a cat").ok is False
    assert parse_points("").reason == "empty_output"


def test_points_one_to_one_matching():
    h, w = 40, 60
    masks = [_disc(h, w, 10, 10, 4), _disc(h, w, 40, 20, 4)]
    # two points in the first mask, none in the second: only one may claim the first mask
    s = point_scores([(10, 10), (11, 10)], masks, (w, h))
    assert (s.n_tp, s.precision, s.recall) == (1, 0.5, 0.5)
    assert s.f1 == pytest.approx(0.5)
    # perfect
    s = point_scores([(40, 20), (10, 10)], masks, (w, h))
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)


def test_points_matching_is_optimal_not_greedy():
    # point p0 lies in both masks (overlap), p1 only in mask 0: a greedy p0->mask0 would lose a match
    h, w = 20, 40
    m0 = np.zeros((h, w), bool)
    m0[:, 0:20] = True
    m1 = np.zeros((h, w), bool)
    m1[:, 10:30] = True
    s = point_scores([(15, 5), (2, 5)], [m0, m1], (w, h))
    assert s.n_tp == 2


def test_points_outside_image_are_false_positives():
    h, w = 40, 60
    masks = [_disc(h, w, 10, 10, 4)]
    s = point_scores([(10, 10), (-5, 10), (70, 10)], masks, (w, h))
    assert (s.n_outside, s.n_tp, s.n_pred) == (2, 1, 3)
    assert s.precision == pytest.approx(1 / 3) and s.recall == 1.0
    assert s.f1 == pytest.approx(0.5)


def test_points_no_target_expected():
    h, w = 10, 10
    empty = [np.zeros((h, w), bool)]  # the published rows carry one all-False mask
    assert point_scores([], empty, (w, h)).f1 == 1.0
    s = point_scores([(5, 5)], empty, (w, h))
    assert (s.precision, s.recall, s.f1) == (0.0, 1.0, 0.0)


def test_points_none_predicted_but_expected():
    h, w = 10, 10
    s = point_scores([], [_disc(h, w, 5, 5, 2)], (w, h))
    assert (s.precision, s.recall, s.f1, s.n_gt) == (0.0, 0.0, 0.0, 1)
