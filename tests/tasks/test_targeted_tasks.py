"""Targeted tasks: preset + JSON overrides are validated before any work."""

import pytest

from tasks.targeted import targeted_config


def test_overrides_are_validated():
    cfg = targeted_config("tiny", '{"budget_per_subgroup": 3, "ppl_direction": "drop_low"}', "/m")
    assert cfg.budget_per_subgroup == 3 and cfg.ppl_direction == "drop_low" and cfg.model == "/m"
    assert targeted_config("qwen2.5-vl", "").backend == "vllm"
    for bad, msg in [("{not json", "JSON"), ("[1, 2]", "JSON object"), ('{"budget": 3}', "unknown"),
                     ('{"model": "x"}', "unknown"), ('{"ppl_percentile": 0}', "ppl_percentile"),
                     ('{"families": {"a": "nope"}}', "family")]:
        with pytest.raises(ValueError, match=msg):
            targeted_config("tiny", bad)
    with pytest.raises(ValueError, match="preset"):
        targeted_config("huge", "{}")


def test_deck_html_shows_subgroups_rejections_and_funnel():
    import pandas as pd

    from core.targeted.report import funnel_html, generation_html, subgroups_html

    ref = pd.DataFrame({"ref_id": ["a", "b", "c"], "shard": "s", "subgroup": ["count", "count", ""],
                        "family": ["counting", "counting", ""], "question": ["How many dots?", "How many stars?", "Hi"],
                        "answer": ["3", "4", "x"], "used": [True, True, False], "reason": ["", "", "no_image"]})
    html = subgroups_html(ref)
    assert "How many stars?" in html and "no_image" in html and "counting" in html
    gens = pd.DataFrame({"gen_id": ["g1", "g2"], "subgroup": "count", "raw": ["Question: Q\nAnswer: 2", "blah"],
                         "reason": ["", "no_question"], "conversations_json": ["[...]", ""]})
    assert "no_question" in generation_html(gens) and "blah" in generation_html(gens)
    summary = {"retrieved": 2, "generation": {"n_retrieved": 2, "n_accepted": 1,
                                              "rejected_by_reason": {"gen_rejected:no_question": 1}},
               "filters": {"tg_dedup": {"inputs": 1, "passed": 0, "reasons": {"near_duplicate:reference": 1}}},
               "exported": 0}
    html = funnel_html(summary)
    assert "gen_rejected:no_question" in html and "near_duplicate:reference" in html and "<img" in html
