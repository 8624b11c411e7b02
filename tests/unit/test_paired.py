"""Paired comparisons (core/evals/paired.py) on synthetic paired data whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.evals.paired import paired_test


def test_a_clear_shift_is_significant_and_its_interval_holds_it():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 1.0, 40)
    b = a + 0.5 + rng.normal(0, 0.2, 40)  # every item moves by ~0.5
    r = paired_test(a, b)
    assert r.significant and r.p_value < 0.001
    assert r.lo < 0.5 < r.hi and r.lo > 0.3 and r.hi < 0.7
    assert r.delta == pytest.approx(float(np.mean(b - a)))
    assert paired_test(b, a).delta == pytest.approx(-r.delta)  # direction: b - a


def test_an_identical_pair_is_not_significant():
    a = np.random.default_rng(1).normal(0, 1, 30)
    r = paired_test(a, a.copy())
    assert not r.significant and r.p_value == 1.0 and r.delta == 0.0
    assert r.lo == pytest.approx(0.0, abs=1e-9) and r.hi == pytest.approx(0.0, abs=1e-9)


def test_noise_without_shift_is_rarely_significant():
    """Under the null (no shift), about 5% of tests flag; far from the ~50% a broken test would give."""
    rng = np.random.default_rng(2)
    flags = [paired_test(rng.normal(0, 1, 20), rng.normal(0, 1, 20), seed=k).significant for k in range(200)]
    assert 0 <= sum(flags) <= 22


def test_interval_coverage_is_about_95_percent():
    """The true mean difference lies inside the 95% interval in about 95% of repeated experiments."""
    rng = np.random.default_rng(3)
    hits = 0
    for k in range(200):
        a = rng.normal(0, 1, 25)
        b = a + 0.3 + rng.normal(0, 0.8, 25)  # true mean difference 0.3, symmetric noise
        r = paired_test(a, b, seed=k)
        hits += r.lo <= 0.3 <= r.hi
    assert 180 <= hits <= 198


def test_too_few_items_cannot_be_significant():
    """4 items that all moved the same way: the exact test's smallest p is 2/16; the interval is unbounded (a
    percentile bootstrap would call this significant)."""
    r = paired_test([0.0, 0.0, 0.0, 0.0], [1.0, 1.1, 0.9, 1.2])
    assert r.p_value == pytest.approx(2 / 16) and not r.significant
    assert r.lo == -math.inf and r.hi == math.inf and "exact" in r.method


def test_exact_and_sampled_agree_and_nan_pairs_are_left_out():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 1, 16), rng.normal(0.6, 1, 16)
    exact = paired_test(a, b)
    sampled = paired_test(a, b, exact_max_n=8, n_resamples=20_000, seed=1)
    assert "exact" in exact.method and "draws" in sampled.method
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.02)
    assert sampled.lo == pytest.approx(exact.lo, abs=0.1) and sampled.hi == pytest.approx(exact.hi, abs=0.1)
    assert paired_test(a, b, seed=5) == paired_test(a, b, seed=5)  # seeded: reproducible
    with_nan = paired_test(np.append(a, np.nan), np.append(b, 3.0))
    assert with_nan.n == 16 and with_nan.delta == pytest.approx(exact.delta)
    empty = paired_test([], [])
    assert empty.n == 0 and not empty.significant and math.isnan(empty.delta)
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([1.0], [1.0, 2.0])
