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
