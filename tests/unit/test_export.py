"""Export: determinism, manifest integrity, kept-count check, subsets, rephrased text, bad rephrases."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from export_train_fixtures import make_records

from core.foundation.ledger import LedgerWriter, read_ledger, step_dir
from core.foundation.sample import Sample
from core.io.wds import iter_samples, list_shards, write_shards
from core.steps.export import ExportConfig, ExportError, export_curated, ledger_steps, load_id_list, verify_export

N = 40


def _make_run(root: Path) -> tuple[Path, list[str]]:
    """A run dir: 40 ingested samples (2 shards) and ledgers ingest -> semdedup -> perplexity -> rephrase."""
    samples = []
    for rec, imgs in make_records(N, seed=1):
        s = Sample.from_record(rec)
        s.image_bytes = imgs
        samples.append(s)
    run = root / "run"
    infos = write_shards(samples, str(run / "shards"), max_samples=25)
    ids = [s.id for s in samples]
    with LedgerWriter(step_dir(run, "ingest") / "part-0.parquet", "ingest") as led:
        for i in ids:
            led.add(i, "keep")
        led.add("src#99", "quarantine", "corrupt_image")
    with LedgerWriter(step_dir(run, "semdedup") / "part-0.parquet", "semdedup") as led:
        for k, i in enumerate(ids):
            led.add(i, "drop", "semdedup_eps:0.05") if k % 5 == 0 else led.add(i, "keep")
    passed = [i for k, i in enumerate(ids) if k % 5]
    with LedgerWriter(step_dir(run, "perplexity") / "part-0.parquet", "perplexity") as led:
        for k, i in enumerate(passed):
            led.add(i, "drop", "ppl_above_p90") if k % 7 == 3 else led.add(i, "keep")
    passed = [i for k, i in enumerate(passed) if k % 7 != 3]
    with LedgerWriter(step_dir(run, "rephrase") / "part-0.parquet", "rephrase") as led:
        for k, i in enumerate(passed):
            led.add(i, "modify" if k % 2 == 0 else "keep")
    assert len(infos) == 2
    return run, passed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("exp"))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((d / "shards").glob("*.tar"))}


def test_export_is_byte_identical_and_matches_ledger(run, tmp_path):
    rdir, kept = run
    cfg = ExportConfig(max_samples=10)
    m1 = export_curated(list_shards(str(rdir / "shards")), str(rdir), str(tmp_path / "a"), cfg)
    m2 = export_curated(list_shards(str(rdir / "shards")), str(rdir), str(tmp_path / "b"), cfg)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    assert m1 == m2
    assert m1["steps"] == ["ingest", "semdedup", "perplexity", "rephrase"]
    assert m1["n_samples"] == len(kept) == sum(s["n_samples"] for s in m1["shards"])
    # shards are homogeneous by kind (shards/<kind>/), each kind rolled over at max_samples
    by_kind = {k: [len(s["ids"]) for s in m1["shards"] if s["kind"] == k] for k in m1["kinds"]}
    assert len(kept) == 27 and by_kind == {"image": [10, 4], "images2": [7], "text": [6]}
    assert {k: v["n_samples"] for k, v in m1["kinds"].items()} == {"image": 14, "images2": 7, "text": 6}
    assert all(s["name"].startswith(s["kind"] + "/") for s in m1["shards"])
    # every exported id is a kept id, in input order within its kind; nothing else
    exported = [i for s in m1["shards"] for i in s["ids"]]
    assert sorted(exported) == sorted(kept) and len(exported) == len(kept)
    for k in m1["kinds"]:
        ids = [i for s in m1["shards"] if s["kind"] == k for i in s["ids"]]
        assert ids == [i for i in kept if i in set(ids)]
    # what each step removed, by reason, comes from the ledgers
    removed = {r["step"]: r for r in m1["removed_by_step"]}
    assert removed["semdedup"]["by_reason"] == [{"decision": "drop", "reason": "semdedup_eps:0.05", "count": 8}]
    assert removed["perplexity"]["removed"] == 32 - len(kept)
    assert removed["ingest"]["by_reason"][0]["reason"] == "corrupt_image"


def test_manifest_sha256_and_training_schema(run, tmp_path):
    rdir, kept = run
    out = tmp_path / "e"
    m = export_curated(list_shards(str(rdir / "shards")), str(rdir), str(out), ExportConfig(max_samples=8))
    for sh in m["shards"]:
        data = (out / "shards" / sh["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["n_bytes"]
        with tarfile.open(out / "shards" / sh["name"]) as tf:
            for ti in tf.getmembers():
                assert (ti.mtime, ti.uid, ti.gid, ti.mode) == (0, 0, 0, 0o644)
                key, _, suffix = ti.name.partition(".")
                assert "." not in key and suffix in ("json", "jpg", "0.jpg", "1.jpg")
    verify_export(str(out))
    # a flipped byte is caught
    p = out / "shards" / m["shards"][0]["name"]
    data = bytearray(p.read_bytes())
    data[600] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match"):
        verify_export(str(out))


def test_export_reads_back_with_images(run, tmp_path):
    rdir, kept = run
    out = tmp_path / "e"
    export_curated(list_shards(str(rdir / "shards")), str(rdir), str(out), ExportConfig())
    src = {s.id: s for s in iter_samples(list_shards(str(rdir / "shards")))}
    back = list(iter_samples(list_shards(str(out / "shards"))))  # the manifest's shards: kind, then input order
    assert sorted(s.id for s in back) == sorted(kept) and len(back) == len(kept)
    for s in back:
        assert s.image_bytes == src[s.id].image_bytes  # JPEG sources: copied byte for byte
        rec, orig = s.to_record(), src[s.id].to_record()
        assert rec["conversations"] == orig["conversations"]
        # the record's image names are the tar members of the sample (docs/export.md, loader schema)
        n = len(src[s.id].images)
        assert s.images == ([f"{s.key}.jpg"] if n == 1 else [f"{s.key}.{i}.jpg" for i in range(n)])


def test_subset_export_and_id_files(run, tmp_path):
    rdir, kept = run
    subset = kept[::3]
    (tmp_path / "ids.txt").write_text("\n".join(reversed(subset)) + "\n")
    ids = load_id_list(str(tmp_path / "ids.txt"))
    m = export_curated(list_shards(str(rdir / "shards")), str(rdir), str(tmp_path / "s"),
                       ExportConfig(subset_name="ppl_decile_0"), subset_ids=ids)
    assert m["subset"] == "ppl_decile_0" and m["n_samples"] == len(subset)
    exported = [i for s in m["shards"] for i in s["ids"]]
    assert sorted(exported) == sorted(subset) and len(exported) == len(subset)
    for k in m["kinds"]:  # input order within each kind, not list order
        ids = [i for s in m["shards"] if s["kind"] == k for i in s["ids"]]
        assert ids == [i for i in subset if i in set(ids)]
    pq.write_table(pa.table({"sample_id": subset}), tmp_path / "ids.parquet")
    assert load_id_list(str(tmp_path / "ids.parquet")) == subset
    # a subset id that is in no shard makes the count check fail loudly
    with pytest.raises(ExportError, match="exported"):
        export_curated(list_shards(str(rdir / "shards")), str(rdir), str(tmp_path / "s2"), ExportConfig(),
                       subset_ids=subset + ["no_such_id"])


def test_export_after_named_step(run, tmp_path):
    rdir, kept = run
    m = export_curated(list_shards(str(rdir / "shards")), str(rdir), str(tmp_path / "d"),
                       ExportConfig(steps=["ingest", "semdedup"]))
    assert m["n_samples"] == 32 and m["selection"] == "kept_by:semdedup"


def test_missing_kept_sample_raises(run, tmp_path):
    rdir, kept = run
    shards = list_shards(str(rdir / "shards"))
    with pytest.raises(ExportError, match="missing_from_shard"):
        export_curated(shards[:1], str(rdir), str(tmp_path / "x"), ExportConfig())
    assert not (tmp_path / "x" / "manifest.json").exists()
    led = read_ledger(tmp_path / "x" / "ledger" / "export")
    assert sorted(led.sample_id) == sorted(kept)  # the ids in no shard are quarantined (core.foundation.step), not lost
    assert (tmp_path / "x" / "ledger" / "export" / "part-zz-missing.parquet").exists()
    # exporting again into the same folder rewrites the whole ledger: no stale missing part survives
    m = export_curated(shards, str(rdir), str(tmp_path / "x"), ExportConfig())
    led = read_ledger(tmp_path / "x" / "ledger" / "export")
    assert sorted(led.sample_id) == sorted(kept) and set(led.decision) == {"keep"} and m["n_samples"] == len(kept)


def test_rephrased_conversations_applied_and_bad_ones_fall_back(run, tmp_path):
    rdir, kept = run
    src = {s.id: s for s in iter_samples(list_shards(str(rdir / "shards")))}
    modified = kept[::2]
    bad_ph = [sid for sid in modified if src[sid].images][1]  # loses its <image> placeholder
    bad_js = modified[0] if modified[0] != bad_ph else modified[2]
    rows = []
    for k, sid in enumerate(modified):
        conv = [{"from": t.role, "value": t.value} for t in src[sid].conversations]
        conv[-1]["value"] = f"short answer {k}"
        if sid == bad_ph:
            conv[0]["value"] = conv[0]["value"].replace("<image>", "")
        rows.append({"sample_id": sid, "conversations_json": "{not json" if sid == bad_js else json.dumps(conv)})
    rows.append({"sample_id": "dropped_elsewhere", "conversations_json": "[]"})
    (tmp_path / "reph").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "reph" / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "reph" / "part-b.parquet")
    out = tmp_path / "r"
    m = export_curated(list_shards(str(rdir / "shards")), str(rdir), str(out), ExportConfig(),
                       rephrased_dir=str(tmp_path / "reph"))
    assert m["n_samples"] == len(kept)
    bad = {"rephrase_invalid:image_count_mismatch": 1, "rephrase_invalid:invalid_json": 1}
    assert m["rephrase_fallbacks"] == bad and m["n_rephrased"] == len(modified) - 2
    back = {s.id: s for s in iter_samples(list_shards(str(out / "shards")))}
    for k, sid in enumerate(modified):
        if sid in (bad_ph, bad_js):
            assert back[sid].conversations == src[sid].conversations  # fallback: the original text
        else:
            assert back[sid].conversations[-1].value == f"short answer {k}"
            assert back[sid].conversations[0] == src[sid].conversations[0]
    assert back[kept[1]].conversations == src[kept[1]].conversations


def test_step_order_inferred(run):
    rdir, _ = run
    assert ledger_steps(str(rdir)) == ["ingest", "semdedup", "perplexity", "rephrase"]


def test_export_from_and_to_s3(run, tmp_path, moto_s3):
    """Shards streamed from S3, export written to S3 (ledger uploaded); identical bytes to a local export."""
    import fsspec

    rdir, kept = run
    fs = fsspec.filesystem("s3")
    for p in sorted((rdir / "shards").glob("*.tar")):
        fs.put_file(str(p), f"{moto_s3.bucket}/run/shards/{p.name}")
    shards = list_shards(f"s3://{moto_s3.bucket}/run/shards")
    assert len(shards) == 2
    out = f"s3://{moto_s3.bucket}/export"
    m = export_curated(shards, str(rdir), out, ExportConfig(max_samples=10))
    local = export_curated(list_shards(str(rdir / "shards")), str(rdir), str(tmp_path / "l"), ExportConfig(max_samples=10))
    assert m == local and m["n_samples"] == len(kept)
    for sh in m["shards"]:
        assert fs.cat_file(f"{moto_s3.bucket}/export/shards/{sh['name']}") == (tmp_path / "l/shards" / sh["name"]).read_bytes()
    assert fs.exists(f"{moto_s3.bucket}/export/ledger/export/part-export.parquet")
    verify_export(out)


def _retar(src: Path, dst: Path) -> None:
    """`src` rewritten by tarfile with other metadata: read by the tarfile path, not the ShardWriter index."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            ti = tarfile.TarInfo(m.name)
            ti.size, ti.mtime, ti.uname = m.size, 1_700_000_000, "someone"
            tout.addfile(ti, tin.extractfile(m))


