"""Hostile inputs at ingest (issue 23): each is one quarantine row with its reason, the other records of the run
are kept, and the run stays small. Every bomb runs in a capped child (tests/capped.py): a regression fails
the test instead of taking the machine down. The inputs are built in tests/hostile_inputs.py."""

from __future__ import annotations

import json

import pytest

from core.evals.base import LoadFailure
from core.foundation.sample import Sample, sample_key
from core.io.ingest import IngestConfig
from core.io.sources import iter_source, parse_format
from tests.capped import run_capped
from tests.hostile_inputs import CASES, Case, bigint_wds, rec, run_case, sparse_member

GROWN_MB = 500  # the bound on what one hostile record may add to the run's memory


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_quarantined_with_its_reason_in_bounded_memory(name, tmp_path):
    case = CASES[name](tmp_path)
    res = run_capped(run_case, case, tmp_path / "run", headroom_mb=2048, timeout_s=120)
    out = res.value
    assert {k: out["reasons"].get(k) for k in case.expected} == case.expected, out["details"]
    assert out["kept"] == sorted(case.good)  # the other records of the run are kept
    assert out["source_records"] == len(case.good) + len(case.expected)
    assert res.grown_mb < GROWN_MB, res


def test_the_detail_names_the_limit(tmp_path):
    """Each bound's quarantine detail names the config field and its value, so the user knows what to raise."""
    for name, field in [("deep_array", "max_json_depth=100"), ("bigint_jsonl", "max_int_digits=100"),
                        ("big_metadata", "max_record_bytes=8388608"), ("many_turns", "max_turns=1000"),
                        ("big_image_file", "max_image_bytes=134217728")]:
        (tmp_path / name).mkdir()
        case = CASES[name](tmp_path / name)
        out = run_capped(run_case, case, tmp_path / name / "run", headroom_mb=2048, timeout_s=120).value
        (sid,) = case.expected
        assert field in out["details"][sid], (name, out["details"][sid])


@pytest.mark.parametrize("build", [sparse_member, bigint_wds], ids=["sparse_member", "bigint_wds"])
def test_the_wds_reader_quarantines_the_same_members(build, tmp_path):
    """Downstream steps read shards with core.io.wds.iter_shard: it bounds members and JSON the same way."""
    from tests.hostile_inputs import read_shard

    case = build(tmp_path)
    res = run_capped(read_shard, case.source, headroom_mb=2048, timeout_s=60)
    assert res.value["kept"] == ["g0", "g2"]
    reason = {"sparse_member": "unsafe_member", "bigint_wds": "oversize_int"}[build.__name__]
    assert reason in res.value["reasons"].values(), res.value
    assert res.grown_mb < GROWN_MB


def test_limits_are_config_fields_with_checked_ranges(tmp_path):
    cfg = IngestConfig(source="s", image_root="", run_dir="r", max_turns=50, max_json_depth=20)
    assert cfg.limits().max_turns == 50 and cfg.limits().max_json_depth == 20
    with pytest.raises(ValueError, match="max_record_bytes"):  # above what the shard reader accepts
        IngestConfig(source="s", image_root="", run_dir="r", max_record_bytes=64 << 20)


def test_a_stricter_limit_applies(tmp_path):
    """A small max_turns quarantines an ordinary 4-turn conversation: the bound is the config's, not a constant."""
    src = tmp_path / "d.jsonl"
    four = rec("four", None)
    four["conversations"] = four["conversations"] * 2
    src.write_text(json.dumps(four) + "\n" + json.dumps(rec("two", None)) + "\n")
    out = run_case(Case(src, "", {}, [], {"max_turns": 3}), tmp_path / "run")
    assert out["reasons"] == {"four": "too_many_turns"} and out["kept"] == ["two"]


def test_ids_match_whole_and_keys_never_carry_a_newline():
    assert sample_key("x") == "x"
    assert "\n" not in sample_key("x\n") and sample_key("x\n") != "x"
    with pytest.raises(ValueError, match="bad_id"):
        Sample.from_record(rec("x\n", None))


# ---- issue 26: sharegpt alias and a top-level system prompt ----------------------------------------------
def test_sharegpt_is_an_alias_of_the_messages_dialect(tmp_path):
    assert parse_format("sharegpt") == parse_format("messages") == ("auto", "messages")
    assert parse_format("jsonl:sharegpt") == ("jsonl", "messages")
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"id": "m", "messages": [{"role": "user", "content": "Q?"},
                                                       {"role": "assistant", "content": "A."}]}))
    (r,) = iter_source(str(src), "sharegpt")
    assert r.problem is None and r.record["conversations"] == [{"from": "human", "value": "Q?"},
                                                               {"from": "gpt", "value": "A."}]


