"""Partitioned export (`ExportConfig.partition_shards`): the same samples and decisions as the one-unit export,
the manifest as a reduce over per-unit parts, resume after a failed unit, 1 == 2 Ray workers byte for byte."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from export_train_fixtures import make_records

from core.foundation.ledger import LedgerWriter, read_ledger, step_dir
from core.foundation.sample import Sample
from core.foundation.step import Passing
from core.io.wds import iter_samples, list_shards, write_shards
from core.runs.fanout import FanOut, run_fanout
from core.steps.export import (
    ExportConfig,
    ExportError,
    ExportStep,
    PartitionedExportStep,
    export_curated,
    export_plan,
    export_units,
    manifest_config,
    manifest_shards,
    verify_export,
)

N = 48  # 8 input shards of 6


def _make_run(root: Path) -> tuple[Path, list[str]]:
    """48 ingested samples in 8 shards; ledgers ingest -> semdedup -> perplexity; returns (run, kept ids)."""
    samples = []
    for rec, imgs in make_records(N, seed=3):
        s = Sample.from_record(rec)
        s.image_bytes = imgs
        samples.append(s)
    run = root / "run"
    write_shards(samples, str(run / "shards"), max_samples=6)
    shard_of = {sid: f"shard-{k // 6:06d}" for k, sid in enumerate(s.id for s in samples)}
    ids = [s.id for s in samples]
    with LedgerWriter(step_dir(run, "ingest") / "part-0.parquet", "ingest") as led:
        for i in ids:
            led.add(i, "keep", shard=shard_of[i])
    with LedgerWriter(step_dir(run, "semdedup") / "part-0.parquet", "semdedup") as led:
        for k, i in enumerate(ids):
            led.add(i, "drop", "semdedup_eps:0.05", shard=shard_of[i]) if k % 5 == 0 else led.add(i, "keep",
                                                                                                  shard=shard_of[i])
    passed = [i for k, i in enumerate(ids) if k % 5]
    with LedgerWriter(step_dir(run, "perplexity") / "part-0.parquet", "perplexity") as led:
        for k, i in enumerate(passed):
            led.add(i, "drop", "ppl_above_p90", shard=shard_of[i]) if k % 7 == 3 else led.add(i, "keep",
                                                                                              shard=shard_of[i])
    return run, [i for k, i in enumerate(passed) if k % 7 != 3]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run, and a rephrased-records folder: most kept samples rephrased, one invalid (falls back)."""
    root = tmp_path_factory.mktemp("part")
    rdir, kept = _make_run(root)
    src = {s.id: s for s in iter_samples(list_shards(str(rdir / "shards")))}
    rows = [{"sample_id": sid, "conversations_json": json.dumps(
        [{"from": t.role, "value": t.value} for t in src[sid].conversations[:-1]] + [{"from": "gpt", "value": "new"}])}
        for sid in kept[::2]]
    rows[3]["conversations_json"] = "{not json"
    (root / "reph").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "reph" / "part-0.parquet")
    return rdir, kept, str(root / "reph")


def _export(run, out: Path, resume: bool = False, **cfg):
    rdir, _, reph = run
    return export_curated(list_shards(str(rdir / "shards")), str(rdir), str(out), ExportConfig(**cfg),
                          rephrased_dir=reph, code_version="test", resume=resume)


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    """{sample key: {member suffix: bytes}} over every shard the manifest names (read back from the tars)."""
    got: dict[str, dict[str, bytes]] = {}
    for url in manifest_shards(str(out)):
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                assert suffix not in got.get(key, {}), f"{m.name} twice"
                got.setdefault(key, {})[suffix] = tf.extractfile(m).read()
    return got


def _decisions(out: Path):
    led = read_ledger(out / "ledger" / "export")
    cols = ["sample_id", "decision", "reason", "extra"]
    return led.sort_values("sample_id")[cols].reset_index(drop=True)


