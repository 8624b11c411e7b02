"""The bad-input corpus: every kind of broken record is quarantined with its reason, nothing crashes,
nothing vanishes, and the ledger balances."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from core.foundation.ledger import LedgerWriter, check_balance, read_ledger, step_dir
from core.foundation.sample import Sample
from core.io.wds import iter_samples, iter_shard, write_shards


def jpeg(color=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rec(sid: str, n_images: int = 1, answer: str = "A red box.") -> dict:
    q = "<image>\n" * n_images + "What is shown?"
    r = {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]}
    if n_images == 1:
        r["image"] = f"{sid}.jpg"
    elif n_images > 1:
        r["image"] = [f"{sid}_{i}.jpg" for i in range(n_images)]
    return r


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def bomb_png() -> bytes:
    # 10000 x 9000 = 90 MP: above Pillow's 89.5 MP warning threshold, below its 2x error threshold,
    # so only our warning-as-error policy catches it. Mode "1" keeps it ~11 MB in memory, tiny on disk.
    buf = io.BytesIO()
    Image.new("1", (10000, 9000), 0).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    # key -> (expected reason, members)
    "corrupt": ("corrupt_image", lambda: [("corrupt.json", rec("corrupt")), ("corrupt.jpg", b"\xff\xd8\xffnot a jpeg")]),
    "truncimg": ("corrupt_image", lambda: [("truncimg.json", rec("truncimg")), ("truncimg.jpg", jpeg()[:200])]),
    "nojson": ("missing_json", lambda: [("nojson.jpg", jpeg())]),
    "badjson": ("invalid_json", lambda: [("badjson.json", b'{"id": "badjson", "conversations": [')]),
    "latin": ("non_utf8", lambda: [("latin.json", json.dumps(rec("latin", 0)).encode().replace(b"What", b"Wh\xe9t"))]),
    "empty": ("empty_conversation", lambda: [("empty.json", {"id": "empty", "conversations": []})]),
    "roles": ("role_broken", lambda: [("roles.json", {"id": "roles", "conversations": [
        {"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]})]),
    "count": ("image_count_mismatch", lambda: [("count.json", {**rec("count"), "image": ["a.jpg", "b.jpg"]}),
                                                ("count.0.jpg", jpeg()), ("count.1.jpg", jpeg())]),
    "noimg": ("missing_image", lambda: [("noimg.json", rec("noimg"))]),
    "bomb": ("decompression_bomb", lambda: [("bomb.json", {**rec("bomb"), "image": "bomb.png"}), ("bomb.png", bomb_png())]),
    "huge": ("oversize_text", lambda: [("huge.json", rec("huge", 1, "x" * 300_000)), ("huge.jpg", jpeg())]),
}


def build_corpus(path, good_ids=("good1", "good2", "good3")) -> None:
    with tarfile.open(path, "w") as tar:
        for sid in good_ids[:1]:
            add(tar, f"{sid}.json", json.dumps(rec(sid)).encode())
            add(tar, f"{sid}.jpg", jpeg())
        for _, (_, members) in BAD.items():
            for name, data in members():
                add(tar, name, data if isinstance(data, bytes) else json.dumps(data).encode())
        add(tar, "../evil.json", json.dumps(rec("evil", 0)).encode())  # path traversal
        add(tar, "dotted.name.json", json.dumps(rec("dotted", 0)).encode())  # dotted key
        for sid in good_ids[1:]:
            add(tar, f"{sid}.json", json.dumps(rec(sid, 2)).encode())
            add(tar, f"{sid}.0.jpg", jpeg((0, 0, 255)))
            add(tar, f"{sid}.1.png", _png())


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_input_corpus_quarantined_with_reasons(tmp_path):
    shard = tmp_path / "corpus-000000.tar"
    build_corpus(shard)
    run = tmp_path / "run"
    with LedgerWriter(step_dir(run, "read") / "part-corpus.parquet", "read") as led:
        good = list(iter_shard(str(shard), quarantine=led))
        for s in good:
            led.add(s.id, "keep", shard=s.shard)
    assert [s.id for s in good] == ["good1", "good2", "good3"]
    assert good[1].image_bytes[1][:4] == b"\x89PNG"  # lossless: bytes untouched, order kept
    df = read_ledger(step_dir(run, "read"))
    reasons = dict(zip(df["sample_id"], df["reason"]))
    for key, (reason, _) in BAD.items():
        sid = f"corpus-000000/{key}" if key in ("nojson", "badjson", "latin") else key  # unparsable: shard/key
        assert reasons.get(sid) == reason, (key, reasons.get(sid))
    unsafe = df[df["reason"] == "unsafe_member_name"]["sample_id"].tolist()
    assert "corpus-000000/../evil.json" in unsafe and "corpus-000000/dotted.name.json" in unsafe
    # every group in the tar is accounted for exactly once
    assert len(df) == 3 + len(BAD) + 2
    bal = check_balance(run, ["read"])[0]
    assert (bal.kept, bal.quarantined) == (3, len(BAD) + 2)


def test_truncated_tar_quarantines_and_reports_missing(tmp_path):
    samples = []
    for i in range(6):
        s = Sample.from_record(rec(f"s{i}"))
        s.image_bytes = [jpeg((i * 40, 10, 10), (64, 64))]
        samples.append(s)
    info = write_shards(samples, str(tmp_path / "shards"), max_samples=100)[0]
    data = (tmp_path / "shards" / "shard-000000.tar").read_bytes()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    expected = set(info.ids)
    with LedgerWriter(step_dir(tmp_path, "embed") / "p.parquet", "embed") as led:
        got = list(iter_samples([str(tmp_path / "shards" / "shard-000000.tar")], quarantine=led, include_ids=expected))
        for s in got:
            led.add(s.id, "keep")
    df = read_ledger(step_dir(tmp_path, "embed"))
    assert 0 < len(got) < 6
    assert set(df["sample_id"]) == expected  # nothing vanished
    lost = df[df["decision"] == "quarantine"]
    assert set(lost["reason"]) <= {"truncated_tar", "missing_from_shard"} and len(lost) == 6 - len(got)
    # an ingest-style read (no include_ids) records the truncation itself
    with LedgerWriter(tmp_path / "raw.parquet", "raw") as led:
        list(iter_shard(str(tmp_path / "shards" / "shard-000000.tar"), quarantine=led))
    assert "truncated_tar" in led.reasons


def test_include_ids_restricts_output_and_quarantine(tmp_path):
    shard = tmp_path / "corpus-000000.tar"
    build_corpus(shard)
    with LedgerWriter(tmp_path / "l.parquet", "x") as led:
        got = list(iter_shard(str(shard), quarantine=led, include_ids={"good2", "corrupt"}))
    assert [s.id for s in got] == ["good2"]
    assert led.reasons == {"corrupt_image": 1}


def test_duplicate_key_and_duplicate_id(tmp_path):
    shard = tmp_path / "d-000000.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.json", json.dumps(rec("a")).encode())
        add(tar, "a.jpg", jpeg())
        add(tar, "a.jpg", jpeg())  # same member twice
        add(tar, "b.json", json.dumps(rec("same")).encode())
        add(tar, "b.jpg", jpeg())
        add(tar, "c.json", json.dumps(rec("same")).encode())
        add(tar, "c.jpg", jpeg())
    with LedgerWriter(tmp_path / "l.parquet", "x") as led:
        got = list(iter_shard(str(shard), quarantine=led))
    assert [s.id for s in got] == ["same"]
    assert led.reasons == {"duplicate_key": 1, "duplicate_id": 1}


@pytest.mark.parametrize("max_samples,max_bytes,n_shards", [(2, 1 << 30, 3), (100, 3000, 5)])
def test_writer_rollover_and_determinism(tmp_path, max_samples, max_bytes, n_shards):
    def make():
        out = []
        for i in range(5):
            s = Sample.from_record(rec(f"k{i}", 1 + i % 2))
            s.image_bytes = [jpeg((i * 50, 0, 0), (40, 40)) for _ in s.images]
            out.append(s)
        return out

    a = write_shards(make(), str(tmp_path / "a"), max_samples=max_samples, max_bytes=max_bytes)
    b = write_shards(make(), str(tmp_path / "b"), max_samples=max_samples, max_bytes=max_bytes)
    assert len(a) == n_shards
    assert [x.sha256 for x in a] == [x.sha256 for x in b]
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    back = list(iter_samples([x.path for x in a]))
    orig = make()
    assert [s.to_record() for s in back] == [s.to_record() for s in orig]
    assert [s.image_bytes for s in back] == [s.image_bytes for s in orig]
    with tarfile.open(a[0].path) as t:
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in t.getmembers())
        names = t.getnames()
    assert all(n.count(".") in (1, 2) for n in names)


def test_corrupt_header_mid_shard_is_not_a_silent_end(tmp_path):
    samples = []
    for i in range(4):
        s = Sample.from_record(rec(f"h{i}"))
        s.image_bytes = [jpeg((i * 60, 10, 10), (16, 16))]
        samples.append(s)
    info = write_shards(samples, str(tmp_path / "shards"))[0]
    path = tmp_path / "shards" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as t:
        third = [m for m in t.getmembers() if m.name.startswith("h2.")][0]
    data[third.offset : third.offset + 100] = b"\xff" * 100  # garbage name field + broken checksum
    path.write_bytes(bytes(data))
    with LedgerWriter(tmp_path / "raw.parquet", "raw") as led:
        got = [s.id for s in iter_shard(str(path), quarantine=led)]
    assert got == ["h0"] and led.reasons == {"truncated_tar": 2}  # h1 in flight + the shard-level loss
    with LedgerWriter(tmp_path / "step.parquet", "step") as led:
        list(iter_samples([str(path)], quarantine=led, include_ids=set(info.ids)))
    assert led.decided == set(info.ids) - {"h0"}  # h2, h3 reported missing_from_shard, h1 truncated_tar
