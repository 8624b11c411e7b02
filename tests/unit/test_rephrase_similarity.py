"""The meaning check's length-sorted batching returns the same similarities, in input order, as input-order
batches and as encoding each pair alone."""

from __future__ import annotations

import pytest

from core.steps.rephrase.similarity import SimilarityScorer


def test_sorted_batches_keep_input_order():
    a = ["How many red buses are in the picture? " * k for k in (1, 6, 2, 9, 1, 4)] + ["Name the title."]
    b = ["Count the red buses.", "There are many buses " * 5, "red buses?", "Completely unrelated noise text.",
         "How many buses are red?", "buses " * 20, "What is the title?"]
    sorted_ = SimilarityScorer("minilm", batch_size=3)
    plain = SimilarityScorer("minilm", batch_size=3, sort_by_length=False)
    got, ref = sorted_.similarity(a, b), plain.similarity(a, b)
    alone = [sorted_.similarity([x], [y])[0] for x, y in zip(a, b)]
    assert got == pytest.approx(ref, abs=1e-5) and got == pytest.approx(alone, abs=1e-5)
    assert got[3] < 0.5 < got[0]  # unrelated text scores low, a faithful shortening high
    assert sorted_.similarity([], []) == []
    with pytest.raises(ValueError):
        sorted_.similarity(["a"], ["b", "c"])