def test_indexed_and_tarfile_inputs_export_identically(run, tmp_path):
    """ShardWriter inputs are read through the raw index (headers compared with the writer's bytes, images
    read only for wanted samples); the same members in another writer's tars go through tarfile. Both
    exports, rephrased text included, are byte for byte the same."""
    rdir, kept = run
    src = {s.id: s for s in iter_samples(list_shards(str(rdir / "shards")))}
    rows = [{"sample_id": sid, "conversations_json": json.dumps(
        [{"from": t.role, "value": t.value} for t in src[sid].conversations[:-1]] + [{"from": "gpt", "value": "new"}])}
        for sid in kept[::3]]
    rows[1]["conversations_json"] = "[]"  # invalid: falls back to the original text
    (tmp_path / "reph").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "reph" / "part-0.parquet")
    (tmp_path / "foreign").mkdir()
    for p in sorted((rdir / "shards").glob("*.tar")):
        _retar(p, tmp_path / "foreign" / p.name)
    cfg = ExportConfig(max_samples=6)
    outs = {}
    for name, shards in (("indexed", rdir / "shards"), ("tarfile", tmp_path / "foreign")):
        for sub in ({}, {"subset_ids": kept[1::4]}):
            out = tmp_path / f"{name}{len(sub)}"
            m = export_curated(list_shards(str(shards)), str(rdir), str(out), cfg, rephrased_dir=str(tmp_path / "reph"),
                               **sub)
            outs[name, len(sub)] = (m, _files(out), (out / "manifest.json").read_bytes())
    for sub in (0, 1):
        assert outs["indexed", sub] == outs["tarfile", sub]
    m = outs["indexed", 0][0]
    assert m["n_rephrased"] == len(rows) - 1 and m["rephrase_fallbacks"] == {"rephrase_invalid:empty_conversation": 1}
    assert outs["indexed", 1][0]["n_samples"] == len(kept[1::4])


