"""Targeted tasks: the one TargetedConfig input (CLI JSON onto the tiny preset) is validated before any work."""

import pytest

from core.targeted.config import TargetedConfig


def test_config_json_is_validated():
    cfg = TargetedConfig.from_json('{"budget_per_subgroup": 3, "ppl_direction": "drop_low"}')
    assert cfg.budget_per_subgroup == 3 and cfg.ppl_direction == "drop_low" and cfg.device == "cpu"  # tiny preset
    assert TargetedConfig.from_json('{"preset": "qwen2.5-vl"}').backend == "vllm"
    for bad, msg in [("{not json", "JSON"), ("[1, 2]", "JSON object"), ('{"budget": 3}', "unknown"),
                     ('{"ppl_percentile": 0}', "ppl_percentile"), ('{"families": {"a": "nope"}}', "family"),
                     ('{"preset": "huge"}', "preset")]:
        with pytest.raises(ValueError, match=msg):
            TargetedConfig.from_json(bad)


def test_a_model_in_the_config_is_refused_not_replaced(tmp_path):
    from flytekit.types.directory import FlyteDirectory

    from core.foundation.configs import override
    from tasks.targeted import TINY, build_tiny_vlm
    from tasks.types import StepOut

    d = FlyteDirectory(str(tmp_path))
    with pytest.raises(ValueError, match="model_dir"):
        build_tiny_vlm(reference=StepOut("ingest", d), subgroups=d, model_dir=d, config=override(TINY, model="/m"))
    with pytest.raises(ValueError, match="needs model_dir"):
        build_tiny_vlm(reference=StepOut("ingest", d), subgroups=d, config=override(TINY, backend="vllm"))
    assert build_tiny_vlm(reference=StepOut("ingest", d), subgroups=d, model_dir=d, config=TINY).path == str(tmp_path)


def test_mix_exports_puts_the_parts_side_by_side(tmp_path):
    import json

    from core.targeted.pipeline import mix_exports

    roots = []
    for i, (subset, n) in enumerate([("baseline", 3), ("targeted", 2)]):
        root = tmp_path / f"ex{i}"
        (root / "shards" / "image").mkdir(parents=True)
        (root / "shards" / "image" / "shard-000000.tar").write_bytes(b"t" * (i + 1))
        (root / "manifest.json").write_text(json.dumps({"subset": subset, "n_samples": n, "shards": [
            {"name": "image/shard-000000.tar", "kind": "image"}]}))
        roots.append(str(root))
    man = mix_exports(roots, tmp_path / "mix", "baseline+targeted")
    assert man["n_samples"] == 5 and [p["subset"] for p in man["parts"]] == ["baseline", "targeted"]
    assert sorted(p.name for p in (tmp_path / "mix" / "shards").iterdir()) == [
        "part0-image-shard-000000.tar", "part1-image-shard-000000.tar"]
    assert json.loads((tmp_path / "mix" / "manifest.json").read_text()) == man


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
