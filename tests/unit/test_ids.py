"""The one id-list loader (core/foundation/ids.py): every accepted shape, and loud refusals."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.foundation.ids import load_id_list


def test_every_accepted_shape(tmp_path):
    (tmp_path / "list.json").write_text('["a", "b", 7]')
    (tmp_path / "ids.json").write_text('{"ids": ["a"], "other": 1}')
    gt = {"clean": ["c1", "c2"], "bad": ["b1"], "eval_contamination": {"x": "chartqa"}}
    (tmp_path / "ground_truth.json").write_text(json.dumps(gt))
    (tmp_path / "lines.txt").write_text("# known bad\na\n\n  b  \n")
    (tmp_path / "noext").write_text("x\ny\n")
    (tmp_path / "one_number.txt").write_text("12345\n")
    pq.write_table(pa.table({"sample_id": ["p", "q"], "score": [1, 2]}), tmp_path / "ids.parquet")
    assert load_id_list(tmp_path / "list.json") == ["a", "b", "7"]
    assert load_id_list(str(tmp_path / "ids.json")) == ["a"]
    assert load_id_list(tmp_path / "ids.json", key="clean") == ["a"]  # no `clean`: the `ids` list
    assert load_id_list(tmp_path / "ground_truth.json", key="clean") == ["c1", "c2"]
    assert load_id_list(tmp_path / "ground_truth.json", key="bad") == ["b1"]
    assert load_id_list(tmp_path / "lines.txt") == ["a", "b"]
    assert load_id_list(tmp_path / "noext") == ["x", "y"]
    assert load_id_list(tmp_path / "one_number.txt") == ["12345"]
    assert load_id_list(tmp_path / "ids.parquet") == ["p", "q"]


@pytest.mark.parametrize("text, match", [
    ('{"clean": ["a"]}', "no 'ids'"),  # an object without the asked key nor `ids`
    ('["a", null]', "id #1"),
    ('["a", ["b"]]', "id #1"),
    ('["a", ""]', "id #1"),
    ('[true]', "id #0"),
    ('{"ids": "a"}', "list of ids"),
    ('[1, 2', "not valid JSON"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, text, match):
    (tmp_path / "f.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_id_list(tmp_path / "f.json")


def test_parquet_without_sample_id_is_refused(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="sample_id"):
        load_id_list(tmp_path / "f.parquet")


def test_the_old_entry_points_are_this_loader(tmp_path):
    from core.runs import summary
    from core.steps import export
    from core.steps.perplexity import reference

    assert export.load_id_list is load_id_list and reference.load_id_list is load_id_list
    (tmp_path / "gt.json").write_text('{"clean": ["c"], "bad": ["b"]}')
    assert summary.load_id_list(str(tmp_path / "gt.json")) == ["b"]  # known-bad ids: the `bad` key, else `ids`
