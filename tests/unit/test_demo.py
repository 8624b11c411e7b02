"""Demo generator: deterministic bytes, planted defects as recorded, valid clean records, decodable images,
near duplicates that are near, and text defects that a clean-trained LM scores worse."""

from __future__ import annotations

import filecmp
import json
import math
import os
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from core import demo
from core.foundation.sample import IMAGE_TOKEN, Sample, SampleError
from core.io.images import decode_image

N = 300


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    info = demo.generate_demo(str(out), n_samples=N, seed=0)
    return out, info, demo.load_ground_truth(str(out)), {r["id"]: r for r in demo.load_records(str(out))}


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _images(rec):
    im = rec.get("image", [])
    return [im] if isinstance(im, str) else list(im)


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    a, b, c = (demo.generate_demo(str(tmp_path / x), n_samples=60, seed=s) for x, s in (("a", 7), ("b", 7), ("c", 8)))
    names = _tree(a.out_dir)
    assert names == _tree(b.out_dir) and len(names) > 60
    match, mismatch, errors = filecmp.cmpfiles(a.out_dir, b.out_dir, names, shallow=False)
    assert not mismatch and not errors and len(match) == len(names)
    assert open(a.data_jsonl, "rb").read() != open(c.data_jsonl, "rb").read()


def test_defect_counts_and_partition(demo_dir):
    out, info, gt, recs = demo_dir
    assert gt["n_samples"] == N == len(recs) and gt["seed"] == 0
    assert len(gt["near_duplicate_groups"]) == 15 and all(len(g) == 2 for g in gt["near_duplicate_groups"])
    assert len(gt["exact_duplicate_groups"]) == 9 and all(len(g) == 2 for g in gt["exact_duplicate_groups"])
    assert len(gt["garbled"]) == len(gt["unrelated"]) == len(gt["verbose"]) == 15
    assert sorted(gt["corrupt_detail"].values()) == sorted(demo.CORRUPT_KINDS)
    assert set(gt["corrupt"].values()) == {"corrupt_image", "missing_image", "image_count_mismatch", "role_broken",
                                           "empty_conversation"}
    # every sample is in exactly one bucket: one defect each
    buckets = ([i for g in gt["near_duplicate_groups"] for i in g] + [i for g in gt["exact_duplicate_groups"] for i in g]
               + gt["garbled"] + gt["unrelated"] + gt["verbose"] + list(gt["corrupt"]) + gt["clean"])
    assert len(buckets) == len(set(buckets)) == N and set(buckets) == set(recs)
    assert info.counts["clean"] == len(gt["clean"]) and sum(info.counts.values()) == N
    assert set(gt["sources"].values()) == set(demo.SOURCES)
    assert set(gt["structures"].values()) == {"single_image", "multi_turn", "multi_image", "text_only"}
    assert set(gt["near_duplicate_kinds"]) == {g[1] for g in gt["near_duplicate_groups"]}
    # defects are interleaved, not clustered at one end of the file
    pos = sorted(list(recs).index(i) for i in gt["garbled"])
    assert pos[0] < N // 3 and pos[-1] > 2 * N // 3


def test_json_and_jsonl_hold_the_same_records(demo_dir):
    out, info, gt, recs = demo_dir
    with open(info.data_json, encoding="utf-8") as f:
        arr = json.load(f)
    assert isinstance(arr, list) and arr == list(recs.values())
    assert all(r["source"] == gt["sources"][r["id"]] for r in arr)


