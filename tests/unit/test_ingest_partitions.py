"""Partitioned ingest (core/io/partition.py, core/io/ingest.py `IngestStep`) decides what the one-pass ingest
decides: for JSON arrays, JSONL, Parquet, WDS and multi-file sources with malformed items, missing images and
duplicate ids within and across partitions, every partition size (down to 1 record) gives the same
(sample_id, decision, reason) rows and the same kept samples as `partition_records=0`; accounting balances;
2 Ray workers equal 1; a failed unit is redone alone; the reduce streams."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import core.io.partition as part_mod
from core.foundation.ledger import check_balance, read_ledger, step_dir
from core.io.ingest import IngestConfig, IngestStep, ingest, read_source_accounting
from core.io.partition import Partition, iter_partition, plan_partitions
from core.io.sources import iter_source
from core.io.wds import iter_samples, list_shards
from core.runs.fanout import FanOut


def img(color, fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, format=fmt)
    return buf.getvalue()


def conv(a="Red."):
    return [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": a}]


def records(tag=""):
    """24 records: duplicates near and far (r1 x3, r5 twice, r20 = r2), a missing image, a record with a
    problem before the duplicate check that reuses an id kept earlier (r3), a text-only one, a bad turn."""
    out = []
    for i in range(24):
        out.append({"id": f"r{i}", "image": "a.jpg", "conversations": conv(f"Red {tag}{i}.")})
    out[4] = {"id": "r1", "image": "b.png", "conversations": conv("dup near")}
    out[7]["image"] = "missing.jpg"
    out[9] = {"id": "r5", "image": "a.jpg", "conversations": conv("dup")}
    out[11] = {"id": "r3", "conversations": [{"from": "gpt", "value": "no question"}]}  # empty_conversation + dup id
    out[13] = {"id": "r13", "conversations": [{"from": "human", "value": "Text only?"},
                                              {"from": "gpt", "value": "Yes."}]}
    out[17] = {"id": "r1", "image": "missing.jpg", "conversations": conv("dup far, missing image")}
    out[20] = {"id": "r2", "image": "a.jpg", "conversations": conv("dup far")}
    out[22] = {"id": "r7", "image": "a.jpg", "conversations": conv("dup of a missing-image record")}
    return out


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(img((255, 0, 0)))
    (root / "b.png").write_bytes(img((0, 255, 0), "PNG"))
    return root


def json_array(path, recs, malformed=()):
    items = [json.dumps(r).encode() for r in recs]
    for i in malformed:  # invalid JSON inside balanced brackets: the splitter still delimits it
        items[i] = b'{"id": "bad%d", "conversations": [1 2]}' % i
    path.write_bytes(b"[\n" + b",\n  ".join(items) + b"\n]\n")
    return path


def jsonl(path, recs):
    lines = [json.dumps(r) for r in recs]
    lines.insert(6, "")  # a blank line
    lines[10] = "{not json"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def parquet(path, recs, group=5):
    rows = [{"id": r["id"], "image": r.get("image"), "conversations": r["conversations"]} for r in recs]
    t = pa.Table.from_pylist(rows)
    pq.write_table(t, path, row_group_size=group)
    return path


def wds_tar(path, recs, images_dir):
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        for i, r in enumerate(recs):
            key = f"k{path.stem}_{i}"
            add(f"{key}.json", json.dumps({"id": r["id"], "conversations": r["conversations"]}).encode())
            if i % 7 != 3:  # some samples carry no image member: image_count_mismatch
                add(f"{key}.jpg", (images_dir / "a.jpg").read_bytes())
    return path


def outcome(run):
    led = read_ledger(step_dir(run, "ingest"))
    rows = set(zip(led.sample_id, led.decision, led.reason))
    assert len(rows) == len(led)
    shards = list_shards(str(run / "shards"))
    kept = {s.id: (s.to_json_bytes(), tuple(s.image_bytes)) for s in iter_samples(shards)} if shards else {}
    acc = read_source_accounting(step_dir(run, "ingest"))
    assert acc["balanced"] and acc["source_records"] == acc["ledger_rows"] == len(led)
    check_balance(run, ["ingest"])
    assert set(kept) == set(led[led.decision == "keep"].sample_id)
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert sorted(s["path"] for s in manifest["shards"]) == sorted(shards)
    for s in manifest["shards"]:  # the reduce's rewritten shards are described as they are on disk
        data = open(s["path"], "rb").read()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["n_bytes"] == len(data)
        assert s["n_samples"] == sum(1 for _ in iter_samples([s["path"]]))
    assert manifest["summary"]["kept"] == len(kept) and manifest["summary"]["records"] == len(led)
    return rows, kept, led


def _no_offset(extra):
    d = json.loads(extra) if extra else {}
    d.pop("byte_offset", None)
    return json.dumps(d, sort_keys=True)


def same_as_one_pass(tmp_path, source, image_root, sizes=(1, 2, 5, 7, 1000), offsets=True, **kw):
    """`offsets=False`: a JSON array ijson rejects an item of (the one-pass ingest adds `byte_offset` to
    every later quarantine row of the file, a partition only within itself: core/io/partition.py)."""
    base = tmp_path / "one"
    ingest(IngestConfig(source=str(source), image_root=str(image_root), run_dir=str(base), **kw))
    want_rows, want_kept, want_led = outcome(base)
    for n in sizes:
        run = tmp_path / f"p{n}"
        res = ingest(IngestConfig(source=str(source), image_root=str(image_root), run_dir=str(run),
                                  partition_records=n, shard_max_samples=3, **kw))
        rows, kept, led = outcome(run)
        assert rows == want_rows, (n, rows ^ want_rows)
        assert kept == want_kept, n
        # details and positions too (the duplicate rows the reduce rewrote included)
        a = want_led.set_index("sample_id")[["decision", "reason", "extra"]].sort_index()
        b = led.set_index("sample_id")[["decision", "reason", "extra"]].sort_index()
        if not offsets:
            a["extra"], b["extra"] = a["extra"].map(_no_offset), b["extra"].map(_no_offset)
        assert a.equals(b), n
        assert res.n_kept == len(want_kept) and res.n_records == len(want_led)
        names = [p.rsplit("/", 1)[-1] for p in list_shards(str(run / "shards"))]
        assert all(x.startswith("shard-p") for x in names)
    return want_rows


# ---- partitions read exactly what the one pass reads -------------------------------------------------------
def _rec_view(r):
    return (r.file, r.index, r.position, r.fallback_id, r.problem, json.dumps(r.record, sort_keys=True),
            r.image_bytes)


@pytest.mark.parametrize("kind", ["json", "json_bad", "jsonl", "parquet", "wds"])
def test_partitions_yield_the_one_pass_records(tmp_path, images, kind):
    recs = records()
    src = {"json": lambda: json_array(tmp_path / "d.json", recs),
           "json_bad": lambda: json_array(tmp_path / "d.json", recs, malformed=(3, 12)),
           "jsonl": lambda: jsonl(tmp_path / "d.jsonl", recs),
           "parquet": lambda: parquet(tmp_path / "d.parquet", recs),
           "wds": lambda: wds_tar(tmp_path / "d.tar", recs, images)}[kind]()
    from core.io.sources import count_records

    flagged: dict = {}
    count_records(str(src), "auto", flagged=flagged)
    want = [_rec_view(r) for r in iter_source(str(src), flagged=flagged)]
    for n in (1, 3, 5, 100):
        parts = plan_partitions(str(src), partition_records=n)
        assert sum(p.n for p in parts) == len(want)
        got = []
        for p in parts:
            q = Partition.from_unit(p.unit)  # through the unit string, as a worker gets it
            assert q == p
            chunk = [_rec_view(r) for r in iter_partition(q)]
            assert len(chunk) == p.n
            got += chunk
        if kind == "json_bad":  # byte_offset appears after ijson's first error in one pass: compare without
            strip = lambda v: (v[0], v[1], {k: x for k, x in v[2].items() if k != "byte_offset"}, *v[3:])  # noqa: E731
            assert [strip(v) for v in got] == [strip(v) for v in want], n
        else:
            assert got == want, n
        if kind in ("json", "jsonl", "parquet") and n < len(want):
            assert len(parts) > 1
        if kind == "wds":
            assert len(parts) == 1  # a tar is one partition


def test_partition_unit_is_checked_data():
    p = Partition(3, "/x/d.json", "json", "auto", 10, 5, 100, 200, whole=False)
    assert p.name == "p00003" and Partition.from_unit(p.unit) == p
    bad = json.loads(p.unit)
    bad["first"] = "10"
    with pytest.raises(ValueError):
        Partition.from_unit(json.dumps(bad))
    with pytest.raises(ValueError):
        Partition.from_unit(json.dumps({"order": 1}))


# ---- same decisions as one pass ----------------------------------------------------------------------------
def test_json_array_same_as_one_pass(tmp_path, images):
    rows = same_as_one_pass(tmp_path, json_array(tmp_path / "d.json", records()), images)
    assert ("r1#dup4", "quarantine", "duplicate_id") in rows and ("r2#dup20", "quarantine", "duplicate_id") in rows
    assert ("r3#dup11", "quarantine", "empty_conversation") in rows  # a problem before the check keeps its reason


def test_json_array_with_malformed_items_same_as_one_pass(tmp_path, images):
    rows = same_as_one_pass(tmp_path, json_array(tmp_path / "d.json", records(), malformed=(3, 15)), images, offsets=False)
    assert any(r[2] == "invalid_json" for r in rows)


def test_jsonl_same_as_one_pass(tmp_path, images):
    same_as_one_pass(tmp_path, jsonl(tmp_path / "d.jsonl", records()), images)


def test_parquet_same_as_one_pass(tmp_path, images):
    same_as_one_pass(tmp_path, parquet(tmp_path / "d.parquet", records()), images)


def test_wds_and_multi_file_same_as_one_pass(tmp_path, images):
    src = tmp_path / "tars"
    src.mkdir()
    for i in range(3):
        wds_tar(src / f"part{i}.tar", records(str(i))[:9], images)  # ids repeat across the tars
    rows = same_as_one_pass(tmp_path, src, images, sizes=(1, 4))
    assert ("r0#dup@part1:0", "quarantine", "duplicate_id") in rows


def test_multi_file_json_same_as_one_pass(tmp_path, images):
    src = tmp_path / "src"
    src.mkdir()
    json_array(src / "a.json", records("a")[:14], malformed=(2,))
    jsonl(src / "b.jsonl", records("b")[3:])
    parquet(src / "c.parquet", records("c")[10:], group=3)
    same_as_one_pass(tmp_path, src, images, sizes=(1, 3, 8), offsets=False)


# ---- workers, resume, bounded reduce ----------------------------------------------------------------------
def test_two_ray_workers_equal_one(tmp_path, images, ray_local):
    src = json_array(tmp_path / "d.json", records(), malformed=(15,))
    out = {}
    for w in (1, 2):
        run = tmp_path / f"w{w}"
        ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(run), partition_records=4,
                            fanout=FanOut(workers=w, group_size=2)))
        out[w] = outcome(run)
    assert out[1][0] == out[2][0] and out[1][1] == out[2][1]
    m1, m2 = (json.loads((tmp_path / f"w{w}" / "shards" / "manifest.json").read_text()) for w in (1, 2))
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]


def test_resume_redoes_only_the_failed_partition(tmp_path, images, monkeypatch):
    src = json_array(tmp_path / "d.json", records())
    run = tmp_path / "run"
    cfg = IngestConfig(source=str(src), image_root=str(images), run_dir=str(run), partition_records=5)
    done: list[str] = []
    real = IngestStep.process

    def flaky(self, unit, led):
        p = Partition.from_unit(unit.url)
        done.append(p.name)
        if p.order == 2 and not (tmp_path / "failed").exists():
            (tmp_path / "failed").touch()
            raise RuntimeError("storage went away")
        return real(self, unit, led)

    monkeypatch.setattr(IngestStep, "process", flaky)
    with pytest.raises(RuntimeError):
        ingest(cfg)
    first = list(done)
    assert first == ["p00000", "p00001", "p00002"]  # in-process: stops at the failing unit
    parts_before = {p.stem: p.stat().st_mtime_ns for p in step_dir(run, "ingest").glob("part-p*.parquet")}
    assert set(parts_before) == {"part-p00000", "part-p00001"}
    assert not (run / "shards" / "manifest.json").exists()  # no reduce over unfinished partitions
    done.clear()
    ingest(cfg)
    assert done == ["p00002", "p00003", "p00004"]  # the finished ones are not redone
    for name, mtime in parts_before.items():  # nor rewritten (no id of theirs was decided earlier)
        assert (step_dir(run, "ingest") / f"{name}.parquet").stat().st_mtime_ns == mtime
    rows, kept, _ = outcome(run)
    base = tmp_path / "one"
    ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(base)))
    want_rows, want_kept, _ = outcome(base)
    assert rows == want_rows and kept == want_kept
    # a third run finds everything done and runs only the (idempotent) reduce
    done.clear()
    ingest(cfg)
    assert done == [] and outcome(run)[0] == want_rows


def test_reduce_streams_in_small_batches(tmp_path, images, monkeypatch):
    """Runs read and duplicates buffered 2 rows at a time, merged 3 runs at a time (rounds through
    intermediate runs): still exactly the one-pass result."""
    monkeypatch.setattr(part_mod, "RUN_BATCH", 2)
    monkeypatch.setattr(part_mod, "MERGE_FAN_IN", 3)
    seen = []
    real = part_mod.read_run

    def spy(path):
        for i, row in enumerate(real(path)):
            seen.append(i)
            yield row

    monkeypatch.setattr(part_mod, "read_run", spy)
    same_as_one_pass(tmp_path, json_array(tmp_path / "d.json", records() + records("x")), images, sizes=(1, 2))
    assert seen and max(seen) >= 2  # runs longer than a batch were read through


def test_one_pass_after_partitioned_leaves_no_partition_parts(tmp_path, images):
    src = json_array(tmp_path / "d.json", records())
    run = tmp_path / "run"
    ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(run), partition_records=5))
    ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(run)))
    assert [p.name for p in step_dir(run, "ingest").glob("*.parquet")] == ["part-ingest.parquet"]
    outcome(run)
    ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(run), partition_records=7))
    assert not (step_dir(run, "ingest") / "part-ingest.parquet").exists()
    assert all(p.name.startswith("shard-p") for p in (run / "shards").glob("*.tar"))
    outcome(run)


# ---- hostile inputs: the bounds at the door hold per partition -----------------------------------------------
@pytest.mark.parametrize("name", ["deep_array", "bigint_array", "deep_jsonl", "bigint_jsonl", "big_metadata",
                                  "big_meta_parquet", "many_turns", "sparse_member", "big_member", "fifo_image"])
def test_hostile_inputs_partitioned_one_record_each(name, tmp_path):
    """The hostile cases of tests/hostile_inputs.py, ingested one record per partition in a capped child: the
    same quarantine reasons, the other records kept, bounded memory (the plan scan is the bounded splitter)."""
    import dataclasses

    from tests.capped import run_capped
    from tests.hostile_inputs import CASES, run_case

    case = CASES[name](tmp_path)
    case = dataclasses.replace(case, config={**case.config, "partition_records": 1})
    res = run_capped(run_case, case, tmp_path / "run", headroom_mb=2048, timeout_s=120)
    out = res.value
    assert {k: out["reasons"].get(k) for k in case.expected} == case.expected, out["details"]
    assert out["kept"] == sorted(case.good)
    assert out["source_records"] == len(case.good) + len(case.expected)
    assert res.grown_mb < 500, res


def test_source_and_shards_on_s3(tmp_path, images, moto_s3):
    """JSONL byte ranges and JSON item ranges read from an object store, shards written there (a kept
    duplicate removed from its remote shard by the reduce), the ledger local: the one-pass result."""
    import fsspec

    for kind, make in (("jsonl", jsonl), ("json", json_array)):
        local = make(tmp_path / f"d.{kind}", records())
        src = f"s3://{moto_s3.bucket}/src/d.{kind}"
        with fsspec.open(src, "wb") as f:
            f.write(local.read_bytes())
        base = tmp_path / f"one-{kind}"
        ingest(IngestConfig(source=str(local), image_root=str(images), run_dir=str(base), source_name="d"))
        want_rows, want_kept, _ = outcome(base)
        run, led_run = f"s3://{moto_s3.bucket}/run-{kind}", tmp_path / f"led-{kind}"
        ingest(IngestConfig(source=src, image_root=str(images), run_dir=run, ledger_dir=str(led_run),
                            partition_records=3, shard_max_samples=2))
        led = read_ledger(step_dir(led_run, "ingest"))
        assert set(zip(led.sample_id, led.decision, led.reason)) == want_rows
        shards = list_shards(f"{run}/shards")
        assert shards and all(s.rsplit("/", 1)[-1].startswith("shard-p") for s in shards)
        kept = {s.id: (s.to_json_bytes(), tuple(s.image_bytes)) for s in iter_samples(shards)}
        assert kept == want_kept
        with fsspec.open(f"{run}/shards/manifest.json") as f:
            m = json.load(f)
        assert sum(s["n_samples"] for s in m["shards"]) == len(kept) == m["summary"]["kept"]
        assert read_source_accounting(step_dir(led_run, "ingest"))["balanced"]


def test_rewritten_id_equal_to_a_later_id_is_resolved_as_the_one_pass_does(tmp_path, images):
    """`a`, `a`, `a#dup1`: the one pass renames the second `a` to `a#dup1`, so the third record (whose own id
    is `a#dup1`) is a duplicate too (`a#dup1#dup2`). One record per partition: the reduce's second round
    sees the rewritten id meet the later one and does the same."""
    recs = [{"id": i, "image": "a.jpg", "conversations": conv(f"x{n}")} for n, i in
            enumerate(["a", "a", "a#dup1", "b", "a#dup1"])]
    rows = same_as_one_pass(tmp_path, json_array(tmp_path / "d.json", recs), images, sizes=(1, 2))
    assert rows == {("a", "keep", ""), ("a#dup1", "quarantine", "duplicate_id"), ("b", "keep", ""),
                    ("a#dup1#dup2", "quarantine", "duplicate_id"), ("a#dup1#dup4", "quarantine", "duplicate_id")}


def test_ray_fanout_failure_then_resume_redoes_only_the_failed_units(tmp_path, images, ray_local):
    """2 Ray workers: the partitions whose file cannot be read (storage gone: their units point at a missing
    path) fail, `FanOutIncomplete` names them, the others are published, no reduce runs; a re-run with the
    file readable redoes only those."""
    import dataclasses

    from core.runs.fanout import FanOutIncomplete, StepSpec, run_fanout

    src = tmp_path / "src"
    src.mkdir()
    json_array(src / "a.json", records("a")[:10])
    jsonl(src / "b.jsonl", records("b"))
    run = tmp_path / "run"
    cfg = IngestConfig(source=str(src), image_root=str(images), run_dir=str(run), partition_records=4)
    parts = plan_partitions(cfg.source, cfg.format, cfg.limits(), cfg.partition_records)
    b_names = [p.name for p in parts if p.file.endswith("b.jsonl")]
    broken = [dataclasses.replace(p, file=str(tmp_path / "gone.jsonl")) if p.name in b_names else p for p in parts]
    fan = FanOut(workers=2, group_size=1)
    with pytest.raises(FanOutIncomplete) as e:
        run_fanout(StepSpec(IngestStep, (cfg,)), [p.unit for p in broken], fan)
    assert sorted(e.value.unfinished) == b_names, e.value.errors
    assert not (run / "shards" / "manifest.json").exists()
    summary = run_fanout(StepSpec(IngestStep, (cfg,)), [p.unit for p in parts], fan)
    assert sorted(summary.done) == b_names and len(summary.skipped) == len(parts) - len(b_names)
    rows, kept, _ = outcome(run)
    base = tmp_path / "one"
    ingest(IngestConfig(source=str(src), image_root=str(images), run_dir=str(base)))
    want_rows, want_kept, _ = outcome(base)
    assert rows == want_rows and kept == want_kept
