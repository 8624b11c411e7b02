"""Input dialects and source accounting: one fixture per dialect (public layouts) and per bad kind.

Each test ingests a source and checks (a) what happened to every record, (b) that the ledger has exactly
one row per record counted from the source bytes (`source_accounting.json`, balanced)."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.foundation.ledger import check_balance, read_ledger, step_dir
from core.io.ingest import IngestConfig, SourceAccountingError, ingest, read_source_accounting
from core.io.sources import SourceError, count_records, split_json_array
from core.io.wds import iter_samples, list_shards


def img_bytes(color, fmt="JPEG", size=20):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def conv(q="<image>\nWhat color?", a="Red."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def run_ingest(tmp_path, source, image_root="", name="run", **kw):
    run = tmp_path / name
    res = ingest(IngestConfig(source=str(source), image_root=str(image_root), run_dir=str(run), **kw))
    led = read_ledger(step_dir(run, "ingest"))
    acc = read_source_accounting(step_dir(run, "ingest"))
    assert acc["balanced"] and acc["source_records"] == acc["ledger_rows"] == len(led) == res.n_kept + res.n_quarantined
    check_balance(run, ["ingest"])
    kept = {s.id: s for s in iter_samples(list_shards(str(run / "shards")))} if res.n_kept else {}
    return res, led, kept


def reasons_of(led):
    q = led[led.decision == "quarantine"]
    return dict(zip(q.sample_id, q.reason))


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(img_bytes((255, 0, 0)))
    (root / "b.png").write_bytes(img_bytes((0, 255, 0), "PNG"))
    return root


# ---- JSON arrays: byte-level accounting and resync ------------------------------------------------------
def test_corrupt_record_mid_array_is_quarantined_alone_and_later_records_kept(tmp_path, images):
    """The trial of the issue: 31 records, a non-UTF-8 one at index 15. Before: 16 records became one
    `invalid_json` row. Now: the bad one is quarantined with its byte offset, all 30 good ones are kept."""
    recs = [json.dumps({"id": f"r{i}", "image": "a.jpg", "conversations": conv(a=f"Red {i}.")}).encode()
            for i in range(31)]
    recs[15] = b'{"id": "r15", "conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}'
    data = b"[\n" + b",\n".join(recs) + b"\n]\n"
    src = tmp_path / "data.json"
    src.write_bytes(data)
    res, led, kept = run_ingest(tmp_path, src, images)
    assert res.source_records == 31 and res.n_kept == 30
    assert set(kept) == {f"r{i}" for i in range(31)} - {"r15"}
    bad = led[led.decision == "quarantine"].iloc[0]
    assert bad.reason == "non_utf8"
    assert json.loads(bad.extra)["byte_offset"] == data.index(recs[15]) and json.loads(bad.extra)["record_index"] == 15


def test_malformed_item_with_balanced_brackets_is_quarantined_alone(tmp_path, images):
    good = [json.dumps({"id": f"g{i}", "conversations": conv("Hi?", "Hello.")}) for i in range(4)]
    src = tmp_path / "d.json"
    src.write_text("[" + ",".join(good[:2] + ['{"id": "bad", "conversations": [1 2]}'] + good[2:]) + "]")
    res, led, kept = run_ingest(tmp_path, src, images)
    assert set(kept) == {"g0", "g1", "g2", "g3"}
    assert list(reasons_of(led).values()) == ["invalid_json"]


@pytest.mark.parametrize("text, where", [('[{"a": 1]}, {"b": 2}]', "byte 8"), ('"not records"', "byte 0"),
                                         ('[{"a": 1}] trailing', "byte 11")])
def test_undelimitable_json_fails_loudly_with_the_byte_offset_before_any_work(tmp_path, text, where):
    src = tmp_path / "broken.json"
    src.write_text(text)
    with pytest.raises(SourceError, match=where):
        ingest(IngestConfig(source=str(src), image_root="", run_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r" / "shards").exists()


def test_splitter_counts_like_json_on_tricky_strings():
    items = [{"s": 'a,]}"\\'}, [1, [2, {"x": "]"}]], "str,ing", 3.5, None, {"u": "\u00e9\u4e2d"}]
    raw = json.dumps(items, ensure_ascii=False).encode()
    for chunk in (1, 2, 7, 1 << 20):
        got = list(split_json_array(io.BytesIO(raw), chunk_size=chunk))
        assert [json.loads(b) for _, _, b, _ in got] == items
        assert all(raw[off:off + len(b)] == b for _, off, b, _ in got)


def test_splitter_agrees_with_json_on_random_documents():
    import random

    rng = random.Random(0)
    alphabet = ['a', ',', ']', '[', '{', '}', '"', '\\', '\n', 'é', '中', ' ', ':']

    def value(depth):
        k = rng.randrange(6 if depth < 3 else 3)
        if k == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        if k == 1:
            return rng.choice([0, -1.5, 1e20, True, False, None])
        if k == 2:
            return ""
        if k == 3:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {"".join(rng.choice(alphabet) for _ in range(rng.randrange(6))): value(depth + 1)
                for _ in range(rng.randrange(4))}

    for _ in range(60):
        items = [value(0) for _ in range(rng.randrange(1, 8))]
        raw = json.dumps(items, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
        got = list(split_json_array(io.BytesIO(raw), chunk_size=rng.choice([1, 3, 16, 1 << 20])))
        assert [json.loads(b) for _, _, b, _ in got] == items, raw


# ---- ShareGPT / messages ---------------------------------------------------------------------------------
def test_messages_dialect_jsonl(tmp_path, images):
    """ShareGPT / LLaMA-Factory / HF chat records: role/content (string with <image>, or typed parts),
    `images` list, system prompt; unknown fields travel in `meta`, domain/source are attributes."""
    rows = [
        {"id": "m1", "messages": [{"role": "user", "content": "<image>What is it?"},
                                  {"role": "assistant", "content": "A red square."}], "images": ["a.jpg"],
         "domain": "shapes", "source": "web", "system_prompt": "be nice", "license": "cc-by"},
        {"id": "m2", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                               {"type": "text", "text": "Compare."}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "Red vs green."}]}],
         "images": ["a.jpg", "b.png"]},
        {"id": "m3", "messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]},
                                  {"role": "assistant", "content": "x"}], "videos": ["v.mp4"]},
        {"id": "m4", "messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res, led, kept = run_ingest(tmp_path, src, images)
    assert set(kept) == {"m1", "m2"}
    assert reasons_of(led) == {"m3": "unsupported_modality:video", "m4": "role_broken"}
    m1, m2 = kept["m1"], kept["m2"]
    # a top-level system_prompt is the conversation's system turn (issue 26), not a meta field
    assert [(t.role, t.value) for t in m1.conversations[:2]] == [("system", "be nice"), ("human", "<image>What is it?")]
    assert m1.domain == "shapes" and m1.source == "web" and m1.meta == {"license": "cc-by"}
    assert m1.to_record()["meta"] == {"license": "cc-by"}
    assert m2.conversations[0].role == "system" and m2.conversations[1].value == "<image>\n<image>\nCompare."
    assert m2.image_bytes[1] == (images / "b.png").read_bytes()


def test_forced_format_overrides_detection(tmp_path, images):
    rec = {"id": "x", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]}
    src = tmp_path / "data.txt"  # no telling extension: the format says what it is
    src.write_text(json.dumps(rec) + "\n")
    res, led, kept = run_ingest(tmp_path, src, images, format="jsonl:messages")
    assert set(kept) == {"x"}
    with pytest.raises(ValueError, match="format"):
        IngestConfig(source=str(src), image_root="", run_dir=str(tmp_path / "r"), format="csv")


# ---- plain WebDataset shards written by webdataset.TarWriter ----------------------------------------------
def write_wds(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_plain_webdataset_shards_ingest_without_loss(tmp_path):
    red, green, blue = img_bytes((255, 0, 0)), img_bytes((0, 255, 0), "PNG"), img_bytes((0, 0, 255), "WEBP")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_wds(shards / "part-0000.tar", [
        # the json does not name the image and has no placeholder: the member is the image
        {"__key__": "s0", "jpg": red, "json": {"conversations": conv("What color?", "Red.")}},
        # caption datasets: image + .txt
        {"__key__": "s1", "png": green, "txt": "A green square."},
        # multi-image by index, messages dialect, extra member kept in meta
        {"__key__": "s2", "0.jpg": red, "1.webp": blue, "cls": "7",
         "json": {"id": "multi", "messages": [{"role": "user", "content": "<image>\n<image>\nSame color?"},
                                              {"role": "assistant", "content": "No."}]}},
        {"__key__": "s3", "mp4": b"\0\0\0 ftypisom", "txt": "a clip"},
        {"__key__": "s4", "jpg": red},  # an image with no text at all
    ])
    write_wds(shards / "part-0001.tar", [
        {"__key__": "t0", "jpg": blue, "json": {"id": "multi", "conversations": conv("<image>\nColor?", "Blue.")}},
        {"__key__": "t1", "webp": blue, "json": {"caption": "A blue square.", "domain": "shapes"}},
    ])
    res, led, kept = run_ingest(tmp_path, shards)
    assert res.source_records == 7
    assert set(kept) == {"s0", "s1", "multi", "t1"}
    assert reasons_of(led) == {"part-0000.tar/s3": "unsupported_modality:video",
                               "part-0000.tar/s4": "empty_conversation", "multi#dup@part-0001:0": "duplicate_id"}
    assert kept["s0"].conversations[0].value == "<image>\nWhat color?" and kept["s0"].image_bytes == [red]
    assert kept["s1"].conversations[1].value == "A green square." and kept["s1"].image_bytes == [green]
    assert kept["multi"].image_bytes == [red, blue] and kept["multi"].meta == {"cls": "7"}
    assert kept["multi"].conversations[1].value == "No."  # the first in shard order is the one kept
    assert kept["t1"].domain == "shapes"


def test_truncated_wds_shard_is_accounted(tmp_path):
    red = img_bytes((255, 0, 0))
    full = tmp_path / "full.tar"
    write_wds(full, [{"__key__": f"k{i}", "jpg": red, "txt": f"cap {i}"} for i in range(4)])
    data = full.read_bytes()
    src = tmp_path / "cut"
    src.mkdir()
    (src / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    res, led, kept = run_ingest(tmp_path, src)
    assert "truncated_tar" in set(reasons_of(led).values()) and res.n_kept >= 1


# ---- Parquet as Hugging Face `datasets` writes it ---------------------------------------------------------
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURN = pa.struct([("from", pa.string()), ("value", pa.string())])


def test_parquet_with_image_bytes_and_paths(tmp_path, images):
    red, green = img_bytes((255, 0, 0)), img_bytes((0, 255, 0), "PNG")
    src = tmp_path / "pq"
    src.mkdir()
    t1 = pa.table({
        "id": pa.array(["p0", "p1", "p2"]),
        "image": pa.array([{"bytes": red, "path": "red.jpg"}, {"bytes": green, "path": None}, None], HF_IMAGE),
        "conversations": pa.array([conv(), conv("What is this?", "Green."), conv("Hi?", "Hello.")], pa.list_(TURN)),
        "source": pa.array(["hf", "hf", "hf"]),
        "split_note": pa.array(["a", None, "c"]),
    })
    pq.write_table(t1, src / "train-00000-of-00002.parquet")
    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    t2 = pa.table({
        "id": pa.array(["q0", "q1"]),
        "images": pa.array([[{"bytes": None, "path": "a.jpg"}, {"bytes": None, "path": "b.png"}],
                            [{"bytes": None, "path": "../secret.jpg"}]], pa.list_(HF_IMAGE)),
        "messages": pa.array([[{"role": "user", "content": "<image><image>Compare."},
                               {"role": "assistant", "content": "Different."}],
                              [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}]],
                             pa.list_(msg)),
    })
    pq.write_table(t2, src / "train-00001-of-00002.parquet")
    res, led, kept = run_ingest(tmp_path, src, images)
    assert res.source_records == 5
    assert set(kept) == {"p0", "p1", "p2", "q0"} and reasons_of(led) == {"q1": "unsafe_path"}
    assert kept["p0"].image_bytes == [red] and kept["p0"].images == ["red.jpg"]
    assert kept["p1"].image_bytes == [green] and kept["p1"].conversations[0].value.startswith("<image>\n")
    assert kept["p0"].meta == {"split_note": "a"} and kept["p1"].meta == {}
    assert kept["q0"].image_bytes == [(images / "a.jpg").read_bytes(), (images / "b.png").read_bytes()]
    assert count_records(str(src)) == {str(src / "train-00000-of-00002.parquet"): 3,
                                       str(src / "train-00001-of-00002.parquet"): 2}


# ---- bad kinds ---------------------------------------------------------------------------------------------
def test_video_and_audio_are_quarantined_not_exported(tmp_path, images):
    rows = [
        {"id": "v1", "video": "clip.mp4", "conversations": conv("<video>\nWhat happens?", "A dog runs.")},
        {"id": "v2", "conversations": conv("<video>\nWhat happens?", "A dog runs.")},
        {"id": "au", "audio": "a.wav", "conversations": conv("<audio>\nWhat is said?", "Hello.")},
        {"id": "ok", "conversations": conv("Hi?", "Hello.")},
    ]
    src = tmp_path / "d.json"
    src.write_text(json.dumps(rows))
    res, led, kept = run_ingest(tmp_path, src, images)
    assert set(kept) == {"ok"}
    assert reasons_of(led) == {"v1": "unsupported_modality:video", "v2": "unsupported_modality:video",
                               "au": "unsupported_modality:audio"}


def test_symlink_escaping_the_image_root_is_unsafe(tmp_path, images):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(img_bytes((9, 9, 9)))
    os.symlink(outside, images / "link.jpg")
    os.symlink(images / "a.jpg", images / "inside.jpg")  # a symlink within the root is fine
    rows = [{"id": "out", "image": "link.jpg", "conversations": conv()},
            {"id": "in", "image": "inside.jpg", "conversations": conv()}]
    src = tmp_path / "d.json"
    src.write_text(json.dumps(rows))
    res, led, kept = run_ingest(tmp_path, src, images)
    assert set(kept) == {"in"} and reasons_of(led) == {"out": "unsafe_path"}


def test_duplicate_ids_across_files_keep_the_first_in_file_order(tmp_path, images):
    src = tmp_path / "parts"
    src.mkdir()
    (src / "b.jsonl").write_text(json.dumps({"id": "x", "conversations": conv("Q2?", "second")}) + "\n")
    (src / "a.jsonl").write_text(json.dumps({"id": "x", "conversations": conv("Q1?", "first")}) + "\n")
    res, led, kept = run_ingest(tmp_path, src, images)
    assert kept["x"].conversations[1].value == "first"
    assert reasons_of(led) == {"x#dup@b:0": "duplicate_id"}


def test_empty_sources_give_an_empty_balanced_ledger(tmp_path):
    for name, data in [("e.json", "[]"), ("e.jsonl", "\n")]:
        src = tmp_path / name
        src.write_text(data)
        res, led, kept = run_ingest(tmp_path, src, name=f"run_{name}")
        assert res.source_records == 0 and len(led) == 0 and res.shards == []


def test_a_lost_record_fails_the_accounting(tmp_path, images, monkeypatch):
    import core.io.ingest

    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"i{i}", "conversations": conv("Q?", "A.")}) for i in range(3)))
    real = core.io.ingest.iter_source
    monkeypatch.setattr(core.io.ingest, "iter_source", lambda *a, **k: (r for r in real(*a, **k) if r.index != 1))
    with pytest.raises(SourceAccountingError, match="2 ledger rows for 3 source records"):
        ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(tmp_path / "r")))
    assert read_source_accounting(step_dir(tmp_path / "r", "ingest"))["balanced"] is False


def test_meta_domain_and_source_travel_into_the_export(tmp_path, images):
    """Unknown top-level fields are not dropped: they ride in `meta` from the source to the exported shards."""
    from core.steps.export import ExportConfig, export_curated

    rows = [{"id": "x", "image": "a.jpg", "conversations": conv(), "domain": "chart", "source": "web",
             "system_prompt": "Answer briefly.", "license": {"name": "cc-by", "v": 4}}]
    src = tmp_path / "d.json"
    src.write_text(json.dumps(rows))
    run = tmp_path / "run"
    ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(run)))
    export_curated(list_shards(str(run / "shards")), str(run), str(tmp_path / "out"), ExportConfig(steps=["ingest"]))
    (back,) = iter_samples(list_shards(str(tmp_path / "out" / "shards")))
    rec = back.to_record()
    assert rec["meta"] == {"license": {"name": "cc-by", "v": 4}}
    assert rec["conversations"][0] == {"from": "system", "value": "Answer briefly."}  # system_prompt: a turn
    assert rec["domain"] == "chart" and rec["source"] == "web" and back.domain == "chart"
