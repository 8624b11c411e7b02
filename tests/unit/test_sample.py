import pytest

from core.foundation.sample import Sample, SampleError, sample_key, strip_image_placeholders


def conv(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


def test_from_record_roundtrip_and_views():
    r = {"id": "x1", "image": ["a.jpg", "b.jpg"], "source": "s",
         "conversations": conv(("human", "<image>\n<image>\nCompare."), ("gpt", "Same."), ("human", "Why?"), ("gpt", "Colors."))}
    s = Sample.from_record(r)
    assert s.images == ["a.jpg", "b.jpg"] and s.to_record() == r
    assert s.text("first_human") == "Compare."
    assert s.text("all_human") == "Compare.\nWhy?"
    assert "<image>" in s.text("all", strip_image_tokens=False)


def test_content_id_is_stable_when_id_missing():
    r = {"conversations": conv(("human", "Hi?"), ("gpt", "Hello."))}
    a, b = Sample.from_record(r), Sample.from_record(dict(r))
    assert a.id == b.id and a.id.startswith("h")
    r2 = {"conversations": conv(("human", "Hi?"), ("gpt", "Hello!"))}
    assert Sample.from_record(r2).id != a.id


@pytest.mark.parametrize("record,reason", [
    ({"id": "a", "conversations": []}, "empty_conversation"),
    ({"id": "a", "conversations": conv(("human", "q"))}, "empty_conversation"),
    ({"id": "a", "conversations": conv(("human", "q"), ("gpt", "   "))}, "empty_conversation"),
    ({"id": "a", "conversations": conv(("human", "q"), ("human", "a"))}, "role_broken"),
    ({"id": "a", "conversations": conv(("robot", "q"), ("gpt", "a"))}, "role_broken"),
    ({"id": "a", "conversations": conv(("human", "q"), ("gpt", "a"), ("human", "b"))}, "role_broken"),
    ({"id": "a", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "role_broken"),
    ({"id": "a", "conversations": conv(("human", "<image>\nq"), ("gpt", "a"))}, "image_count_mismatch"),
    ({"id": "a", "image": "x.jpg", "conversations": conv(("human", "q"), ("gpt", "a"))}, "image_count_mismatch"),
    ({"id": "a", "image": 3, "conversations": conv(("human", "q"), ("gpt", "a"))}, "invalid_json"),
    ({"id": "a", "conversations": conv(("human", "q" * 300_000), ("gpt", "a"))}, "oversize_text"),
    (["not", "a", "dict"], "invalid_json"),
])
def test_invalid_records_raise_reason(record, reason):
    with pytest.raises(SampleError) as e:
        Sample.from_record(record)
    assert e.value.reason == reason


def test_system_turn_allowed_first():
    s = Sample.from_record({"id": "s", "conversations": conv(("system", "Be brief."), ("human", "q"), ("gpt", "a"))})
    assert s.conversations[0].role == "system"


def test_sample_key_safe_and_injective():
    assert sample_key("abc_1-2") == "abc_1-2"
    k1, k2 = sample_key("a.b"), sample_key("a/b")
    assert "." not in k1 and "/" not in k1 and k1 != k2


def test_strip_image_placeholders():
    assert strip_image_placeholders("<image>\nWhat is this?") == "What is this?"
    assert strip_image_placeholders("Compare\n<image> and <image>") == "Compare\n and"
    assert strip_image_placeholders("Look:\n<image>") == "Look:"
