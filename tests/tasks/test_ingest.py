"""Ingest: streaming JSON/JSONL + image folder -> shards + a balanced ledger; bad records quarantined."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from core.foundation.ledger import check_balance, read_ledger, step_dir
from core.io.ingest import IngestConfig, ingest
from core.io.wds import iter_samples, list_shards


def write_img(path, color, fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def conv(q="<image>\nWhat color?", a="Red."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def dataset(tmp_path):
    img = tmp_path / "images"
    (img / "sub").mkdir(parents=True)
    write_img(img / "a.jpg", (255, 0, 0))
    write_img(img / "sub" / "b.png", (0, 255, 0), "PNG")  # PNG content: member gets .png
    write_img(img / "c.jpg", (0, 0, 255))
    (img / "bad.jpg").write_bytes(b"garbage")
    records = [
        {"id": "a", "image": "a.jpg", "conversations": conv()},
        {"id": "multi", "image": ["a.jpg", "sub/b.png"], "conversations": conv("<image>\n<image>\nCompare.", "Red vs green.")},
        {"id": "text", "conversations": conv("What is 2+2?", "4.")},
        {"conversations": conv("No id here?", "Then a content hash.")},
        {"id": "missing", "image": "nope.jpg", "conversations": conv()},
        {"id": "corrupt", "image": "bad.jpg", "conversations": conv()},
        {"id": "escape", "image": "../../etc/passwd", "conversations": conv()},
        {"id": "a", "image": "c.jpg", "conversations": conv()},  # duplicate id
        {"id": "roles", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"id": "count", "image": "a.jpg", "conversations": conv("no placeholder", "x")},
    ]
    return tmp_path, img, records


EXPECTED = {"missing": "missing_image", "corrupt": "corrupt_image", "escape": "unsafe_path",
            "roles": "role_broken", "count": "image_count_mismatch"}


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_ingest_quarantines_and_balances(dataset, fmt):
    tmp, img, records = dataset
    src = tmp / f"data.{fmt}"
    if fmt == "json":
        src.write_text(json.dumps(records))
    else:
        lines = [json.dumps(r).encode() for r in records] + [b"{not json", b'{"id": "l\xe9", "conversations": []}']
        src.write_bytes(b"\n".join(lines) + b"\n")
    run = tmp / f"run_{fmt}"
    res = ingest(IngestConfig(source=str(src), image_root=str(img), run_dir=str(run), shard_max_samples=2))
    led = read_ledger(step_dir(run, "ingest"))
    reasons = dict(zip(led["sample_id"], led["reason"]))
    for sid, reason in EXPECTED.items():
        assert reasons[sid] == reason
    assert reasons["a#dup7"] == "duplicate_id"
    if fmt == "jsonl":
        assert sorted(led.loc[led.reason.isin(["invalid_json", "non_utf8"]), "reason"]) == ["invalid_json", "non_utf8"]
    assert res.n_records == len(led) == len(records) + (2 if fmt == "jsonl" else 0)
    assert res.n_kept == 4 and len(res.shards) == 2
    check_balance(run, ["ingest"])
    shards = list_shards(str(run / "shards"))
    assert [s.rsplit("/", 1)[-1] for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    back = {s.id: s for s in iter_samples(shards)}
    assert set(back) == set(led.loc[led.decision == "keep", "sample_id"])
    assert back["multi"].image_bytes[1] == (img / "sub" / "b.png").read_bytes()  # lossless
    assert back["multi"].to_record()["image"] == ["a.jpg", "sub/b.png"]
    kept = led[led.decision == "keep"]
    assert dict(zip(kept.sample_id, kept.shard))["multi"] == "shard-000000"


def test_ingest_is_deterministic(dataset):
    tmp, img, records = dataset
    src = tmp / "d.json"
    src.write_text(json.dumps(records))
    a = ingest(IngestConfig(source=str(src), image_root=str(img), run_dir=str(tmp / "r1")))
    b = ingest(IngestConfig(source=str(src), image_root=str(img), run_dir=str(tmp / "r2")))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_truncated_json_array_is_quarantined_not_fatal(dataset):
    tmp, img, records = dataset
    src = tmp / "cut.json"
    src.write_text(json.dumps(records[:3])[:-40])
    res = ingest(IngestConfig(source=str(src), image_root=str(img), run_dir=str(tmp / "r")))
    led = read_ledger(step_dir(tmp / "r", "ingest"))
    assert res.n_kept == 2 and led["reason"].tolist()[-1] == "invalid_json"


def test_shard_size_by_bytes(dataset):
    tmp, img, records = dataset
    src = tmp / "d.json"
    src.write_text(json.dumps(records))
    res = ingest(IngestConfig(source=str(src), image_root=str(img), run_dir=str(tmp / "r"), shard_max_bytes=1500))
    # image samples (> 750 bytes each with tar headers) get a shard each; the two small text-only ones share one
    assert [len(s.ids) for s in res.shards] == [1, 1, 2]


def test_ingest_and_read_from_s3(dataset, moto_s3):
    tmp, img, records = dataset
    src = tmp / "d.json"
    src.write_text(json.dumps(records))
    run = f"s3://{moto_s3.bucket}/run"
    ledger_run = tmp / "ledger_run"
    res = ingest(IngestConfig(source=str(src), image_root=str(img), run_dir=run, ledger_dir=str(ledger_run)))
    shards = list_shards(f"{run}/shards")
    assert shards == [f"{run}/shards/shard-000000.tar"]
    back = list(iter_samples(shards))
    assert len(back) == res.n_kept == 4
    check_balance(ledger_run, ["ingest"])


def test_source_fingerprint_changes_with_the_data(tmp_path):
    import os
    import time

    from core.io.ingest import source_fingerprint

    img = tmp_path / "images"
    img.mkdir()
    write_img(img / "a.jpg", (255, 0, 0))
    src = tmp_path / "data.json"
    src.write_text('[{"id": "a", "image": "a.jpg", "conversations": []}]')
    fp = source_fingerprint(str(src), str(img))
    assert fp == source_fingerprint(str(src), str(img))  # stable
    src.write_text('[{"id": "b", "image": "a.jpg", "conversations": []}]')  # same size, new content + mtime
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    fp2 = source_fingerprint(str(src), str(img))
    assert fp2 != fp
    write_img(img / "b.jpg", (0, 255, 0))  # an image added to the folder
    fp3 = source_fingerprint(str(src), str(img))
    assert fp3 != fp2
    assert source_fingerprint(str(tmp_path / "nope.json"), "") != fp3  # a missing file is a state too


def test_cached_ingest_reruns_when_the_files_change(dataset, tmp_path, flyte_local_cache, monkeypatch):
    """flytekit's local cache keys ingest by its inputs: with the fingerprint among them, a re-run on the same
    paths is a cache hit until the files change, then it ingests again (no stale shards)."""
    import core.io.ingest
    from tasks.ingest import fingerprint_source, ingest_dataset

    tmp, img, records = dataset
    src = tmp / "data.json"
    src.write_text(json.dumps(records))
    calls = []
    real = core.io.ingest.ingest
    monkeypatch.setattr(core.io.ingest, "ingest", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run():
        fp = fingerprint_source(source=str(src), image_root=str(img))
        out = ingest_dataset(source=str(src), image_root=str(img), source_fingerprint=fp)
        return read_ledger(step_dir(out.dir.path, out.step))

    first = run()
    assert len(run()) == len(first) and len(calls) == 1  # the second run came from the cache
    src.write_text(json.dumps(records[:2]))
    third = run()
    assert len(calls) == 2 and len(third) == 2 < len(first)


def test_partitioned_ingest_task_decides_as_the_one_pass_and_resumes_in_its_step_folder(dataset, monkeypatch):
    """`partition_records > 0` runs the partitioned ingest in the task's persistent step folder: the same
    (id, decision, reason) rows as the one pass; a re-run of the same call (a Flyte retry) finds every
    partition finished and redoes none."""
    import core.io.ingest
    from core.foundation.configs import override
    from core.io.ingest import default_ingest_options
    from tasks.ingest import ingest_dataset

    tmp, img, records = dataset
    src = tmp / "data.json"
    src.write_text(json.dumps(records))
    one = ingest_dataset(source=str(src), image_root=str(img))
    opts = override(default_ingest_options(), partition_records=2)
    part = ingest_dataset(source=str(src), image_root=str(img), config=opts)
    a, b = (read_ledger(step_dir(o.dir.path, "ingest")) for o in (one, part))
    assert set(zip(a.sample_id, a.decision, a.reason)) == set(zip(b.sample_id, b.decision, b.reason))
    assert len(b) == len(records) and "/ingest/" in part.dir.path  # the resumable step folder, not the work dir
    from flytekit.core.local_cache import LocalTaskCache

    monkeypatch.setattr(LocalTaskCache, "get", staticmethod(lambda *a, **kw: None))  # a retry: no cache answers
    done = []
    real = core.io.ingest.IngestStep.process
    monkeypatch.setattr(core.io.ingest.IngestStep, "process", lambda self, u, led: done.append(u) or real(self, u, led))
    again = ingest_dataset(source=str(src), image_root=str(img), config=opts)
    assert again.dir.path == part.dir.path and done == []  # every partition resumed
    assert read_ledger(step_dir(again.dir.path, "ingest")).equals(b)