def test_clean_records_validate_and_corrupt_ones_fail_with_their_reason(demo_dir):
    out, info, gt, recs = demo_dir
    for sid, rec in recs.items():
        kind = gt["corrupt"].get(sid)
        if kind in ("role_broken", "empty_conversation", "image_count_mismatch"):
            with pytest.raises(SampleError) as e:
                Sample.from_record(rec)
            assert e.value.reason == kind, (sid, gt["corrupt_detail"][sid])
            continue
        s = Sample.from_record(rec)  # clean, defective-text and image-corrupt records are well formed
        assert s.id == sid and s.source == gt["sources"][sid]
        structure = gt["structures"][sid]
        assert len(s.images) == {"text_only": 0, "multi_image": len(s.images)}.get(structure, 1)
        if structure == "multi_image":
            assert 2 <= len(s.images) <= 3
            assert s.conversations[0].value.count(IMAGE_TOKEN) == len(s.images)
        if structure == "multi_turn":
            assert len(s.conversations) >= 4


def test_images_decode_except_planted_corrupt(demo_dir):
    out, info, gt, recs = demo_dir
    names = set(os.listdir(info.images_dir))
    formats = Counter()
    for sid, rec in recs.items():
        kind = gt["corrupt"].get(sid)
        for name in _images(rec):
            path = os.path.join(info.images_dir, name)
            if kind == "missing_image":
                assert name not in names
                continue
            data = open(path, "rb").read()
            if kind == "corrupt_image":
                with pytest.raises(SampleError) as e:
                    decode_image(data)
                assert e.value.reason == "corrupt_image"
                continue
            im = decode_image(data)
            assert 96 <= min(im.size) and max(im.size) <= 400, (name, im.size)
            assert np.asarray(im).std() > 5  # drawn content, not a flat image
            formats[name.rsplit(".", 1)[1]] += 1
    assert set(formats) == {"jpg", "png", "webp"}
    assert len(names) == info.n_images


def test_exact_duplicates_share_bytes_and_conversation(demo_dir):
    out, info, gt, recs = demo_dir
    for a, b in gt["exact_duplicate_groups"]:
        ra, rb = recs[a], recs[b]
        assert a != b and ra["conversations"] == rb["conversations"] and ra["source"] == rb["source"]
        ia, ib = _images(ra), _images(rb)
        assert ia != ib and len(ia) == len(ib) >= 1  # own files, identical bytes
        for x, y in zip(ia, ib, strict=True):
            assert open(os.path.join(info.images_dir, x), "rb").read() == open(
                os.path.join(info.images_dir, y), "rb").read()


def test_near_duplicates_are_pixel_near_and_far_from_the_rest(demo_dir):
    out, info, gt, recs = demo_dir
    vecs = {}
    for sid, rec in recs.items():
        if sid in gt["corrupt"] or not isinstance(rec.get("image"), str):
            continue
        im = Image.open(os.path.join(info.images_dir, rec["image"])).convert("RGB")
        vecs[sid] = np.asarray(im.resize((16, 16), Image.Resampling.BOX), np.float32).ravel()
    ids = list(vecs)
    m = np.stack([vecs[i] for i in ids])
    pos = {i: k for k, i in enumerate(ids)}
    for a, b in gt["near_duplicate_groups"]:
        assert recs[a]["conversations"] != recs[b]["conversations"]  # other (plausible) text
        assert open(os.path.join(info.images_dir, recs[a]["image"]), "rb").read() != open(
            os.path.join(info.images_dir, recs[b]["image"]), "rb").read()
        pair = np.abs(m[pos[a]] - m[pos[b]]).mean()
        for x in (a, b):
            d = np.abs(m - m[pos[x]]).mean(axis=1)
            d[[pos[a], pos[b]]] = np.inf
            assert pair < 0.7 * d.min(), (a, b, gt["near_duplicate_kinds"][b], pair, d.min())


def test_text_defects_look_like_their_kind(demo_dir):
    out, info, gt, recs = demo_dir
    for sid in gt["unrelated"]:
        r = recs[sid]
        assert r["source"] != "chartqa_like" and "table" in r["conversations"][0]["value"]
        assert r["conversations"][1]["value"].startswith("TITLE | ")
    for sid in gt["verbose"]:
        for t in recs[sid]["conversations"][1::2]:
            assert "In conclusion" in t["value"] and len(t["value"]) > 200
    for sid in gt["garbled"]:
        words = " ".join(t["value"] for t in recs[sid]["conversations"][1::2]).split()
        assert len(words) >= 6


