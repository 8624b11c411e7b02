"""Parsing generated outputs into LLaVA conversations: every malformed kind is rejected with its reason."""

import pytest

from core.foundation.sample import Sample
from core.targeted.config import FAMILIES, FamilyPrompt, TargetedConfig
from core.targeted.parse import REJECT_REASONS, parse_generation, reason_code

MALFORMED = [
    ("Question: How many cats?\nAnswer: 3", "length", "counting", "unfinished"),
    ("Question: How many cats?\nAnswer: 3", "prompt_too_long", "counting", "unfinished"),
    ("   \n ", "stop", "counting", "empty"),
    ("I'm sorry, I cannot help with that.", "stop", "counting", "refusal"),
    ("How many cats are there? 3", "stop", "counting", "no_question"),
    ("Question:\nAnswer: 3", "stop", "counting", "no_question"),
    ("Question: How many cats are there?", "stop", "counting", "no_answer"),
    ("Answer: 3\nQuestion: How many cats?", "stop", "counting", "no_answer"),
    ("Question: How many cats?\nAnswer:", "stop", "counting", "no_answer"),
    ("Question: How many cats?\nAnswer: 3\nQuestion: How many dogs?\nAnswer: 2", "stop", "counting", "multiple_pairs"),
    ("Question: <image>\nHow many cats?\nAnswer: 3", "stop", "counting", "placeholder_in_output"),
    ("Question: " + "word " * 80 + "?\nAnswer: 3", "stop", "counting", "question_too_long"),
    ("Question: How many CATS are there?\nAnswer: 3", "stop", "counting", "copied_example"),
    ("Question: How many cats?\nAnswer: three", "stop", "counting", "answer_format:not_a_number"),
    ("Question: How many cats?\nAnswer: There are 3 cats.", "stop", "counting", "answer_format:not_a_number"),
    ("Question: What is the title?\nAnswer: The title of this chart is the one at the top", "stop", "chart",
     "answer_format:too_long"),
    ("Question: Which is red?\nAnswer: A", "stop", "mcq", "answer_format:no_options"),
    ("Question: Which is red?\nA. car\nB. tree\nAnswer: the car", "stop", "mcq", "answer_format:not_a_letter"),
    ("Question: Which is red?\nA. car\nB. tree\nAnswer: D", "stop", "mcq", "answer_format:letter_not_an_option"),
    ("Question: Point to the cats.\nAnswer: (10, 20)", "stop", "points", "answer_format:not_points"),
    ('Question: Point to the cats.\nAnswer: <point x="10" y="20"> and more', "stop", "points", "answer_format:not_points"),
    ('Question: Point to the cats.\nAnswer: <point x="120" y="20">', "stop", "points", "answer_format:point_out_of_range"),
    ("Question: " + "x" * 200_001 + "\nAnswer: 3", "stop", "counting", "structure:oversize_text"),
]


@pytest.mark.parametrize("text,finish,family,reason", MALFORMED)
def test_malformed_output_rejected_with_reason(text, finish, family, reason):
    p = parse_generation(text, finish, FAMILIES[family], examples=["How many cats are there?"])
    assert not p.ok and p.conversations is None
    assert p.reason == reason


def test_every_reject_reason_is_exercised():
    assert {reason_code(r) for *_, r in MALFORMED} == set(REJECT_REASONS)


@pytest.mark.parametrize("text,family,answer", [
    ("Question: How many cats are in the picture?\nAnswer: 3.", "counting", "3"),
    ("**Question:** What is the value for 2015?\n**Answer:** 55%", "chart", "55%"),
    ("question: What city is on the form?\nanswer: Springfield", "doc", "Springfield"),
    ("Question: Which is red?\nA. car\nB. tree\nAnswer: (B)", "mcq", "(B)"),
    ('Question: Point to the cats.\nAnswer: <point x="10.5" y="20"> <point x="3" y="99.9">', "points",
     '<point x="10.5" y="20"> <point x="3" y="99.9">'),
    ("Question: Point to the unicorns.\nAnswer: There are none.", "points", "There are none."),
])
def test_valid_output_becomes_llava_conversation(text, family, answer):
    fp = FAMILIES[family]
    p = parse_generation(text, "stop", fp)
    assert p.ok, p.reason
    human, gpt = p.conversations
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert human["value"].count("<image>") == 1
    assert human["value"].endswith(fp.question_suffix)
    assert gpt == {"from": "gpt", "value": answer}
    Sample.from_record({"id": "x", "image": "x.png", "conversations": p.conversations})  # valid training record


def test_config_validation():
    with pytest.raises(ValueError, match="family"):
        TargetedConfig(model="m", default_family="nope")
    with pytest.raises(ValueError, match="backend"):
        TargetedConfig(model="m", backend="tgi")
    with pytest.raises(ValueError, match="ppl_direction"):
        TargetedConfig(model="m", ppl_direction="up")
    with pytest.raises(ValueError, match="answer_format"):
        FamilyPrompt("x", "sentence")
    cfg = TargetedConfig(model="m", prompts={"mine": {"instruction": "i", "answer_format": "number"}},
                         default_family="mine")
    assert cfg.prompts["mine"].answer_format == "number"
    assert TargetedConfig.from_dict(cfg.to_dict()) == cfg