def test_lmms_finetune_system_prompt_becomes_the_system_turn(tmp_path):
    """lmms-finetune's layout: LLaVA conversations plus a per-record `system_prompt`; LLaMA-Factory's `system`."""
    rows = [
        {"id": "l1", "system_prompt": "You are a chart expert.", "image": "a.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat is the peak?"}, {"from": "gpt", "value": "42."}]},
        {"id": "l2", "system": "Answer briefly.", "conversations": [{"from": "human", "value": "Hi?"},
                                                                    {"from": "gpt", "value": "Hello."}]},
        {"id": "l3", "system_prompt": "ignored", "messages": [
            {"role": "system", "content": "Own system."}, {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."}]},
    ]
    src = tmp_path / "lmms.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    got = {r.record["id"]: Sample.from_record(r.record) for r in iter_source(str(src)) if not r.problem}
    assert [(t.role, t.value) for t in got["l1"].conversations] == [
        ("system", "You are a chart expert."), ("human", "<image>\nWhat is the peak?"), ("gpt", "42.")]
    assert "system_prompt" not in got["l1"].meta
    assert got["l2"].conversations[0].role == "system" and got["l2"].conversations[0].value == "Answer briefly."
    # the conversation's own system turn wins; the top-level field is kept in meta, not lost
    assert got["l3"].conversations[0].value == "Own system." and got["l3"].meta == {"system_prompt": "ignored"}


# ---- eval loaders -----------------------------------------------------------------------------------------
def test_chartqa_refuses_image_names_that_leave_its_folder(tmp_path):
    from core.evals.benchmarks import ChartQA

    root = tmp_path / "chartqa"
    (root / "test" / "png").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"not for eval")
    (root / "test" / "png" / "ok.png").write_bytes(b"\x89PNG")
    items = [{"imgname": "ok.png", "query": "q", "label": "1"},
             {"imgname": "../../secret.png", "query": "q", "label": "1"},
             {"imgname": str(tmp_path / "secret.png"), "query": "q", "label": "1"},
             {"imgname": "ok.png\x00", "query": "q", "label": "1"}]
    (root / "test" / "test_human.json").write_text(json.dumps(items))
    out = list(ChartQA().load(str(root)))
    assert not isinstance(out[0], LoadFailure)
    assert [o.reason.split(":")[0] for o in out[1:]] == ["unsafe_path"] * 3


# ---- the byte scanner's bounds ------------------------------------------------------------------------------
def test_bounded_splitter_delimits_the_same_items_and_flags_only_those_over_a_bound():
    """With depth and size bounds (and tiny chunks, so long strings of dropped items straddle reads), the
    scanner yields the same items at the same offsets as without; an item within both bounds has the same
    bytes, one over a bound has no bytes and its reason; the depth found on the bytes is json's."""
    import io
    import random

    from core.foundation.limits import json_depth
    from core.io.sources import split_json_array

    rng = random.Random(1)
    alphabet = ['a', ',', ']', '[', '{', '}', '"', '\\', 'é', ' ']

    def value(depth):
        k = rng.randrange(5 if depth < 6 else 2)
        if k == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        if k == 1:
            return rng.choice([0, -1.5, None, True])
        if k == 2:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {str(i): value(depth + 1) for i in range(rng.randrange(4))}

    def depth_of(v):
        return 1 + max((depth_of(x) for x in (v.values() if isinstance(v, dict) else v)), default=0) \
            if isinstance(v, (dict, list)) else 0

    for _ in range(80):
        items = [value(0) for _ in range(rng.randrange(1, 8))]
        raw = json.dumps(items, ensure_ascii=rng.random() < 0.5).encode()
        max_depth, max_bytes = rng.choice([2, 3, 5]), rng.choice([20, 60, 200])
        chunk = rng.choice([1, 3, 16, 1 << 20])
        plain = list(split_json_array(io.BytesIO(raw), chunk_size=chunk))
        bounded = list(split_json_array(io.BytesIO(raw), chunk_size=chunk, max_depth=max_depth,
                                        max_item_bytes=max_bytes))
        assert [(i, off) for i, off, _, _ in bounded] == [(i, off) for i, off, _, _ in plain], raw
        for (_, _, b, err), (_, _, full, _), item in zip(bounded, plain, items):
            deep, big = depth_of(item) > max_depth, len(full) > max_bytes
            assert (json_depth(full, max_depth) > 0) == deep
            if deep:
                assert b is None and err.startswith("too_deep"), (item, err)
            elif big:
                assert b is None and err.startswith("oversize_record"), (item, err)
            else:
                assert b == full and err == ""


def test_bounded_lines_match_plain_splitting_and_never_hold_a_long_line():
    import io
    import random

    from core.io.sources import iter_lines

    rng = random.Random(2)
    for _ in range(100):
        lines = [rng.choice([b"", b"  ", b"\t\r", b"x" * rng.randrange(1, 40), b" y "]) for _ in range(rng.randrange(8))]
        data = b"\n".join(lines) + rng.choice([b"", b"\n"])
        bound = rng.choice([3, 10, 100])
        want = [ln if len(ln) <= bound else len(ln) for ln in data.split(b"\n") if ln.strip()]
        assert list(iter_lines(io.BytesIO(data), bound, chunk_size=rng.choice([1, 4, 1 << 20]))) == want, data


def test_an_integer_over_the_digit_bound_is_quarantined_in_a_json_array_too(tmp_path):
    """150 digits parse fine in ijson (under Python's 4,300): the count pass sends the file to the bounded
    path, so a JSON array quarantines it as JSONL does; a long float and a long digit string stay kept."""
    rows = [rec("g0", None), {**rec("n", None), "metadata": {"v": int("9" * 150)}},
            {**rec("f", None), "metadata": {"v": "1" + "2" * 150}}]
    src = tmp_path / "nums.json"
    src.write_text(json.dumps(rows).replace('"1' + "2" * 150 + '"', "0." + "2" * 150) + "\n")
    (tmp_path / "s.json").write_text(json.dumps([{**rec("s", None), "metadata": {"v": "7" * 150}}, rec("t", None)]))
    out = run_case(Case(src, "", {}, []), tmp_path / "run")
    assert out["reasons"] == {"nums#1": "oversize_int"} and out["kept"] == ["f", "g0"]  # unparsed: keyed by position
    out = run_case(Case(tmp_path / "s.json", "", {}, []), tmp_path / "run2")
    assert out["reasons"] == {} and out["kept"] == ["s", "t"]