def _files(out: Path) -> dict[str, str]:
    """sha256 of every file of an export (relative path), stamps and temp files included."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".writer.lock" not in p.name}


@pytest.mark.parametrize("k", [1, 3])
def test_partitioned_exports_the_same_samples_and_decisions(run, tmp_path, k):
    _, kept, _ = run
    one = _export(run, tmp_path / "one", max_samples=4)
    part = _export(run, tmp_path / "part", max_samples=4, partition_shards=k)
    # the same samples, member for member, byte for byte (images and JSON, rephrased text included)
    a, b = _members(tmp_path / "one"), _members(tmp_path / "part")
    assert len(a) == len(kept) and a == b
    # the same per-sample decisions (only the output shard a row names differs)
    assert _decisions(tmp_path / "one").equals(_decisions(tmp_path / "part"))
    assert _decisions(tmp_path / "part")["reason"].tolist().count("rephrase_invalid:invalid_json") == 1
    # manifest totals
    for key in ("n_samples", "n_rephrased", "rephrase_fallbacks", "steps", "selection", "balance", "removed_by_step",
                "n_kept_by_last_step", "subset_outside_kept", "format", "loader_schema"):
        assert one[key] == part[key], key
    assert {kk: v["n_samples"] for kk, v in one["kinds"].items()} == {kk: v["n_samples"] for kk, v in part["kinds"].items()}
    n_units = -(-8 // k)
    assert part["n_units"] == n_units and part["config"]["partition_shards"] == k
    # the shards: one writer per file (names carry the unit), each within max_samples, all verified
    disk = verify_export(str(tmp_path / "part"))
    assert disk["n_samples"] == len(kept) and sum(s["n_samples"] for s in disk["shards"]) == len(kept)
    assert all(s["n_samples"] <= 4 for s in disk["shards"])
    assert len({s["name"] for s in disk["shards"]}) == len(disk["shards"]) == part["n_shards"]
    assert all(f"-u{int(s['name'].split('-u')[1][:6]):06d}-" in s["name"] for s in disk["shards"])
    # kind order, then unit order, then write order (the one-unit manifest's order rule)
    names = [s["name"] for s in disk["shards"]]
    assert names == sorted(names)
    assert sorted(str(p.relative_to(tmp_path / "part" / "shards")) for p in (tmp_path / "part" / "shards").rglob("*.tar")) == names
    # the returned manifest is the file's, less the per-shard ids (bounded memory)
    assert part == {**disk, "shards": [{kk: v for kk, v in s.items() if kk != "ids"} for s in disk["shards"]]}
    # the streamed manifest is exactly what json.dumps writes; the card is written from the merged counts
    text = (tmp_path / "part" / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True)
    card = (tmp_path / "part" / "README.md").read_text()
    assert f"{len(kept)} samples in {part['n_shards']} WebDataset shards" in card and '"partition_shards": ' in card
    # ledger: one part per unit, every kept id exactly once
    parts = sorted(p.name for p in (tmp_path / "part" / "ledger" / "export").glob("*.parquet"))
    assert parts == [f"part-u{i:06d}.parquet" for i in range(n_units)]
    led = read_ledger(tmp_path / "part" / "ledger" / "export")
    assert sorted(led.sample_id) == sorted(kept) and led.sample_id.is_unique


def test_default_path_keeps_its_manifest_config_and_fanout_is_scheduling(run, tmp_path):
    """partition_shards = 0 writes the manifest config without the new fields (byte-identical to before); fanout is
    in no stamp and no manifest, so 1 or N workers give the same bytes."""
    m = _export(run, tmp_path / "one")
    assert "partition_shards" not in m["config"] and "fanout" not in m["config"]
    cfg = ExportConfig(partition_shards=2, fanout=FanOut(workers=3))
    assert "fanout" not in manifest_config(cfg) and manifest_config(cfg)["partition_shards"] == 2
    step = ExportStep(tmp_path, Passing.of([]), cfg, str(tmp_path), [], {})
    assert "fanout" not in step.stamp_config() and step.stamp_config()["partition_shards"] == 2
    assert ExportConfig.from_json('{"partition_shards": 2, "fanout": {"workers": 2}}').fanout == FanOut(workers=2)
    with pytest.raises(ValueError):
        ExportConfig(partition_shards=-1)


def test_partitioned_export_is_deterministic_and_shards_respect_max_samples(run, tmp_path):
    """`max_samples` / `max_bytes` bound every output shard of every unit; two runs are byte-identical and
    export the one-unit count."""
    _, kept, _ = run
    for name in ("a", "b"):
        m = _export(run, tmp_path / name, max_samples=2, partition_shards=2)
        assert m["n_samples"] == len(kept) and all(s["n_samples"] <= 2 for s in m["shards"])
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb and "manifest.json" in fa
    small = _export(run, tmp_path / "bytes", max_bytes=1, partition_shards=4)  # one sample per shard
    assert small["n_shards"] == len(kept) == small["n_samples"]


def test_resume_after_a_failed_unit_redoes_only_unfinished_units(run, tmp_path, monkeypatch):
    ref = _export(run, tmp_path / "ref", partition_shards=2, max_samples=3)
    out = tmp_path / "out"
    calls: list[str] = []
    real = PartitionedExportStep.process

    def failing(self, unit, led):
        calls.append(unit.name)
        if unit.name == "u000002":
            Path(self.dest, "shards", "image").mkdir(parents=True, exist_ok=True)
            Path(self.dest, "shards", "image", "shard-u000002-000099.tar").write_bytes(b"half")  # a killed writer
            raise OSError("disk gone")
        return real(self, unit, led)

    monkeypatch.setattr(PartitionedExportStep, "process", failing)
    with pytest.raises(OSError, match="disk gone"):
        _export(run, out, resume=True, partition_shards=2, max_samples=3)
    assert calls == ["u000000", "u000001", "u000002"]
    assert not (out / "manifest.json").exists() and not (out / "README.md").exists()
    done = sorted(p.name for p in (out / "ledger" / "export").glob("*.parquet"))
    assert done == ["part-u000000.parquet", "part-u000001.parquet"]
    kept_files = {k: v for k, v in _files(out).items() if "u000000" in k or "u000001" in k}
    monkeypatch.setattr(PartitionedExportStep, "process", real)
    calls.clear()
    monkeypatch.setattr(PartitionedExportStep, "process", lambda self, unit, led: (calls.append(unit.name),
                                                                                      real(self, unit, led))[1])
    m = _export(run, out, resume=True, partition_shards=2, max_samples=3)
    assert calls == ["u000002", "u000003"]  # the finished units are skipped
    assert all(_files(out)[k] == v for k, v in kept_files.items())
    assert m == ref and _files(out) == _files(tmp_path / "ref")  # the half shard was replaced, nothing stray
    # a finished export with the same config is returned as is; resume=False redoes every unit
    calls.clear()
    assert _export(run, out, resume=True, partition_shards=2, max_samples=3) == json.loads(
        (out / "manifest.json").read_text()) and calls == []
    assert _export(run, out, partition_shards=2, max_samples=3) == ref and len(calls) == 4
    # another partition size in the same folder (resume): everything recomputed, nothing of the old one left
    m3 = _export(run, out, resume=True, partition_shards=3, max_samples=3)
    assert m3["n_units"] == 3 and sorted(p.name for p in (out / "parts").iterdir()) == ["u000000.json", "u000001.json",
                                                                                         "u000002.json"]
    assert {s["name"] for s in verify_export(str(out))["shards"]} == {
        str(p.relative_to(out / "shards")) for p in (out / "shards").rglob("*.tar")}
    # an unfinished folder (no manifest yet) reused (resume) with the first 6 input shards: u000000 and u000001
    # are the same units and are kept, u000002 is no unit of this export and leaves nothing behind (ledger part,
    # manifest part, shards). A finished folder would be returned as is: resume trusts a folder keyed by its inputs
    (out / "manifest.json").unlink()
    rdir, kept, reph = run
    six = list_shards(str(rdir / "shards"))[:6]
    ids = [i for i in kept if i in {s.id for s in iter_samples(six)}]
    calls.clear()
    few = export_curated(six, str(rdir), str(out), ExportConfig(partition_shards=3, max_samples=3), subset_ids=ids,
                         rephrased_dir=reph, code_version="test", resume=True)
    assert calls == [] and few["n_units"] == 2 and few["n_samples"] == len(ids) < len(kept)
    fresh = export_curated(six, str(rdir), str(tmp_path / "fresh"), ExportConfig(partition_shards=3, max_samples=3),
                           subset_ids=ids, rephrased_dir=reph, code_version="test")
    assert few == fresh and _files(out) == _files(tmp_path / "fresh")


def test_missing_id_fails_the_count_check_in_the_reduce(run, tmp_path):
    """A wanted id in no shard: quarantined by the reduce, ExportError, no manifest (as the one-unit export)."""
    rdir, kept, _ = run
    with pytest.raises(ExportError, match="missing_from_shard"):
        export_curated(list_shards(str(rdir / "shards")), str(rdir), str(tmp_path / "x"),
                       ExportConfig(partition_shards=3), subset_ids=[*kept[:5], "ghost"])
    assert not (tmp_path / "x" / "manifest.json").exists()
    led = read_ledger(tmp_path / "x" / "ledger" / "export")
    assert led[led.sample_id == "ghost"].decision.tolist() == ["quarantine"]


def test_empty_input_gives_an_empty_partitioned_export(run, tmp_path):
    rdir, _, _ = run
    m = export_curated([], str(rdir), str(tmp_path / "e"), ExportConfig(partition_shards=2), subset_ids=[])
    assert m["n_samples"] == 0 and m["shards"] == [] and m["n_units"] == 0
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["shards"] == []


def test_two_ray_workers_write_the_same_bytes_as_one(run, tmp_path, ray_local):
    """`export_plan` + `run_fanout`: 2 actors (groups of 1 unit) == in-process, every file byte for byte."""
    rdir, kept, reph = run
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cfg = ExportConfig(max_samples=3, partition_shards=2, fanout=FanOut(workers=workers, group_size=1))
        spec, units = export_plan(list_shards(str(rdir / "shards")), str(rdir), str(out), cfg,
                                  rephrased_dir=reph, code_version="test")
        assert len(units) == 4 and units == export_units(list_shards(str(rdir / "shards")), 2)
        s = run_fanout(spec, units, cfg.fanout)
        assert sorted(s.done) == [f"u{i:06d}" for i in range(4)] and s.missing == 0
        outs[workers] = _files(out)
    assert outs[1] == outs[2] and "manifest.json" in outs[1]
    assert verify_export(str(tmp_path / "w2"))["n_samples"] == len(kept)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
