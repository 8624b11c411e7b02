"""Reference subgroups from a field or from k-means on MiniLM question embeddings."""

import pytest

from core.foundation.sample import Sample
from core.targeted.config import TargetedConfig
from core.targeted.subgroups import build_subgroups, first_pair, subgroup_examples


def _s(i, q, a, source="", image=True, meta=None):
    rec = {"id": f"r{i:03d}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q},
                                                 {"from": "gpt", "value": a}], "source": source}
    if image:
        rec["image"] = f"{i}.png"
    if meta:
        rec["metadata"] = meta
    return Sample.from_record(rec)


THINGS = ["red circles", "birds", "cars", "apples", "people", "trees", "boats", "cups"]
COUNT = [f"How many {t} are there in the image?" for t in THINGS]
CHART = [f"What is the value of the {c} bar in the chart for {y}?" for c, y in
         zip(["blue", "green", "orange", "grey", "red", "purple", "black", "yellow"], range(2010, 2018))]


def test_field_subgroups_and_exclusions():
    samples = [_s(0, "How many dots?\nAnswer the question using a single word or phrase.", "3", "count_like"),
               _s(1, "What is the title?", "Sales", "chartqa_like"),
               _s(2, "What is 2 + 2?", "4", "text_only", image=False),
               _s(3, "Describe it.", "A field.", "photo_like"),
               _s(4, "How many?", "2", "", meta={"task": "count"})]
    cfg = TargetedConfig(model="m", include_subgroups=["count_like", "chartqa_like"], families={"count_like": "counting"})
    df = build_subgroups(samples, cfg).set_index("ref_id")
    assert df.loc["r000", "subgroup"] == "count_like" and df.loc["r000", "family"] == "counting"
    assert df.loc["r000", "question"] == "How many dots?"  # answer-format instruction removed
    assert df.loc["r001", "family"] == "chart"
    assert df.loc["r002", "reason"] == "no_image" and not df.loc["r002", "used"]
    assert df.loc["r003", "reason"] == "subgroup_not_included"
    assert df.loc["r004", "reason"] == "no_subgroup_field"
    by_meta = build_subgroups(samples, TargetedConfig(model="m", subgroup_field="metadata.task")).set_index("ref_id")
    assert by_meta.loc["r004", "subgroup"] == "count" and by_meta["used"].sum() == 1
    with pytest.raises(ValueError, match="include_subgroups"):
        build_subgroups(samples, TargetedConfig(model="m", include_subgroups=["absent"]))
    assert first_pair(samples[0]) == ("How many dots?", "3")


def test_kmeans_on_minilm_separates_question_kinds():
    samples = [_s(i, q, "1") for i, q in enumerate(COUNT + CHART)]
    df = build_subgroups(samples, TargetedConfig(model="m", subgroup_field="", n_clusters=2, seed=0))
    labels = df["subgroup"].tolist()
    assert set(labels) == {"cluster_00", "cluster_01"}
    assert len(set(labels[:8])) == 1 and len(set(labels[8:])) == 1 and labels[0] != labels[8]
    ex = subgroup_examples(df, 2)
    assert sorted(len(v) for v in ex.values()) == [2, 2]