def _char_lm(texts, order=4):
    """Interpolated character n-gram model: a small stand-in for 'an LM trained on the clean text'."""
    grams = [Counter() for _ in range(order + 1)]
    ctx = [Counter() for _ in range(order + 1)]
    for t in texts:
        s = "\x02" * order + t + "\x03"
        for i in range(order, len(s)):
            for k in range(order + 1):
                grams[k][s[i - k: i + 1]] += 1
                ctx[k][s[i - k: i]] += 1
    vocab = len(set("".join(texts))) + 2

    def nll(t):
        s = "\x02" * order + t + "\x03"
        tot = 0.0
        for i in range(order, len(s)):
            p = 1.0 / vocab
            for k in range(order + 1):
                c = ctx[k][s[i - k: i]]
                if c:
                    p = 0.6 * grams[k][s[i - k: i + 1]] / c + 0.4 * p
            tot -= math.log(p)
        return tot / (len(s) - order)

    return nll


def test_garbled_and_unrelated_score_worse_than_clean_under_a_clean_trained_lm(demo_dir):
    out, info, gt, recs = demo_dir
    clean = demo.clean_texts(str(out))
    assert len(clean) == len(gt["clean"]) and not any(IMAGE_TOKEN in t for t in clean)
    assert len(demo.clean_texts(str(out), include_duplicates=True)) == len(clean) + 48
    random.Random(0).shuffle(clean)
    train, held = clean[: len(clean) // 2], clean[len(clean) // 2:]
    nll = _char_lm(train)
    held_scores = [nll(t) for t in held]
    for kind in ("garbled", "unrelated"):
        bad = [nll(demo.conversation_text(recs[i])) for i in gt[kind]]
        auc = sum((b > h) + 0.5 * (b == h) for b in bad for h in held_scores) / (len(bad) * len(held_scores))
        assert auc >= 0.95, (kind, auc)
        assert np.median(bad) > 2 * np.median(held_scores)


def test_clean_messages_are_chat_turns_with_placeholders(demo_dir):
    out, info, gt, recs = demo_dir
    msgs = demo.clean_messages(str(out))
    assert len(msgs) == len(gt["clean"])
    for m, sid in zip(msgs, [r for r in recs if r in set(gt["clean"])], strict=True):
        assert [x["role"] for x in m] == ["user", "assistant"] * (len(m) // 2)
        assert sum(x["content"].count(IMAGE_TOKEN) for x in m) == len(_images(recs[sid]))


def test_cli_prints_summary(tmp_path, capsys):
    info = demo.main(["--out", str(tmp_path / "d"), "--n", "40", "--seed", "1", "--no-corrupt"])
    text = capsys.readouterr().out
    assert "40 samples" in text and "corrupt=0" in text
    assert demo.load_ground_truth(info.out_dir)["corrupt"] == {}


def test_too_few_samples_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        demo.generate_demo(str(tmp_path), n_samples=10)


def test_ingest_quarantines_exactly_the_corrupt_samples(demo_dir, tmp_path):
    from core.foundation.ledger import check_balance, read_ledger, step_dir
    from core.io.ingest import IngestConfig, ingest

    out, info, gt, recs = demo_dir
    run = tmp_path / "run"
    res = ingest(IngestConfig(source=info.data_json, image_root=info.images_dir, run_dir=str(run),
                              shard_max_samples=100))
    led = read_ledger(step_dir(run, "ingest"))
    quarantined = dict(zip(led.loc[led.decision == "quarantine", "sample_id"],
                           led.loc[led.decision == "quarantine", "reason"], strict=True))
    assert quarantined == gt["corrupt"]
    assert res.n_kept == N - len(gt["corrupt"]) and len(res.shards) == 3
    check_balance(run, ["ingest"])