@pytest.mark.parametrize("damage", ["cut", "header"])
def test_damaged_input_shard_quarantines_kept_samples(run, tmp_path, damage):
    """A cut or corrupt input shard: every kept sample it loses is in the export ledger with a reason, and
    the export fails (no manifest)."""
    rdir, kept = run
    (tmp_path / "shards").mkdir()
    for p in sorted((rdir / "shards").glob("*.tar")):
        (tmp_path / "shards" / p.name).write_bytes(p.read_bytes())
    p = sorted((tmp_path / "shards").glob("*.tar"))[1]
    data = bytearray(p.read_bytes())
    with tarfile.open(p) as tf:
        at = tf.getmembers()[6].offset
    if damage == "cut":
        data = data[: at + 700]
    else:
        data[at : at + 100] = b"\xff" * 100
    p.write_bytes(bytes(data))
    out = tmp_path / "x"
    with pytest.raises(ExportError, match="truncated_tar"):
        export_curated(list_shards(str(tmp_path / "shards")), str(rdir), str(out), ExportConfig())
    assert not (out / "manifest.json").exists()
    led = read_ledger(out / "ledger" / "export").to_dict("records")
    assert sorted(r["sample_id"] for r in led) == sorted(kept)  # nothing vanished
    lost = [r for r in led if r["decision"] == "quarantine"]
    assert lost and {r["reason"] for r in lost} <= {"truncated_tar", "missing_from_shard"}
